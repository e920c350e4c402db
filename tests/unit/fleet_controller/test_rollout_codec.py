"""JSON form of rollout records (fleet_controller.rollout_codec): exact, deterministic, strict."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_controller.rollout_codec import FORMAT, record_from_json, record_to_json
from fleet_controller.rollout_core import NodeProgress, RolloutRecord, RolloutSpec
from shared.errors import DecodeError
from shared.labels import parse_selector
from shared.messages import ModelRef, NodeRolloutState, RolloutState
from tests.support.shared_kit import PROPERTY

NOW = 1_700_000_000.0
V1 = ModelRef(name="resnet", version="1.0.0", sha256="aa" * 32)
V2 = ModelRef(name="resnet", version="2.0.0-rc.1+build.7", sha256="bb" * 32)


def rich_record() -> RolloutRecord:
    spec = RolloutSpec(
        rollout_id="r-42",
        model=V2,
        selector=parse_selector("site in (berlin,paris),tier=edge,!canary"),
        waves=(1.0, 12.5, 100.0),
        max_failures=0.25,
        wave_timeout_s=120.0,
        health_window_s=30.0,
        max_latency_regression=0.2,
        min_latency_regression_ms=2.5,
        max_error_increase=0.05,
        gates=("errors",),
        confidence=0.99,
        min_samples=20,
        breach_evaluations=5,
        auto_rollback=False,
        activate_at=NOW + 3600,
        max_retries=5,
        retry_backoff_s=2.5,
    )
    nodes = {
        "n1": NodeProgress(
            node_id="n1",
            wave=0,
            state=NodeRolloutState.ACTIVATED,
            attempts=2,
            sent_at=NOW,
            activated_at=NOW + 5,
            retry_at=None,
            from_model=V1,
            code=None,
            reason="healthy: 400 runs",
            rollback_sent=False,
            evaluated_ts=NOW + 20,
            runs=400,
            breaches=1,
            passes=0,
        ),
        "n2": NodeProgress(
            node_id="n2",
            wave=1,
            state=NodeRolloutState.FAILED,
            attempts=1,
            sent_at=NOW + 1,
            retry_at=NOW + 11,
            code="digest_mismatch",
            reason="sha256 differs — ü",
            rollback_sent=True,
        ),
        "n3": NodeProgress(node_id="n3", wave=2),
    }
    return RolloutRecord(
        spec=spec,
        state=RolloutState.ROLLING_BACK,
        wave=1,
        wave_started_at=NOW + 2,
        nodes=nodes,
        reason="2 of 3 nodes failed in wave 2",
    )


def test_rich_record_round_trips_exactly() -> None:
    record = rich_record()
    text = record_to_json(record)
    back = record_from_json(text)
    assert back == record
    assert isinstance(back.spec.waves, tuple)
    assert isinstance(back.state, RolloutState)
    assert isinstance(back.nodes["n1"].state, NodeRolloutState)
    assert back.nodes["n1"].from_model == V1
    assert (back.nodes["n1"].evaluated_ts, back.nodes["n1"].breaches) == (NOW + 20, 1)
    assert back.spec.gates == ("errors",)
    assert record_to_json(back) == text


def test_default_record_round_trips() -> None:
    record = RolloutRecord(spec=RolloutSpec(rollout_id="r", model=V1))
    assert record_from_json(record_to_json(record)) == record


def test_output_is_deterministic_whatever_the_mapping_order() -> None:
    record = rich_record()
    shuffled = replace(
        record,
        nodes=dict(reversed(list(record.nodes.items()))),
        spec=replace(record.spec, selector=tuple(reversed(record.spec.selector))),
    )
    assert record_to_json(shuffled) == record_to_json(record)
    text = record_to_json(record)
    canonical = json.dumps(
        json.loads(text), separators=(",", ":"), sort_keys=True, ensure_ascii=False
    )
    assert text == canonical


def test_every_field_is_written() -> None:
    value = json.loads(record_to_json(rich_record()))
    assert set(value) == {"format"} | {f.name for f in fields(RolloutRecord)}
    assert set(value["spec"]) == {f.name for f in fields(RolloutSpec)}
    assert set(value["nodes"]["n1"]) == {f.name for f in fields(NodeProgress)}
    assert value["format"] == FORMAT


def test_ints_given_for_floats_come_back_as_floats() -> None:
    record = RolloutRecord(
        spec=RolloutSpec(rollout_id="r", model=V1, waves=(1, 100), wave_timeout_s=60)
    )
    back = record_from_json(record_to_json(record))
    assert back == record
    assert all(isinstance(w, float) for w in back.spec.waves)
    assert isinstance(back.spec.wave_timeout_s, float)


def test_a_format_1_record_loads_without_its_baseline_samples() -> None:
    old = {
        "format": 1,
        "spec": {"rollout_id": "r", "model": V1.model_dump()},
        "nodes": {
            "n": {
                "node_id": "n",
                "wave": 0,
                "baseline": {"ts": 1.0, "model_sha256": None, "inferences": 1},
            }
        },
    }
    record = record_from_json(json.dumps(old))
    assert record.nodes == {"n": NodeProgress(node_id="n", wave=0)}


def test_a_record_without_optional_keys_takes_defaults() -> None:
    old = {
        "format": 2,
        "spec": {"rollout_id": "r", "model": V1.model_dump()},
        "nodes": {"n": {"node_id": "n", "wave": 0}},
    }
    record = record_from_json(json.dumps(old))
    assert record == RolloutRecord(
        spec=RolloutSpec(rollout_id="r", model=V1), nodes={"n": NodeProgress(node_id="n", wave=0)}
    )


def test_a_label_map_selector_of_an_older_record_means_equality_terms() -> None:
    old = {
        "format": 1,
        "spec": {"rollout_id": "r", "model": V1.model_dump(), "selector": {"site": "a", "hw": "b"}},
    }
    record = record_from_json(json.dumps(old))
    assert record.spec.selector == parse_selector("hw=b,site=a")
    assert json.loads(record_to_json(record))["spec"]["selector"] == "hw=b,site=a"


def test_non_finite_floats_cannot_be_encoded() -> None:
    record = RolloutRecord(spec=RolloutSpec(rollout_id="r", model=V1, wave_timeout_s=float("inf")))
    with pytest.raises(ValueError, match="JSON"):
        record_to_json(record)


def _good() -> dict[str, Any]:
    value: dict[str, Any] = json.loads(record_to_json(rich_record()))
    return value


def _mutate(path: tuple[str, ...], new: Any) -> str:
    """The rich record's JSON with the value at ``path`` replaced (or deleted)."""
    value = _good()
    target = value
    for key in path[:-1]:
        target = target[key]
    if new is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = new
    return json.dumps(value)


