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

import asyncio
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from edgefleet_io.mqtt import MqttTransport
from edgefleet_io.transport import Session
from fleet_controller.api import CtlClient, OperationError, OperatorIdentity
from fleet_controller.keys import load_key
from fleet_controller.signing import sign_command
from shared.broker import parse_broker_url
from shared.envelope import PAYLOAD_REQUEST, SigningKey, sign_envelope
from shared.errors import BrokerUnavailableError, EdgeFleetError
from shared.messages import (
    Ack,
    ArtifactRequest,
    CancelAction,
    NodeTarget,
    OperatorReply,
    OperatorRequest,
    decode,
    encode,
)
from shared.trust import Role, TrustList, sign_trust_list
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
        """``fleetctl ARGS`` as ``user``; on a loaded machine answers may take a while, so
        each request waits up to a minute unless ARGS say otherwise."""
        patience = () if "--timeout" in args else ("--timeout", "60s")
        done = subprocess.run(
            [*program("fleetctl"), *args, *patience],
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
        config = self.root / "bundles" / node / "node.toml"
        args = [
            *program("edge-node"), "run", "--config", str(config),
            "--data", str(self.root / "data" / node), "--rate", "5", "--telemetry-interval", "2",
        ]  # fmt: skip
        return self.start(node, args, env)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["node_id"]: n for n in self.call("admin", "nodes.list")}

    def call(
        self, user: str, op: str, args: dict[str, Any] | None = None, *, timeout_s: float = 10.0
    ) -> Any:
        """One operator request from this process, as ``user`` (cheaper than fleetctl).
        A request sent before the controller subscribed is lost: polls retry after
        ``timeout_s``."""

        async def run() -> Any:
            identity = OperatorIdentity.load(self.keys, user)
            transport = _transport(self, user)
            async with CtlClient(
                transport, fleet=FLEET, identity=identity, timeout_s=timeout_s
            ) as ctl:
                return await ctl.call(op, args)

        return asyncio.run(run())

    def wait(self, what: str, probe: Any, *, timeout_s: float = DEADLINE_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = probe()
            except (AssertionError, ValueError, EdgeFleetError):
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{self.tails()}"
            time.sleep(0.25)  # polling against the deadline

    def tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in self.procs) + (
            f"\n--- broker\n{self.broker.log_text()[-3000:]}"
        )


def _transport(fleet: SecureFleet, user: str, creds: Path | None = None) -> MqttTransport:
    """Connections logged in as ``user``, with its own TLS files."""
    where = creds or fleet.creds / user
    address = replace(
        parse_broker_url(f"mqtts://{user}@127.0.0.1:{fleet.broker.port}"),
        password=(where / "password").read_text().strip(),
    )
    return MqttTransport(
        address,
        ca_file=str(where / "ca.crt"),
        cert_file=str(where / "client.crt"),
        key_file=str(where / "client.key"),
    )


def _refused(fleet: SecureFleet, user: str, client_id: str, creds: Path | None = None) -> str:
    """Log in as ``user`` with ``client_id``; the broker's refusal (fails if accepted)."""

    async def attempt() -> str:
        try:
            async with _transport(fleet, user, creds).connect(Session(client_id=client_id)):
                pass
        except BrokerUnavailableError as exc:
            return str(exc)
        raise AssertionError(f"{user} logged in as client {client_id}")

    return asyncio.run(attempt())


def _concrete(filter_: str) -> str:
    parts = filter_.split("/")
    if parts[0] == "$share":
        parts = parts[2:]
    return "/".join("probe" if p in ("+", "#") else p for p in parts)


