"""The secure fleet, attacked: real Mosquitto with dynamic security and mutual TLS
(``fleetctl broker init``), enrolled nodes running from their bundles
(``fleetctl node enroll`` → ``edge-node run --config node.toml``), a controller
with its own broker account, and operators signing with their keys and roles.

Every attack is paired with a positive control (the same act with the right
key, account or role is obeyed), so a refusal means something. The attacks
that need no broker (forged acks, planted trust lists, replays, bounds on
commands, quotas, chunk policy) are covered in the unit tests named in
docs/security.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Broker
from tests.support.fleet import Proc, program
from tests.support.models import make_classifier

PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
FLEET = "secure"
DEADLINE_S = 60.0

pytestmark = pytest.mark.skipif(not PLUGIN.exists(), reason="no dynamic security plugin")


@dataclass
class SecureFleet:
    root: Path
    broker: Broker
    keys: Path
    creds: Path
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"

    def env(self, user: str, creds: Path | None = None) -> dict[str, str]:
        """What ``user`` runs fleetctl with: their broker account and their key."""
        where = creds or self.creds / user
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        return env | {
            "FLEET_BROKER": f"mqtts://{user}@127.0.0.1:{self.broker.port}",
            "FLEET_PASSWORD_FILE": str(where / "password"),
            "FLEET_CERT_FILE": str(where / "client.crt"),
            "FLEET_KEY_FILE": str(where / "client.key"),
            "FLEET_CA_FILE": str(where / "ca.crt"),
            "FLEET_FLEET": FLEET,
            "FLEET_KEYS": str(self.keys),
            "FLEET_OPERATOR": user,
        }

    def fleetctl(self, user: str, *args: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*program("fleetctl"), *args],
            env=self.env(user),
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
            check=False,
            cwd=self.root,
        )
        assert done.returncode == rc, (
            f"fleetctl {' '.join(args)} as {user}: exit {done.returncode}\n{done.stderr}"
            f"\n{self.tails()}"
        )
        return done

    def json(self, user: str, *args: str) -> Any:
        return json.loads(self.fleetctl(user, *args, "--json").stdout)

    def start(self, name: str, args: list[str], env: Mapping[str, str]) -> Proc:
        log = self.root / f"{name}.log"
        with log.open("ab") as handle:
            popen = subprocess.Popen(
                args, stdout=handle, stderr=subprocess.STDOUT, env=dict(env), cwd=self.root
            )
        proc = Proc(name=name, args=args, log=log, popen=popen)
        self.procs.append(proc)
        return proc

    def node(self, node: str) -> Proc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        args = [
            *program("edge-node"), "run", "--config", str(self.root / "bundles" / node / "node.toml"),
            "--data", str(self.root / "data" / node), "--rate", "5", "--telemetry-interval", "2",
        ]  # fmt: skip
        return self.start(node, args, env)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["node_id"]: n for n in self.json("admin", "nodes")}

    def wait(self, what: str, probe: Any) -> Any:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                value = probe()
            except (AssertionError, ValueError):
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{self.tails()}"
            time.sleep(0.25)  # polling against the deadline

    def tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in self.procs) + (
            f"\n--- broker\n{self.broker.log_text()[-3000:]}"
        )


def _mqtt(fleet: SecureFleet, user: str, client_id: str, creds: Path | None = None) -> Any:
    """A raw paho client logged in as ``user`` (its own TLS files), with what it saw."""
    where = creds or fleet.creds / user
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(user, (where / "password").read_text().strip())
    client.tls_set(
        ca_certs=str(where / "ca.crt"),
        certfile=str(where / "client.crt"),
        keyfile=str(where / "client.key"),
    )
    seen: dict[str, Any] = {"subacks": {}, "messages": []}
    client.on_connect = lambda c, u, f, rc, p: seen.__setitem__("connect", str(rc))
    client.on_subscribe = lambda c, u, mid, rcs, p: seen["subacks"].__setitem__(
        mid, [str(r) for r in rcs]
    )
    client.on_message = lambda c, u, m: seen["messages"].append(m.topic)
    client.user_data_set(seen)
    client.connect("127.0.0.1", fleet.broker.port)
    client.loop_start()
    return client, seen


def _suback(fleet: SecureFleet, client: Any, seen: dict[str, Any], topic: str) -> list[str]:
    mid = client.subscribe(topic, 1)[1]
    return fleet.wait(f"the SUBACK for {topic}", lambda: seen["subacks"].get(mid))


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFleet]:
    root = tmp_path_factory.mktemp("secure")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}

    def run(*args: str) -> None:
        done = subprocess.run(
            [*program("fleetctl"), *args], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr

    keys = root / "keys"
    run("keys", "init", "--dir", str(keys))
    run("operator", "add", "dave", "--role", "deployer", "--dir", str(keys))
    run("operator", "add", "vera", "--role", "viewer", "--dir", str(keys))
    broker_dir = root / "broker"
    run(
        "broker", "init", "--dir", str(broker_dir), "--host", "127.0.0.1",
        "--operators", "admin,dave,vera",
    )  # fmt: skip
    # The rendered secure.conf as it is, but logging to the test's file, as this user.
    conf = [
        line
        for line in (broker_dir / "secure.conf").read_text().splitlines()
        if not line.startswith(("log_dest file", "user "))
    ]
    template = root / "secure-test.conf"
    template.write_text("\n".join(conf) + "\n")
    broker = Broker(root / "mosquitto", template=template)
    (root / "mosquitto").mkdir()
    broker.start()
    fleet = SecureFleet(root, broker, keys, broker_dir / "credentials")
    fleet.start(
        "controller",
        [
            *program("fleetctl"), "serve", "--dynsec", "--keys", str(keys),
            "--db", str(root / "fleet.db"), "--tick", "0.5s", "--log-level", "info",
        ],
        fleet.env("controller"),
    )  # fmt: skip
    for node in ("n1", "n2"):
        fleet.fleetctl(
            "broker-admin", "node", "enroll", node, "--out", str(root / "bundles" / node),
            "--ca-dir", str(broker_dir / "tls"),
        )  # fmt: skip
        fleet.node(node)
    fleet.wait(
        "both nodes online",
        lambda: all(n.get("online") for n in fleet.nodes().values()) and len(fleet.nodes()) == 2,
    )
    try:
        yield fleet
    finally:
        for proc in reversed(fleet.procs):
            proc.terminate()
        broker.close()


def test_the_bundle_is_private_and_runs_as_it_is(secure: SecureFleet) -> None:
    bundle = secure.root / "bundles" / "n1"
    assert sorted(p.name for p in bundle.iterdir()) == [
        "ca.crt", "client.crt", "client.key", "node.toml", "password", "trust.json",
    ]  # fmt: skip
    for secret in ("client.key", "password", "node.toml"):
        assert (bundle / secret).stat().st_mode & 0o077 == 0, secret
    assert (secure.root / "bundles" / "n1").stat().st_mode & 0o077 == 0


def test_a_node_stays_in_its_lane(secure: SecureFleet) -> None:
    client, seen = _mqtt(secure, "n2", "n2-probe", secure.root / "bundles" / "n2")
    try:
        # n2's bound client id is n2: this connection is refused, n2 keeps its session.
        secure.wait("the refusal", lambda: seen.get("connect"))
        assert seen["connect"] == "Not authorized"
    finally:
        client.loop_stop()
        client.disconnect()
    # n1's bundle under n1's client id would take over n1's session: the broker refuses
    # n2's credentials with client id n1, so only n1's own password can.
    thief, stolen = _mqtt(secure, "n2", "n1", secure.root / "bundles" / "n2")
    try:
        secure.wait("the refusal", lambda: stolen.get("connect"))
        assert stolen["connect"] == "Not authorized"
    finally:
        thief.loop_stop()
        thief.disconnect()
    assert secure.nodes()["n1"]["online"]


def test_nodes_cannot_join_the_controllers_or_read_others(secure: SecureFleet) -> None:
    # A node's credentials with a fresh client id would be refused (bound id), so
    # probe with a client made for it: its own id, while its process is stopped.
    n2 = next(p for p in secure.procs if p.name == "n2")
    n2.terminate()
    client, seen = _mqtt(secure, "n2", "n2", secure.root / "bundles" / "n2")
    try:
        secure.wait("the connection", lambda: seen.get("connect") == "Success")
        base = f"fleet/v1/{FLEET}"
        for topic in (
            f"$share/controllers/{base}/node/+/results",
            f"$share/controllers/{base}/ctl/request",
            f"{base}/node/n1/cmd",
            f"{base}/node/n1/ack",
            f"{base}/ctl/reply/admin",
            f"{base}/#",
        ):
            assert _suback(secure, client, seen, topic) == ["Not authorized"], topic
        assert _suback(secure, client, seen, f"{base}/node/n2/cmd") == ["Granted QoS 1"]
    finally:
        client.loop_stop()
        client.disconnect()
    secure.node("n2")
    secure.wait("n2 back", lambda: secure.nodes()["n2"]["online"])


def test_operators_are_who_their_key_says_and_do_what_their_role_allows(
    secure: SecureFleet,
) -> None:
    denied = secure.fleetctl("vera", "node", "revoke", "n2", rc=2)
    assert "needs the admin role" in denied.stderr
    assert not secure.nodes()["n2"]["revoked"]
    # vera cannot sign as admin: her key is not admin's.
    vera_key = str(secure.keys / "operators" / "vera.pem")
    borrowed = secure.fleetctl(
        "vera", "node", "revoke", "n2", "--operator", "admin", "--operator-key", vera_key,
        "--timeout", "3s", rc=1,
    )  # fmt: skip
    assert "no answer" in borrowed.stderr
    # Nor read admin's replies.
    client, seen = _mqtt(secure, "vera", "vera-probe")
    try:
        secure.wait("vera connected", lambda: seen.get("connect") == "Success")
        reply = f"fleet/v1/{FLEET}/ctl/reply/admin"
        assert _suback(secure, client, seen, reply) == ["Not authorized"]
    finally:
        client.loop_stop()
        client.disconnect()
    audit = secure.json("vera", "audit")
    assert (audit[0]["operator"], audit[0]["action"], audit[0]["outcome"]) == (
        "vera",
        "node.revoke",
        "denied",
    )


def test_a_deployer_rolls_a_model_out_through_the_lanes(secure: SecureFleet) -> None:
    """The positive control of the node's lanes: commands, chunks, statuses, acks."""
    model = make_classifier(secure.root / "classifier.onnx", seed=1)
    secure.fleetctl("dave", "model", "add", str(model), "--name", "clf", "--version", "1.0.0")
    secure.fleetctl(
        "dave", "rollout", "start", "clf@1.0.0", "--id", "r1", "--waves", "100",
        "--health-window", "0s", "--wave-timeout", "60s",
    )  # fmt: skip
    status = secure.wait(
        "the rollout to end",
        lambda: (
            (s := secure.json("vera", "rollout", "status", "r1"))["state"]
            in ("succeeded", "failed", "halted", "aborted", "rolled_back")
            and s
        ),
    )
    assert status["state"] == "succeeded", status
    assert {n: v["model"] for n, v in secure.nodes().items()} == {
        "n1": "clf@1.0.0",
        "n2": "clf@1.0.0",
    }


def test_a_revoked_node_is_cut_off_by_the_broker(secure: SecureFleet) -> None:
    revoked = secure.json("admin", "node", "revoke", "n2")
    assert revoked == {"node_id": "n2", "revoked": True, "broker_account_removed": True}
    secure.wait("n2 offline", lambda: not secure.nodes()["n2"]["online"])
    client, seen = _mqtt(secure, "n2", "n2", secure.root / "bundles" / "n2")
    try:
        secure.wait("the refusal", lambda: seen.get("connect"))
        assert seen["connect"] == "Not authorized"
    finally:
        client.loop_stop()
        client.disconnect()
    assert secure.nodes()["n1"]["online"]  # the others go on