_DELETE = object()

BAD_INPUTS = [
    pytest.param("", "invalid JSON", id="empty"),
    pytest.param("{", "invalid JSON", id="truncated"),
    pytest.param("[]", "must be an object", id="list"),
    pytest.param('{"format":1,"format":1}', "duplicate key", id="duplicate-key"),
    pytest.param(_mutate(("format",), 3), "format 3", id="newer-format"),
    pytest.param(_mutate(("format",), _DELETE), "format: field required", id="no-format"),
    pytest.param(_mutate(("spec",), _DELETE), "spec: field required", id="no-spec"),
    pytest.param(_mutate(("extra",), 1), "extra: unknown field", id="unknown-top-key"),
    pytest.param(_mutate(("spec", "colour"), "red"), "unknown field", id="unknown-spec-key"),
    pytest.param(_mutate(("spec", "rollout_id"), _DELETE), "rollout_id", id="no-rollout-id"),
    pytest.param(_mutate(("state",), "exploded"), "unknown state", id="bad-rollout-state"),
    pytest.param(_mutate(("state",), 3), "must be a string", id="state-not-string"),
    pytest.param(_mutate(("wave",), "1"), "wave must be an integer", id="wave-string"),
    pytest.param(_mutate(("wave",), new=True), "wave must be an integer", id="wave-bool"),
    pytest.param(_mutate(("wave",), 1.5), "wave must be an integer", id="wave-float"),
    pytest.param(_mutate(("spec", "waves"), "1,10"), "must be a list", id="waves-string"),
    pytest.param(_mutate(("spec", "waves"), [1, "x"]), r"waves\[1\]", id="waves-item"),
    pytest.param(_mutate(("spec", "auto_rollback"), 1), "true or false", id="bool-as-int"),
    pytest.param(_mutate(("spec", "selector"), {"a": 1}), "selector.a", id="label-not-str"),
    pytest.param(_mutate(("spec", "selector"), "a in b"), "selector: selector", id="bad-selector"),
    pytest.param(_mutate(("spec", "selector"), 3), "must be a string", id="selector-number"),
    pytest.param(_mutate(("spec", "model", "sha256"), "xyz"), "sha256", id="bad-sha"),
    pytest.param(_mutate(("spec", "model", "version"), "1.0"), "version", id="bad-version"),
    pytest.param(_mutate(("spec", "model"), None), "must be an object", id="model-null"),
    pytest.param(_mutate(("nodes",), []), "nodes must be an object", id="nodes-list"),
    pytest.param(_mutate(("nodes", "n1", "state"), "lost"), "unknown state", id="bad-node-state"),
    pytest.param(_mutate(("nodes", "n1", "wave"), _DELETE), "wave: field required", id="no-wave"),
    pytest.param(_mutate(("nodes", "n1", "baseline"), None), "unknown field", id="baseline"),
    pytest.param(_mutate(("spec", "gates"), "errors"), "must be a list", id="gates-string"),
    pytest.param(_mutate(("nodes", "n1", "code"), 7), "must be a string", id="code-number"),
    pytest.param('{"format":1,"wave":NaN}', "non-finite", id="nan"),
    pytest.param('{"format":1,"wave":99999999999999999999}', "64 bits", id="huge-int"),
    pytest.param("[" * 100 + "]" * 100, "nesting", id="deep"),
]