def _what_reaches(
    fleet: SecureFleet,
    user: str,
    client_id: str,
    creds: Path,
    filters: list[str],
    allowed: str,
) -> list[str]:
    """Subscribe as ``user`` to ``filters`` and to ``allowed``; the controller's
    account then publishes to a topic matching each filter, and last to
    ``allowed``. Returns the topics that reached ``user`` before ``allowed``'s
    message (one publisher's messages arrive in order: nothing can come later)."""

    async def scenario() -> list[str]:
        seen: list[str] = []
        async with _transport(fleet, user, creds).connect(Session(client_id=client_id)) as link:
            await link.subscribe([(f, 1) for f in [*filters, allowed]])
            controller = _transport(fleet, "controller")
            async with controller.connect(Session(client_id="controller-probe")) as publisher:
                for filter_ in filters:
                    await publisher.publish(_concrete(filter_), b"{}", qos=1)
                await publisher.publish(allowed, b"{}", qos=1)
            async with asyncio.timeout(DEADLINE_S):
                async for message in link.messages():
                    if message.topic == allowed:
                        return seen
                    seen.append(message.topic)
        return seen

    return asyncio.run(scenario())


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
    try:
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
            lambda: [n.get("online") for n in fleet.nodes().values()] == [True, True],
        )
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


def test_a_node_cannot_take_another_nodes_session(secure: SecureFleet) -> None:
    n2 = secure.root / "bundles" / "n2"
    # n2's client id is bound to n2: with n1's id (taking over n1's session) or any
    # other, n2's credentials are refused, and n1 stays connected.
    assert "Not authorized" in _refused(secure, "n2", "n1", n2)
    assert "Not authorized" in _refused(secure, "n2", "n2-second", n2)
    assert secure.nodes()["n1"]["online"]


def test_nodes_cannot_join_the_controllers_or_read_others(secure: SecureFleet) -> None:
    # Probe with n2's own account and client id while its process is stopped.
    next(p for p in secure.procs if p.name == "n2").terminate()
    base = f"fleet/v1/{FLEET}"
    reached = _what_reaches(
        secure,
        "n2",
        "n2",
        secure.root / "bundles" / "n2",
        [
            f"$share/controllers/{base}/node/+/results",
            f"$share/controllers/{base}/ctl/request",
            f"{base}/node/n1/cmd",
            f"{base}/node/n1/ack",
            f"{base}/ctl/reply/admin",
            f"{base}/#",
        ],
        allowed=f"{base}/node/n2/cmd",
    )
    assert reached == []
    secure.node("n2")
    secure.wait("n2 back", lambda: secure.nodes()["n2"]["online"])


def test_operators_are_who_their_key_says_and_do_what_their_role_allows(
    secure: SecureFleet,
) -> None:
    denied = secure.fleetctl("vera", "node", "revoke", "n2", rc=2)
    assert "needs the admin role" in denied.stderr
    assert not secure.nodes()["n2"]["revoked"]
    # vera cannot sign as admin: her key is not admin's, and the controller says nothing.
    vera_key = str(secure.keys / "operators" / "vera.pem")
    borrowed = secure.fleetctl(
        "vera", "node", "revoke", "n2", "--operator", "admin", "--operator-key", vera_key,
        "--timeout", "3s", rc=1,
    )  # fmt: skip
    assert "no answer" in borrowed.stderr
    # Nor read admin's replies, or other operators' requests: only her own replies reach her.
    reached = _what_reaches(
        secure,
        "vera",
        "vera-probe",
        secure.creds / "vera",
        [f"fleet/v1/{FLEET}/ctl/reply/admin", f"fleet/v1/{FLEET}/ctl/request"],
        allowed=f"fleet/v1/{FLEET}/ctl/reply/vera",
    )
    assert reached == []
    # What a viewer may see, the console shows.
    top = secure.json("vera", "top", "--once", "--interval", "3s")
    assert {n["node"] for n in top["nodes"]} == {"n1", "n2"}
    audit = secure.call("vera", "audit.list")
    assert (audit[0]["operator"], audit[0]["action"], audit[0]["outcome"]) == (
        "vera",
        "node.revoke",
        "denied",
    )


def _versions(secure: SecureFleet) -> dict[str, str | None]:
    """The model version each node announces (None: no model)."""
    return {n: (v["model"] or {}).get("version") for n, v in secure.nodes().items()}


