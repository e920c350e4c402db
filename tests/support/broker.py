"""A real Mosquitto broker on a free loopback port, for integration and e2e tests.

:class:`Broker` renders ``broker_config/dev.conf`` into its own working
directory (listener on a free port, optional persistence, optional extra
lines), runs ``mosquitto -c FILE`` as a child process with its log captured in
a file, and waits until it has logged that it is running and its port accepts
connections, polling against a deadline (the port alone could be answered by
another process). ``stop``/``kill`` followed by ``start`` reuse the same port
and configuration, so clients can reconnect to the same URL after an outage; with
``persistence=True`` sessions, subscriptions, queued and retained messages
survive a ``stop`` (Mosquitto writes its database on SIGTERM; a ``kill`` loses
what was not yet saved, like a real crash).

A missing ``mosquitto`` executable raises :class:`BrokerNotInstalledError`;
the pytest fixtures turn it into a failure, never a skip (CI installs it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from broker_config import config_path

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerFactory",
    "BrokerNotInstalledError",
    "find_mosquitto",
    "free_port",
]

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.01
_PORT_ATTEMPTS = 5  # first start only: another process may grab a "free" port first
# Logged at "information" level once the listeners are open: "mosquitto version 2.0.11 running".
_RUNNING = re.compile(rb"mosquitto version \S+ running")
_SEARCH_PATH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class BrokerError(RuntimeError):
    """The broker could not be started or stopped; the message includes its log."""


class BrokerNotInstalledError(BrokerError):
    """No ``mosquitto`` executable was found."""


def free_port(host: str = HOST) -> int:
    """Return a TCP port on ``host`` that was free a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_executable(
    name: str, env_var: str, search_path: tuple[str, ...], missing: type[Exception], hint: str
) -> str:
    """``$env_var``, then ``PATH``, then ``search_path``: the first executable file.

    Raises:
        missing: none of them is (with ``hint`` on how to install it).
    """
    override = os.environ.get(env_var)
    if override:
        if os.access(override, os.X_OK) and Path(override).is_file():
            return override
        raise missing(f"{env_var}={override!r} is not an executable file")
    found = shutil.which(name)
    if found:
        return found
    for candidate in search_path:
        if os.access(candidate, os.X_OK):
            return candidate
    raise missing(
        f"{name} is not installed (looked at ${env_var}, PATH and {', '.join(search_path)}): "
        f"{hint}, or set {env_var}=/path/to/{name}"
    )


