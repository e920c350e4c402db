"""The one builder of signed-command bodies (fleet_controller.commands), table-tested."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleet_controller.commands import (
    CommandPlan,
    MissingManifestError,
    artifact_url,
    manifests_needed,
    plan_command,
    plan_trust_update,
)
from fleet_controller.rollout_core import RolloutRecord, RolloutSpec, SendNode, SendWave
from shared.envelope import PAYLOAD_MANIFEST, Envelope
from shared.labels import parse_selector
from shared.messages import (
    CancelAction,
    DeployAction,
    ModelRef,
    NodeTarget,
    RollbackAction,
    TrustUpdateAction,
    WaveTarget,
)

SELECTOR = parse_selector("site in (berlin,paris),!canary")
NEW = ModelRef(name="clf", version="2.0.0", sha256="b" * 64)
OLD = ModelRef(name="clf", version="1.0.0", sha256="a" * 64)
NEW_ENV = Envelope(payloadType=PAYLOAD_MANIFEST, payload="bmV3", signatures=())
OLD_ENV = Envelope(payloadType=PAYLOAD_MANIFEST, payload="b2xk", signatures=())
MANIFESTS = {NEW.sha256: NEW_ENV, OLD.sha256: OLD_ENV}
BASE = "http://ctl:8080/"
SPEC = RolloutSpec(rollout_id="r1", model=NEW, selector=SELECTOR, activate_at=1_900_000_000.0)
RECORD = RolloutRecord(spec=SPEC, reason="wave 1 failed")

# name, action, artifact base -> the expected target and body (None: nothing to send)
CASES: list[tuple[str, SendWave | SendNode, str | None, CommandPlan | None]] = [
    (
        "wave broadcast",
        SendWave(wave=1, bucket_limit=1000),
        None,
        CommandPlan(
            WaveTarget(selector=SELECTOR, bucket_limit=1000, wave=1),
            DeployAction(manifest=NEW_ENV, activate_at=1_900_000_000.0, url=None),
        ),
    ),
    (
        "wave broadcast excluding relabelled nodes",
        SendWave(wave=1, bucket_limit=1000, exclude=("n7", "n9")),
        None,
        CommandPlan(
            WaveTarget(selector=SELECTOR, exclude=("n7", "n9"), bucket_limit=1000, wave=1),
            DeployAction(manifest=NEW_ENV, activate_at=1_900_000_000.0, url=None),
        ),
    ),
    (
        "wave broadcast over HTTP",
        SendWave(wave=0, bucket_limit=100),
        BASE,
        CommandPlan(
            WaveTarget(selector=SELECTOR, bucket_limit=100, wave=0),
            DeployAction(
                manifest=NEW_ENV,
                activate_at=1_900_000_000.0,
                url=f"http://ctl:8080/artifacts/{NEW.sha256}",
            ),
        ),
    ),
    (
        "per-node deploy (retry, late joiner)",
        SendNode("n1", "deploy"),
        None,
        CommandPlan(
            NodeTarget(node="n1"),
            DeployAction(manifest=NEW_ENV, activate_at=1_900_000_000.0, url=None),
        ),
    ),
    (
        "per-node deploy over HTTP",
        SendNode("n1", "deploy"),
        BASE,
        CommandPlan(
            NodeTarget(node="n1"),
            DeployAction(
                manifest=NEW_ENV,
                activate_at=1_900_000_000.0,
                url=f"http://ctl:8080/artifacts/{NEW.sha256}",
            ),
        ),
    ),
    (
        "rollback to the previous model",
        SendNode("n2", "rollback", OLD),
        BASE,
        CommandPlan(
            NodeTarget(node="n2"),
            RollbackAction(
                manifest=OLD_ENV,
                reason="wave 1 failed",
                url=f"http://ctl:8080/artifacts/{OLD.sha256}",
            ),
        ),
    ),
    ("rollback without a previous model", SendNode("n2", "rollback", None), None, None),
    ("cancel", SendNode("n3", "cancel"), BASE, CommandPlan(NodeTarget(node="n3"), CancelAction())),
]


@pytest.mark.parametrize(
    ("action", "base", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_action_becomes_one_command(
    action: SendWave | SendNode, base: str | None, expected: CommandPlan | None
) -> None:
    assert plan_command(RECORD, action, MANIFESTS, base) == expected


def test_deploys_leave_the_health_window_to_the_controller() -> None:
    for action in (SendWave(wave=0, bucket_limit=100), SendNode("n1", "deploy")):
        plan = plan_command(RECORD, action, MANIFESTS, None)
        assert plan is not None
        assert isinstance(plan.body, DeployAction)
        assert plan.body.health_window_s == DeployAction.model_fields["health_window_s"].default
        assert "health_window_s" not in plan.body.model_dump(exclude_defaults=True)


def test_a_rollback_without_reason_says_rollback() -> None:
    plan = plan_command(
        replace(RECORD, reason=None), SendNode("n2", "rollback", OLD), MANIFESTS, None
    )
    assert plan is not None
    assert isinstance(plan.body, RollbackAction)
    assert plan.body.reason == "rollback"


@pytest.mark.parametrize(
    ("action", "needed"),
    [
        (SendWave(wave=0, bucket_limit=100), (NEW.sha256,)),
        (SendNode("n1", "deploy"), (NEW.sha256,)),
        (SendNode("n1", "rollback", OLD), (OLD.sha256,)),
        (SendNode("n1", "rollback", None), ()),
        (SendNode("n1", "cancel"), ()),
    ],
)
def test_manifests_needed(action: SendWave | SendNode, needed: tuple[str, ...]) -> None:
    assert manifests_needed(RECORD, action) == needed


def test_a_missing_manifest_is_named() -> None:
    with pytest.raises(MissingManifestError, match="no registered model with sha256 aaaaaaaaaaaa"):
        plan_command(RECORD, SendNode("n1", "rollback", OLD), {NEW.sha256: NEW_ENV}, None)


def test_topics_and_retention() -> None:
    wave = plan_command(RECORD, SendWave(wave=0, bucket_limit=100), MANIFESTS, None)
    node = plan_command(RECORD, SendNode("n1", "cancel"), MANIFESTS, None)
    assert wave is not None
    assert node is not None
    assert (wave.topic("f1", "r1"), wave.retained) == ("fleet/v1/f1/rollout/r1/cmd", True)
    assert (node.topic("f1", "r1"), node.retained) == ("fleet/v1/f1/node/n1/cmd", False)


def test_a_trust_update_goes_to_every_node() -> None:
    plan = plan_trust_update(OLD_ENV)
    assert plan == CommandPlan(
        WaveTarget(bucket_limit=10_000, wave=0), TrustUpdateAction(trust=OLD_ENV)
    )
    assert plan.retained


@pytest.mark.parametrize(
    ("base", "url"),
    [
        (None, None),
        ("", None),
        ("http://h:1", "http://h:1/artifacts/x"),
        ("http://h:1/", "http://h:1/artifacts/x"),
    ],
)
def test_artifact_url(base: str | None, url: str | None) -> None:
    assert artifact_url(base, "x") == url