def _roll_out(secure: SecureFleet, version: str, *, seed: int, rollout_id: str) -> dict[str, Any]:
    """dave adds a classifier ``clf@version`` and rolls it out to every node; the
    rollout's final status."""
    model = make_classifier(secure.root / f"classifier-{version}.onnx", seed=seed)
    secure.fleetctl("dave", "model", "add", str(model), "--name", "clf", "--version", version)
    secure.fleetctl(
        "dave", "rollout", "start", f"clf@{version}", "--id", rollout_id, "--waves", "100",
        "--select", "", "--health-window", "0s", "--wave-timeout", "60s",
    )  # fmt: skip
    ended = ("succeeded", "failed", "halted", "aborted", "rolled_back")

    def final() -> dict[str, Any] | None:
        status = secure.call("vera", "rollout.status", {"rollout_id": rollout_id})
        return dict(status) if status["state"] in ended else None

    # A node that already reports runs of the new model waits for enough samples, at
    # most until the wave times out (60 s): give the rollout that and some.
    return dict(secure.wait("the rollout to end", final, timeout_s=2 * DEADLINE_S))


def test_a_deployer_rolls_a_model_out_through_the_lanes(secure: SecureFleet) -> None:
    """The positive control of the node's lanes: commands, chunks, statuses, acks."""
    assert _roll_out(secure, "1.0.0", seed=1, rollout_id="r1")["state"] == "succeeded"
    # Each node's new birth (what `nodes` shows) may land just after its last status.
    secure.wait(
        "both nodes on clf 1.0.0", lambda: _versions(secure) == {"n1": "1.0.0", "n2": "1.0.0"}
    )


def _publish_as_controller(secure: SecureFleet, topic: str, data: bytes) -> None:
    """What a hostile broker (or a stolen controller account) can publish anywhere."""

    async def publish() -> None:
        transport = _transport(secure, "controller")
        async with transport.connect(Session(client_id="controller-attacker")) as link:
            await link.publish(topic, data, qos=1)

    asyncio.run(publish())


def _command(key: SigningKey, node: str, *, seq: int) -> bytes:
    _, envelope = sign_command(
        key,
        fleet=FLEET,
        seq=seq,
        target=NodeTarget(node=node),
        body=CancelAction(),
        now=time.time(),
        rollout_id="attack",
    )
    return envelope.to_bytes()


def test_no_command_bricks_a_node_and_no_planted_trust_list_takes_over(
    secure: SecureFleet,
) -> None:
    n1 = next(p for p in secure.procs if p.name == "n1" and p.running)
    rollout_key = load_key(secure.keys, Role.ROLLOUT, None)
    # 1. A genuinely signed command with the largest seq: refused as out of bounds.
    _publish_as_controller(
        secure, f"fleet/v1/{FLEET}/node/n1/cmd", _command(rollout_key, "n1", seq=2**63 - 1)
    )
    secure.wait("the refusal", lambda: "rejected command (out_of_bounds)" in n1.log_text())
    # 2. A trust list of the attacker's own, planted in the data directory; restart.
    attacker = SigningKey.generate()
    planted = TrustList.build(
        version=99,
        expires_at=time.time() + 86_400,
        roles={Role.ROOT: [attacker], Role.RELEASE: [attacker], Role.ROLLOUT: [attacker]},
    )
    planted_bytes = sign_trust_list(planted, [attacker]).to_bytes()
    data = secure.root / "data" / "n1"
    (data / "trust.json").write_bytes(planted_bytes)
    (data / "trust-chain.json").write_text(json.dumps([json.loads(planted_bytes)]))
    n1.terminate()
    n1 = secure.node("n1")
    secure.wait("n1 back", lambda: secure.nodes()["n1"]["online"])
    _publish_as_controller(secure, f"fleet/v1/{FLEET}/node/n1/cmd", _command(attacker, "n1", seq=1))
    secure.wait(
        "the refusal", lambda: "unknown_key" in n1.log_text() or "signed by a key" in n1.log_text()
    )
    # 3. The positive control: the fleet's own rollout still reaches n1.
    assert _roll_out(secure, "1.1.0", seed=2, rollout_id="r2")["state"] == "succeeded"
    secure.wait("n1 on clf 1.1.0", lambda: _versions(secure).get("n1") == "1.1.0")


def test_malformed_operator_input_is_refused_and_the_controller_serves_on(
    secure: SecureFleet,
) -> None:
    async def scenario() -> None:
        dave = OperatorIdentity.load(secure.keys, "dave")
        transport = _transport(secure, "dave")
        async with CtlClient(transport, fleet=FLEET, identity=dave, timeout_s=60) as ctl:
            with pytest.raises(OperationError) as refused:
                await ctl.call("rollout.start", {"model": "clf@1.0.0", "activate_at": -1})
            assert refused.value.code == 2
            assert "activate_at" in str(refused.value)
            models = await ctl.call("model.list")
            assert {m["version"] for m in models} >= {"1.0.0"}

    asyncio.run(scenario())