def find_mosquitto() -> str:
    """Locate the broker: ``$MOSQUITTO``, then ``PATH``, then the usual sbin folders.

    Raises:
        BrokerNotInstalledError: none of them is an executable file.
    """
    return find_executable(
        "mosquitto",
        "MOSQUITTO",
        _SEARCH_PATH,
        BrokerNotInstalledError,
        "install it, e.g. `apt-get install mosquitto`",
    )


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """One Mosquitto process with a fixed port and configuration across restarts.

    Construct, then :meth:`start` (or use ``with Broker(...) as broker:``).
    Call :meth:`close` (or leave the ``with`` block) to stop it for good.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        persistence: bool = False,
        extra_config: Sequence[str] = (),
        port: int | None = None,
        template: Path | None = None,
        executable: str | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.host = HOST
        self.workdir = Path(workdir)
        self.persistence = persistence
        self.extra_config = tuple(extra_config)
        self.template = template if template is not None else config_path("dev.conf")
        self.start_timeout_s = start_timeout_s
        self.config_file = self.workdir / "mosquitto.conf"
        self.log_file = self.workdir / "mosquitto.log"
        self.persistence_dir = self.workdir / "persistence"
        self._executable = executable
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started_once = False

    # ----- addresses ---------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``, the form ``--broker`` and FLEET_BROKER take."""
        return f"mqtt://{self.host}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ----- configuration -----------------------------------------------------

    def render_config(self) -> str:
        """The configuration text for the current port and options."""
        lines: list[str] = []
        listeners = 0
        for raw in self.template.read_text(encoding="utf-8").splitlines():
            words = raw.split()
            key = words[0] if words else ""
            if key == "listener":
                listeners += 1
                lines.append(f"listener {self._port} {self.host}")
            elif key in ("persistence", "persistence_location", "user"):
                continue  # set below, for this directory and this process's user
            else:
                lines.append(raw)
        if listeners != 1:
            raise BrokerError(f"{self.template} must declare exactly one listener, not {listeners}")
        lines.append("")
        lines.append("# --- added by tests/support/broker.py ---")
        lines.append(f"persistence {'true' if self.persistence else 'false'}")
        if self.persistence:
            # Trailing separator: Mosquitto 1.x glued location and file name together;
            # 2.0 adds its own "/" (the doubled one in its log is harmless).
            lines.append(f"persistence_location {self.persistence_dir}{os.sep}")
        # Run as whoever runs the tests. Started as root, Mosquitto would otherwise
        # switch to user "mosquitto", which cannot write to a private temp dir.
        lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        lines.extend(self.extra_config)
        # start() waits for the "running" line (information level, stderr): keep it logged.
        settings = [line.split() for line in lines if line.strip() and not line.startswith("#")]
        dests = {words[1] for words in settings if words[0] == "log_dest" and len(words) > 1}
        types = {words[1] for words in settings if words[0] == "log_type" and len(words) > 1}
        if dests and not dests & {"stderr", "stdout"}:
            lines.append("log_dest stderr")
        if types and not types & {"information", "all"}:
            lines.append("log_type information")  # adds "starting", "running", "Saving ..."
        return "\n".join(lines) + "\n"

    # ----- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the broker (again); return once it logged "running" and its port accepts.

        Raises:
            BrokerNotInstalledError: no mosquitto executable.
            BrokerError: it exited or did not listen within ``start_timeout_s``.
        """
        if self.running:
            return
        executable = self._executable or find_mosquitto()
        if self._executable is not None and not (
            Path(executable).is_file() and os.access(executable, os.X_OK)
        ):
            raise BrokerNotInstalledError(f"mosquitto executable {executable!r} not found")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.persistence:
            self.persistence_dir.mkdir(exist_ok=True)
        # Only a first start on a port we picked may move to another port: a restart
        # must come back on the same URL that clients were given.
        attempts = 1 if (self._started_once or self._port_fixed) else _PORT_ATTEMPTS
        for attempt in range(attempts):
            if attempt:
                self._port = free_port()
            self.config_file.write_text(self.render_config(), encoding="utf-8")
            error = self._launch(executable)
            if error is None:
                self._started_once = True
                return
            if "Address already in use" not in error or attempt == attempts - 1:
                raise BrokerError(error)
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self, executable: str) -> str | None:
        """Run mosquitto; ``None`` when it listens, else a message with its log."""
        if self._log is None:
            self._log = self.log_file.open("ab")
        log_offset = self.log_file.stat().st_size
        self._process = subprocess.Popen(
            [executable, "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self._process = None
                return f"mosquitto exited with status {code} on port {self._port}:\n" + (
                    self._log_since(log_offset)
                )
            # Both: the port alone could be answered by some other process, and
            # Mosquitto logs "running" only once every listener is open.
            if _RUNNING.search(self._log_bytes_since(log_offset)) and _port_accepts(
                self.host, self._port
            ):
                return None
            time.sleep(_POLL_S)  # polling against the deadline, not synchronization
        self._terminate(signal.SIGKILL)
        return (
            f"mosquitto did not accept connections on port {self._port} within "
            f"{self.start_timeout_s} s:\n" + self._log_since(log_offset)
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop with SIGTERM (a persistent broker saves its database) and wait.

        Escalates to SIGKILL after ``timeout_s``. No-op when not running.
        """
        self._terminate(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """Stop abruptly with SIGKILL, as a crash or power loss would."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """Stop (SIGTERM) and start again on the same port."""
        self.stop()
        self.start()

    def reload(self) -> None:
        """Send SIGHUP: Mosquitto re-reads its password and ACL files."""
        if self._process is None or not self.running:
            raise BrokerError("cannot reload: the broker is not running")
        self._process.send_signal(signal.SIGHUP)

    def close(self) -> None:
        """Stop the broker if it runs and release the log file."""
        try:
            self.stop()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def _terminate(self, sig: signal.Signals, timeout_s: float = STOP_TIMEOUT_S) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # ----- diagnostics ---------------------------------------------------------

    def log_text(self) -> str:
        """Everything the broker has logged so far (all starts)."""
        if self._log is not None:
            self._log.flush()
        with contextlib.suppress(FileNotFoundError):
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        return ""

    def _log_bytes_since(self, offset: int) -> bytes:
        if self._log is not None:
            self._log.flush()
        with self.log_file.open("rb") as log:
            log.seek(offset)
            return log.read()

    def _log_since(self, offset: int) -> str:
        return self._log_bytes_since(offset).decode("utf-8", "replace").strip()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Broker {self.url} {state} persistence={self.persistence}>"

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


BrokerFactory = Callable[..., Broker]
"""What the ``broker_factory`` fixture yields: keyword arguments of :class:`Broker`."""
