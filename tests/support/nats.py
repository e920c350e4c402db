"""A real three-member NATS cluster with JetStream and MQTT listeners, for e2e tests.

:class:`NatsCluster` writes one configuration per member into its working
directory (client, monitoring, cluster and MQTT listeners on free loopback
ports, routes to every member, a JetStream store in the working directory, no
authentication: loopback only), starts ``nats-server -c FILE`` for each with
its log captured in a file, and waits, polling the monitoring endpoints
against a deadline, until every member routes to every other one, the
JetStream meta group has a leader and each member reports healthy.

NATS's MQTT listener speaks MQTT 3.1.1 only, so :meth:`NatsCluster.url` gives
``mqtt://127.0.0.1:PORT?protocol=3.1.1``: one URL per member, so a test can
connect the controller and the nodes to different members.

A missing ``nats-server`` raises :class:`NatsNotInstalledError`; the tests
skip on it (and only on it).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from tests.support.broker import find_executable

__all__ = ["NatsCluster", "NatsError", "NatsNotInstalledError", "find_nats_server"]

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
MAX_PAYLOAD = "2MB"
"""EdgeFleet's payloads go up to 1 MiB; NATS counts its own MQTT headers in the limit."""
_POLL_S = 0.05
_SEARCH_PATH = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server")


class NatsError(RuntimeError):
    """The cluster could not be started; the message includes the members' logs."""


class NatsNotInstalledError(NatsError):
    """No ``nats-server`` executable was found."""


def find_nats_server() -> str:
    """``$NATS_SERVER``, then ``PATH``, then the usual folders.

    Raises:
        NatsNotInstalledError: none of them is an executable file.
    """
    return find_executable(
        "nats-server",
        "NATS_SERVER",
        _SEARCH_PATH,
        NatsNotInstalledError,
        "install it with scripts/bootstrap or `apt-get install nats-server`",
    )


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (held together while picked)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _get_json(port: int, path: str) -> dict[str, Any] | None:
    """A monitoring endpoint's JSON document; None while it cannot answer."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=1.0) as reply:
            data = json.loads(reply.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class _Member:
    name: str
    client_port: int
    http_port: int
    cluster_port: int
    mqtt_port: int
    config: Path
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None


class NatsCluster:
    """Three (``size``) NATS servers in one JetStream cluster, each with an MQTT listener.

    ``with NatsCluster(workdir) as cluster:`` starts them and stops them all.
    """

    def __init__(
        self, workdir: Path, *, size: int = 3, start_timeout_s: float = START_TIMEOUT_S
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster has at least one member, not {size}")
        self.workdir = Path(workdir)
        self.start_timeout_s = start_timeout_s
        ports = _free_ports(4 * size)
        self.members = [
            _Member(
                name=f"m{index + 1}",
                client_port=ports[4 * index],
                http_port=ports[4 * index + 1],
                cluster_port=ports[4 * index + 2],
                mqtt_port=ports[4 * index + 3],
                config=self.workdir / f"m{index + 1}.conf",
                log_file=self.workdir / f"m{index + 1}.log",
            )
            for index in range(size)
        ]

    def url(self, index: int) -> str:
        """The MQTT URL of member ``index`` (0-based), MQTT 3.1.1."""
        return f"mqtt://{HOST}:{self.members[index].mqtt_port}?protocol=3.1.1"

    # ----- configuration -----------------------------------------------------

    def render_config(self, member: _Member) -> str:
        routes = ", ".join(f"nats-route://{HOST}:{m.cluster_port}" for m in self.members)
        store = self.workdir / "jetstream" / member.name
        return "\n".join(
            [
                f"server_name: {member.name}",
                f"listen: {HOST}:{member.client_port}",
                f"http: {HOST}:{member.http_port}",
                f"max_payload: {MAX_PAYLOAD}",
                "jetstream {",
                f'  store_dir: "{store}"',
                "  max_memory_store: 64MB",
                "  max_file_store: 512MB",
                "}",
                "cluster {",
                "  name: edgefleet",
                f"  listen: {HOST}:{member.cluster_port}",
                f"  routes: [{routes}]",
                "}",
                "mqtt {",
                f"  listen: {HOST}:{member.mqtt_port}",
                "  consumer_replicas: 1",
                "  consumer_memory_storage: true",
                "}",
                "",
            ]
        )

    # ----- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start every member; return once the cluster and JetStream are formed.

        Raises:
            NatsNotInstalledError: no nats-server executable.
            NatsError: a member exited, or the cluster did not form in time.
        """
        executable = find_nats_server()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for member in self.members:
            member.config.write_text(self.render_config(member), encoding="utf-8")
            member.log = member.log_file.open("ab")
            member.process = subprocess.Popen(
                [executable, "-c", str(member.config)],
                stdin=subprocess.DEVNULL,
                stdout=member.log,
                stderr=member.log,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not self._formed():
            if time.monotonic() >= deadline:
                self.close()
                raise NatsError(
                    f"the NATS cluster did not form within {self.start_timeout_s:g} s\n"
                    + self.diagnostics()
                )
            time.sleep(_POLL_S)  # polling against the deadline, not synchronization

    def _formed(self) -> bool:
        """Raises: NatsError when a member has exited."""
        for member in self.members:
            assert member.process is not None
            code = member.process.poll()
            if code is not None:
                self.close()
                logs = self.diagnostics()
                raise NatsError(f"nats-server {member.name} exited with {code}\n{logs}")
        peers = len(self.members) - 1
        for member in self.members:
            routes = _get_json(member.http_port, "/routez")
            jsz = _get_json(member.http_port, "/jsz")
            health = _get_json(member.http_port, "/healthz")
            if routes is None or jsz is None or health is None:
                return False
            if int(routes.get("num_routes", 0)) < peers:
                return False
            meta = jsz.get("meta_cluster") or {}
            if peers and (not meta.get("leader") or int(meta.get("cluster_size", 0)) < peers + 1):
                return False
            if health.get("status") != "ok" or not _port_accepts(member.mqtt_port):
                return False
        return True

    def close(self) -> None:
        """Stop every member (SIGTERM, SIGKILL after a while) and release the logs."""
        for member in self.members:
            process, member.process = member.process, None
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if member.log is not None:
                member.log.close()
                member.log = None

    # ----- diagnostics ---------------------------------------------------------

    def diagnostics(self, lines: int = 20) -> str:
        """The tail of every member's log."""
        parts = []
        for member in self.members:
            with contextlib.suppress(FileNotFoundError):
                text = member.log_file.read_text(encoding="utf-8", errors="replace")
                tail = "\n".join(text.splitlines()[-lines:])
                parts.append(f"----- nats {member.name} ({member.log_file}) -----\n{tail}")
        return "\n".join(parts)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