@pytest.mark.parametrize(("text", "message"), BAD_INPUTS)
def test_bad_input_raises_decode_error(text: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        record_from_json(text)


def test_invalid_utf8_and_lone_surrogates_raise_decode_error() -> None:
    with pytest.raises(DecodeError):
        record_from_json(b'{"format":1,"spec":"\xff"}')
    with pytest.raises(DecodeError):
        record_from_json('{"format":1,"reason":"\ud800"}')


# ----- property: any record round-trips ----------------------------------------------------

_ID = st.from_regex(r"[A-Za-z0-9_.-]{1,16}", fullmatch=True)
_TEXT = st.text(st.characters(codec="utf-8"), max_size=20)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False)
_OPT_FLOAT = st.none() | _FLOAT
_INT = st.integers(-(2**63), 2**63 - 1)
_REF = st.builds(
    ModelRef,
    name=st.text(st.characters(codec="utf-8"), min_size=1, max_size=12),
    version=st.sampled_from(["0.0.1", "1.2.3", "2.0.0-rc.1", "10.0.0+b.5"]),
    sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
)
_SPEC = st.builds(
    RolloutSpec,
    rollout_id=_ID,
    model=_REF,
    selector=st.sampled_from(["", "a=b", "a in (x,y),!b,c!=d,e"]).map(parse_selector),
    waves=st.lists(_FLOAT, max_size=5).map(tuple),
    max_failures=_FLOAT,
    wave_timeout_s=_FLOAT,
    health_window_s=_FLOAT,
    max_latency_regression=_FLOAT,
    min_latency_regression_ms=_FLOAT,
    max_error_increase=_FLOAT,
    gates=st.lists(st.sampled_from(["errors", "latency"]), max_size=2).map(tuple),
    confidence=_FLOAT,
    min_samples=_INT,
    breach_evaluations=_INT,
    auto_rollback=st.booleans(),
    activate_at=_OPT_FLOAT,
    max_retries=_INT,
    retry_backoff_s=_FLOAT,
)


@st.composite
def _records(draw: st.DrawFn) -> RolloutRecord:
    keys = draw(st.lists(_TEXT, max_size=4, unique=True))
    nodes = {
        key: draw(
            st.builds(
                NodeProgress,
                node_id=_TEXT,
                wave=_INT,
                state=st.sampled_from(NodeRolloutState),
                attempts=_INT,
                sent_at=_OPT_FLOAT,
                activated_at=_OPT_FLOAT,
                retry_at=_OPT_FLOAT,
                from_model=st.none() | _REF,
                code=st.none() | _TEXT,
                reason=st.none() | _TEXT,
                rollback_sent=st.booleans(),
                evaluated_ts=_OPT_FLOAT,
                runs=_INT,
                breaches=_INT,
                passes=_INT,
            )
        )
        for key in keys
    }
    return RolloutRecord(
        spec=draw(_SPEC),
        state=draw(st.sampled_from(RolloutState)),
        wave=draw(_INT),
        wave_started_at=draw(_OPT_FLOAT),
        nodes=nodes,
        reason=draw(st.none() | _TEXT),
    )


@PROPERTY
@given(_records())
def test_any_record_round_trips(record: RolloutRecord) -> None:
    text = record_to_json(record)
    back = record_from_json(text)
    assert back == record
    assert record_to_json(back) == text
