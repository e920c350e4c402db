"""The operator API's handlers (fleet_controller.handlers) end to end on the in-memory broker."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from fleet_controller.artifacts import MAX_PARTS, UPLOAD_IDLE_S
from fleet_controller.blobs import BlobStore
from fleet_controller.keys import load_key, rotate_key
from fleet_controller.registry import sign_manifest
from shared import topics
from shared.envelope import Envelope
from shared.labels import parse_selector
from shared.messages import CancelAction, Command, NodeRolloutState, decode
from shared.trust import Role
from tests.unit.fleet_controller.kit import (
    FLEET,
    NOW,
    Controller,
    FakeNode,
    blob,
    controller,
    eventually,
    manifest_for,
    run,
)

N = NodeRolloutState


def upload_args(
    data: bytes, offset: int, chunk: bytes, *, size: int | None = None
) -> dict[str, Any]:
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "offset": offset,
        "size": len(data) if size is None else size,
        "data": base64.b64encode(chunk).decode(),
    }


def signed(ctl: Controller, data: bytes, role: Role = Role.RELEASE, **names: str) -> str:
    key = load_key(ctl.keys, role, None)
    return sign_manifest(manifest_for(data, **names), key).to_bytes().decode()


async def known(ctl: Controller, node: FakeNode, **birth: Any) -> None:
    await node.birth(**birth)
    await eventually("the birth is stored", lambda: ctl.store.nodes.get(node.node_id) is not None)


def test_upload_resumes_and_registers_a_model(tmp_path: Path, keys: Path) -> None:
    data = blob(size=2500)

    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator() as op:
            sha = hashlib.sha256(data).hexdigest()
            not_yet = await op.request("model.add", {"envelope": signed(ctl, data)})
            assert (not_yet.code, not_yet.error) == (1, f"blob {sha[:12]} has not been uploaded")
            assert await op.call("model.upload", upload_args(data, 0, b"")) == {
                "received": 0,
                "complete": False,
            }
            first = upload_args(data, 0, data[:1000])
            assert await op.call("model.upload", first) == {"received": 1000, "complete": False}
            # A resent chunk and one past a gap are not written: the answer says where to go on.
            assert (await op.call("model.upload", first))["received"] == 1000
            gap = upload_args(data, 2000, data[2000:])
            assert (await op.call("model.upload", gap))["received"] == 1000
            rest = upload_args(data, 1000, data[1000:])
            assert await op.call("model.upload", rest) == {"received": 2500, "complete": True}
            assert ctl.service.blobs.path(sha).read_bytes() == data
            assert not list(ctl.service.blobs.root.glob(".*.upload"))
            again = await op.call("model.upload", first)
            assert again == {"received": 2500, "complete": True}
            added = await op.call("model.add", {"envelope": signed(ctl, data)})
            assert (added["name"], added["version"], added["sha256"]) == ("clf", "1.0.0", sha)
            twice = await op.request("model.add", {"envelope": signed(ctl, data, version="1.0.1")})
            assert twice.code == 1
            assert "registered already as clf@1.0.0" in (twice.error or "")
            assert [m["sha256"] for m in await op.call("model.list")] == [sha]
            # The upload is audited once, with the chunk that completed it (and the
            # chunk sent again after, which answered "complete" too).
            audit = [(a["action"], a["outcome"]) for a in await op.call("audit.list")]
            assert audit.count(("model.upload", "ok")) == 2
            assert ("model.add", "ok") in audit

    run(scenario)


def test_bad_uploads_are_refused_and_their_parts_dropped(tmp_path: Path, keys: Path) -> None:
    data = blob(size=2000)

    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator() as op:
            too_big = await op.request("model.upload", upload_args(data, 0, data, size=1000))
            assert (too_big.code, too_big.error) == (2, "upload exceeds its declared size")
            wrong = upload_args(data, 0, data[::-1])
            mismatch = await op.request("model.upload", wrong)
            assert mismatch.code == 1
            assert (mismatch.error or "").startswith("uploaded blob hashes to ")
            assert not list(ctl.service.blobs.root.glob(".*.upload"))
            assert not ctl.service.blobs.has(wrong["sha256"])
            not_base64 = await op.request("model.upload", {**wrong, "data": "%%%"})
            assert not_base64.code == 2
            unsigned = await op.request(
                "model.add", {"envelope": signed(ctl, data, role=Role.ROLLOUT)}
            )
            assert unsigned.code == 1
            audit = await op.call("audit.list")
            # Every refused or failed chunk is audited under the signer's name.
            assert [(a["action"], a["outcome"], a["operator"]) for a in audit] == [
                ("model.add", "failed", "alice"),
                ("model.upload", "refused", "alice"),
                ("model.upload", "failed", "alice"),
                ("model.upload", "refused", "alice"),
            ]

    run(scenario)


def test_rollout_start_takes_every_policy_field(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with (
            controller(tmp_path, keys, tick_s=3600) as ctl,
            ctl.operator() as op,
            ctl.node("n1") as node,
        ):
            no_nodes = await op.request("rollout.start", {"model": "clf@1.0.0"})
            assert no_nodes.code == 1  # unknown model
            ctl.register(blob())
            nobody = await op.request("rollout.start", {"model": "clf@1.0.0"})
            assert (nobody.code, nobody.error) == (1, "selection (all) matches no known node")
            await known(ctl, node, labels={"site": "berlin"})
            started = await op.call(
                "rollout.start",
                {
                    "model": "clf@1.0.0",
                    "rollout_id": "r1",
                    "select": "site=berlin",
                    "waves": [50, 100],
                    "max_error_increase": 0.2,
                    "health_window_s": 5,
                    "activate_at": NOW + 600,
                },
            )
            assert (started["rollout_id"], started["state"], started["waves"]) == (
                "r1",
                "pending",
                [50.0, 100.0],
            )
            spec = ctl.store.rollouts.load("r1").spec
            assert (spec.max_error_increase, spec.health_window_s, spec.activate_at) == (
                0.2,
                5.0,
                NOW + 600,
            )
            assert spec.selector == parse_selector("site=berlin")
            exists = await op.request("rollout.start", {"model": "clf@1.0.0", "rollout_id": "r1"})
            assert (exists.code, exists.error) == (2, "rollout r1 exists already")
            listed = await op.call("rollout.list", {"active_only": True})
            assert [(r["rollout_id"], r["wave"]) for r in listed] == [("r1", 1)]

    run(scenario)


def test_rollout_start_plans_refuses_and_forces(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with (
            controller(tmp_path, keys, tick_s=3600) as ctl,
            ctl.operator() as op,
            ctl.node("n1") as n1,
            ctl.node("n2") as n2,
        ):
            v1 = ctl.register(blob(1))
            ctl.register(blob(2), version="2.0.0")
            ctl.register(blob(3), version="0.9.0")
            await known(ctl, n1, model=v1)
            await known(ctl, n2, model=v1)
            plan = await op.call(
                "rollout.start", {"model": "clf@2.0.0", "rollout_id": "r1", "dry_run": True}
            )
            assert plan["dry_run"] is True
            assert sorted(n for w in plan["waves"] for n in w["nodes"]) == ["n1", "n2"]
            assert (plan["refusing"], plan["overlapping"]) == ([], [])
            assert ctl.store.rollouts.load("r1") is None  # nothing started
            await op.call("rollout.start", {"model": "clf@2.0.0", "rollout_id": "r1"})

            again = {"model": "clf@2.0.0", "rollout_id": "r2"}
            overlap = await op.request("rollout.start", again)
            assert overlap.code == 1
            assert overlap.error.startswith("rollout not started: rollout r1 is active on 2 ")
            planned = await op.call("rollout.start", {**again, "dry_run": True})
            assert planned["overlapping"] == [{"rollout_id": "r1", "nodes": ["n1", "n2"]}]
            forced = await op.call("rollout.start", {**again, "force": True})
            assert forced["rollout_id"] == "r2"

            await op.call("rollout.abort", {"rollout_id": "r1"})
            await op.call("rollout.abort", {"rollout_id": "r2"})
            down = await op.request("rollout.start", {"model": "clf@0.9.0", "force": True})
            assert down.code == 1
            assert down.error.startswith(
                "rollout not started: every selected node (2) would refuse it, e.g. n1: downgrade"
            )

    run(scenario)


def test_rollout_events_abort_and_cancel(
    tmp_path: Path, keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleet_controller")

    async def scenario() -> None:
        async with (
            controller(tmp_path, keys, tick_s=3600) as ctl,
            ctl.operator() as op,
            ctl.node("n1") as node,
        ):
            ctl.register(blob())
            await known(ctl, node)
            await op.call(
                "rollout.start", {"model": "clf@1.0.0", "rollout_id": "r1", "waves": [100]}
            )
            await ctl.service.ticker.tick_all()  # enrols n1 and sends the broadcast
            broadcast = topics.rollout_cmd(FLEET, "r1")
            assert ctl.broker.retained(broadcast) is not None
            await node.status(1, N.DOWNLOADING, rollout_id="r1")
            assert await node.next_ack() == 1
            await ctl.service.ticker.tick_all()  # folds the status in
            events = await op.call("rollout.events", {"rollout_id": "r1"})
            assert [(e["node_id"], e["state"]) for e in events] == [
                ("n1", "queued"),
                ("n1", "downloading"),
            ]
            assert events[0]["id"] < events[1]["id"]
            unknown = await op.request("rollout.events", {"rollout_id": "nope"})
            assert (unknown.code, unknown.error) == (1, "unknown rollout nope")
            paused = await op.call("rollout.pause", {"rollout_id": "r1"})
            assert paused["state"] == "paused"
            assert (await op.call("rollout.resume", {"rollout_id": "r1"}))["state"] == "running"
            aborted = await op.call("rollout.abort", {"rollout_id": "r1"})
            assert (aborted["state"], aborted["reason"]) == ("aborted", "abort by operator")
            assert ctl.broker.retained(broadcast) is None
            command = await node.next_message()
            assert command.topic == topics.node_cmd(FLEET, "n1")
            body = decode(Command, Envelope.from_bytes(command.payload).payload_bytes()).body
            assert isinstance(body, CancelAction)
            again = await op.request("rollout.pause", {"rollout_id": "r1"})
            assert (again.code, again.error) == (1, "rollout cannot pause while aborted")
            audit = await op.call("audit.list")
            assert [(a["action"], a["outcome"]) for a in audit][:2] == [
                ("rollout.pause", "failed"),
                ("rollout.abort", "ok"),
            ]

    run(scenario)
    # What the operator reads in the log: the ticker's steps and the handlers' own.
    where = ("fleet_controller.ticker", "fleet_controller.handlers")
    logged = [r.getMessage() for r in caplog.records if r.name in where]
    assert logged == [
        "rollout r1: started: clf@1.0.0, waves 100%",
        "rollout r1: wave 1/1 started (100% of the selection)",
        "rollout r1: paused by alice",
        "rollout r1: resumed by alice",
        "rollout r1: aborted by alice",
        "rollout r1 ended: aborted: abort by operator",
    ]


def test_trust_push_broadcasts_a_rotation_once(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator() as op:
            version = rotate_key(keys, Role.RELEASE, now=NOW).trust.version
            trust = (keys / "trust.json").read_text()
            (keys / "trust.json").unlink()  # the controller writes what it adopts
            assert await op.call("trust.push", {"trust": trust}) == {
                "version": version,
                "rollout_id": f"trust-v{version}",
            }
            assert ctl.broker.retained(topics.rollout_cmd(FLEET, f"trust-v{version}")) is not None
            assert (keys / "trust.json").read_text() == trust
            same = await op.request("trust.push", {"trust": trust})
            assert same.code == 1

    run(scenario)


def test_nodes_revoke_audit_and_report(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys) as ctl, ctl.operator() as op, ctl.node("n1") as node:
            await known(ctl, node, labels={"site": "a"})
            await op.call("node.revoke", {"node_id": "n1"})
            assert [n["revoked"] for n in await op.call("nodes.list", {"select": "site=a"})] == [
                True
            ]
            assert await op.call("nodes.list", {"select": "site=b"}) == []
            assert len(await op.call("audit.list", {"limit": 1})) == 1
            report = await op.call("report")
            assert "totals" in report
            assert isinstance(report["controller"], dict)

    run(scenario)


def test_uploads_are_bounded_in_size_and_number(tmp_path: Path, keys: Path) -> None:
    async def scenario() -> None:
        async with controller(tmp_path, keys, max_upload_bytes=4000) as ctl, ctl.operator() as op:
            big = blob(size=5000)
            over = await op.request("model.upload", upload_args(big, 0, big[:100]))
            assert over.code == 2
            assert "over this controller's limit of 4000" in (over.error or "")
            for seed in range(MAX_PARTS):
                data = blob(seed=seed, size=2000)
                await op.call("model.upload", upload_args(data, 0, data[:100]))
            one_more = blob(seed=99, size=2000)
            refused = await op.request("model.upload", upload_args(one_more, 0, one_more[:100]))
            assert refused.code == 1
            assert f"{MAX_PARTS} uploads are in progress" in (refused.error or "")
            assert ctl.service.blobs.parts() == MAX_PARTS

    run(scenario)


def test_abandoned_uploads_are_removed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    old, fresh = blob(seed=1, size=100), blob(seed=2, size=100)
    for data in (old, fresh):
        store.append_part(hashlib.sha256(data).hexdigest(), 0, data[:10])
    old_sha = hashlib.sha256(old).hexdigest()
    part = next(p for p in (tmp_path / "blobs").glob(".*.upload") if old_sha in p.name)
    an_hour_ago = time.time() - UPLOAD_IDLE_S - 1
    os.utime(part, (an_hour_ago, an_hour_ago))
    assert store.prune_parts(UPLOAD_IDLE_S) == [old_sha]
    assert (store.part_size(old_sha), store.parts()) == (0, 1)