def _counter(secure: SecureFleet, name: str) -> int:
    return int(secure.call("vera", "report")["controller"].get(name, 0))


def test_a_replayed_request_runs_once_and_a_forged_ack_frees_nothing(
    secure: SecureFleet,
) -> None:
    before = _counter(secure, "ctl_replays")

    async def replay() -> tuple[str, str]:
        dave = OperatorIdentity.load(secure.keys, "dave")
        request = OperatorRequest(
            id="replayed-1",
            operator="dave",
            nonce=secrets.token_hex(16),
            op="node.label",
            args={"node_id": "n1", "set": {"replayed": "yes"}},
            issued_at=time.time(),
            expires_at=time.time() + 60,
        )
        signed = sign_envelope(encode(request), PAYLOAD_REQUEST, [dave.key]).to_bytes()
        transport = _transport(secure, "dave")
        async with transport.connect(Session(client_id="dave-replay")) as link:
            await link.subscribe([(f"fleet/v1/{FLEET}/ctl/reply/dave", 1)])
            for _ in range(3):  # the original and two copies, as a hostile broker would
                await link.publish(f"fleet/v1/{FLEET}/ctl/request", signed, qos=1)
            async with asyncio.timeout(DEADLINE_S):
                message = await anext(aiter(link.messages()))
        return request.id, decode(OperatorReply, message.payload).id

    request_id, answered = asyncio.run(replay())
    assert answered == request_id
    # Both copies were dropped as replays (the controller counts each), never run.
    secure.wait("both copies dropped", lambda: _counter(secure, "ctl_replays") == before + 2)
    audit = [e for e in secure.call("vera", "audit.list") if e["action"] == "node.label"]
    assert [(e["operator"], e["outcome"]) for e in audit] == [("dave", "ok")]

    # A forged ack (the hostile broker has no rollout key) for n1, far ahead.
    n1 = next(p for p in secure.procs if p.name == "n1" and p.running)
    forged = encode(Ack(node="n1", seq=2**62, ts=time.time()))
    _publish_as_controller(secure, f"fleet/v1/{FLEET}/node/n1/ack", forged)
    secure.wait("the refusal", lambda: "refusing an ack" in n1.log_text())
    # Nor is a chunk answered for a blob n2 was never commanded to fetch.
    model = make_classifier(secure.root / "classifier-3.onnx", seed=3)
    added = secure.json("dave", "model", "add", str(model), "--name", "clf", "--version", "1.2.0")
    sha = added["sha256"]
    ask = ArtifactRequest(node="n2", sha256=sha, ranges=((0, 1024),), ts=time.time())
    refused = _counter(secure, "chunks_refused")

    async def request_chunk() -> None:
        transport = _transport(secure, "n2", secure.root / "bundles" / "n2")
        n2 = next(p for p in secure.procs if p.name == "n2" and p.running)
        n2.terminate()  # its own account and bound client id, as a compromised n2 would
        async with transport.connect(Session(client_id="n2")) as link:
            await link.publish(f"fleet/v1/{FLEET}/artifact/{sha}/req/n2", encode(ask), qos=1)

    asyncio.run(request_chunk())
    secure.wait("the chunk refused", lambda: _counter(secure, "chunks_refused") > refused)
    secure.node("n2")
    secure.wait("n2 back", lambda: secure.nodes()["n2"]["online"])


def test_a_revoked_node_is_cut_off_by_the_broker(secure: SecureFleet) -> None:
    revoked = secure.json("admin", "node", "revoke", "n2")
    assert revoked == {"node_id": "n2", "revoked": True, "broker_account_removed": True}
    secure.wait("n2 offline", lambda: not secure.nodes()["n2"]["online"])
    assert "Not authorized" in _refused(secure, "n2", "n2", secure.root / "bundles" / "n2")
    assert secure.nodes()["n1"]["online"]  # the others go on
