"""Wire messages (shared.messages): strict decoding, and encode/decode round trips."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from shared.codec import INT64_MAX, INT64_MIN
from shared.envelope import Envelope, Signature
from shared.errors import DecodeError
from shared.histogram import NUM_BUCKETS
from shared.labels import MAX_TERMS, parse_selector
from shared.messages import (
    MESSAGE_TYPES,
    Ack,
    ArtifactRequest,
    CancelAction,
    Capabilities,
    Command,
    ControllerState,
    DeployAction,
    DType,
    InferenceResult,
    InferReply,
    InferRequest,
    LatencyStats,
    Message,
    ModelManifest,
    ModelRef,
    NodeRolloutState,
    NodeState,
    NodeStatus,
    NodeTarget,
    OperatorReply,
    OperatorRequest,
    PeriodStats,
    RollbackAction,
    Telemetry,
    TensorData,
    TensorSpec,
    TopK,
    TrustUpdateAction,
    WarmupInput,
    WaveTarget,
    decode,
    encode,
)
from tests.support.shared_kit import FUZZ, NOW, PROPERTY, SHA, VERSIONS, command, manifest

# ----- strategies, one per model ------------------------------------------------

UTF8 = st.characters(codec="utf-8")  # no lone surrogates: they are not text
IDS = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
SHAS = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
TEXT = st.text(UTF8, max_size=40)
NAMES = st.text(UTF8, min_size=1, max_size=30)
COUNTS = st.integers(0, INT64_MAX)  # the codec bounds every JSON integer to int64
SEQS = st.integers(1, INT64_MAX)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
NON_NEGATIVE = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
TIMESTAMPS = NON_NEGATIVE
LABELS = st.dictionaries(IDS, IDS, max_size=3)
SELECTORS = st.sampled_from(["", "site=a", "site in (a,b),!canary,hw!=pi,gpu"]).map(parse_selector)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def tuples(
    strategy: st.SearchStrategy[Any], min_size: int = 0, max_size: int = 3
) -> st.SearchStrategy[Any]:
    return st.lists(strategy, min_size=min_size, max_size=max_size).map(tuple)


_JSON_SCALARS = st.none() | st.booleans() | st.integers(INT64_MIN, INT64_MAX) | FLOATS | TEXT
_JSON_SHALLOW = (
    _JSON_SCALARS
    | st.lists(_JSON_SCALARS, max_size=3)
    | st.dictionaries(TEXT, _JSON_SCALARS, max_size=3)
)
JSON_VALUES = (
    _JSON_SHALLOW
    | st.lists(_JSON_SHALLOW, max_size=3)
    | st.dictionaries(TEXT, _JSON_SHALLOW, max_size=3)
)

DIMS = st.none() | st.integers(INT64_MIN, INT64_MAX) | st.text(UTF8, max_size=10)
TENSOR_SPECS = st.builds(
    TensorSpec, name=NAMES, dtype=st.sampled_from(DType), shape=tuples(DIMS, max_size=4)
)
WARMUPS = st.builds(
    WarmupInput,
    name=NAMES,
    shape=tuples(st.integers(0, 1_000_000), max_size=4),
    fill=FLOATS,
    values=optional(tuples(FLOATS, max_size=5)),
)
MODEL_REFS = st.builds(ModelRef, name=NAMES, version=VERSIONS, sha256=SHAS)
ENVELOPES = st.builds(
    Envelope,
    payloadType=st.text(UTF8, max_size=40),
    payload=st.text(UTF8, max_size=60),
    signatures=tuples(st.builds(Signature, keyid=SHAS, sig=st.text(UTF8, max_size=100))),
)
URLS = optional(st.from_regex(r"https?://[a-z0-9.:/_-]{0,40}", fullmatch=True))
TENSORS = st.builds(
    TensorData,
    name=NAMES,
    dtype=st.sampled_from(DType),
    shape=tuples(st.integers(0, INT64_MAX), max_size=4),
    data=tuples(FLOATS, max_size=6),
)
RESULTS = st.builds(
    InferenceResult,
    seq=SEQS,
    model=MODEL_REFS,
    input_digest=st.from_regex(r"[0-9a-f]{16,64}", fullmatch=True),
    latency_ms=NON_NEGATIVE,
    ts=TIMESTAMPS,
    topk=optional(tuples(st.builds(TopK, index=COUNTS, label=optional(TEXT), score=FLOATS))),
    tensors=optional(tuples(TENSORS, max_size=2)),
    corner_case=st.booleans(),
    source=optional(TEXT),
)


@st.composite
def _periods(draw: st.DrawFn) -> PeriodStats:
    """A valid period: ascending unique buckets, no more counted runs than inferences."""
    buckets = draw(st.lists(st.integers(0, NUM_BUCKETS - 1), max_size=6, unique=True))
    counts = draw(st.lists(st.integers(0, 1000), min_size=len(buckets), max_size=len(buckets)))
    extra = draw(st.integers(0, 1000))
    return PeriodStats(
        since=draw(TIMESTAMPS),
        inferences=sum(counts) + extra,
        errors=draw(COUNTS),
        latency=tuple(zip(sorted(buckets), counts, strict=True)),
    )


PERIODS = _periods()


STRATEGIES: dict[type[Message], st.SearchStrategy[Any]] = {
    ModelManifest: st.builds(
        ModelManifest,
        name=NAMES,
        version=VERSIONS,
        sha256=SHAS,
        size=st.integers(1, 2**40),
        inputs=tuples(TENSOR_SPECS, min_size=1),
        outputs=tuples(TENSOR_SPECS, min_size=1),
        warmup=tuples(WARMUPS, max_size=2),
        providers=tuples(NAMES),
        class_labels=tuples(TEXT),
        created_at=TIMESTAMPS,
        created_by=TEXT,
        metadata=st.dictionaries(NAMES, TEXT, max_size=3),
    ),
    NodeState: st.builds(
        NodeState,
        node=IDS,
        online=st.booleans(),
        session=COUNTS,
        agent_version=TEXT,
        model=optional(MODEL_REFS),
        previous_model=optional(MODEL_REFS),
        labels=LABELS,
        capabilities=optional(
            st.builds(
                Capabilities,
                providers=tuples(NAMES),
                cpus=COUNTS,
                memory_bytes=COUNTS,
                disk_free_bytes=COUNTS,
                swap_modes=tuples(st.sampled_from(["availability", "resource"]), max_size=2),
            )
        ),
        ts=TIMESTAMPS,
    ),
    Command: st.builds(
        Command,
        command_id=IDS,
        seq=SEQS,
        fleet=IDS,
        rollout_id=optional(IDS),
        issued_at=TIMESTAMPS,
        expires_at=TIMESTAMPS,
        target=st.builds(NodeTarget, node=IDS)
        | st.builds(
            WaveTarget,
            selector=SELECTORS,
            exclude=tuples(IDS),
            bucket_limit=st.integers(0, 10_000),
            wave=st.integers(0, 64),
        ),
        body=st.one_of(
            st.builds(
                DeployAction,
                manifest=ENVELOPES,
                url=URLS,
                activate_at=optional(TIMESTAMPS),
                health_window_s=st.floats(0, 86_400),
            ),
            st.builds(RollbackAction, manifest=ENVELOPES, url=URLS, reason=TEXT),
            st.builds(TrustUpdateAction, trust=ENVELOPES),
            st.just(CancelAction()),
        ),
    ),
    NodeStatus: st.builds(
        NodeStatus,
        node=IDS,
        seq=SEQS,
        command_id=optional(IDS),
        rollout_id=optional(IDS),
        state=st.sampled_from(NodeRolloutState),
        code=optional(TEXT),
        reason=optional(TEXT),
        progress=optional(st.floats(0, 100)),
        model=optional(MODEL_REFS),
        duplicate=st.booleans(),
        ts=TIMESTAMPS,
    ),
    Telemetry: st.builds(
        Telemetry,
        node=IDS,
        ts=TIMESTAMPS,
        uptime_s=NON_NEGATIVE,
        inferences=COUNTS,
        errors=COUNTS,
        skips=COUNTS,
        queue_depth=COUNTS,
        outbox_depth=COUNTS,
        latency=st.builds(
            LatencyStats, p50_ms=NON_NEGATIVE, p95_ms=NON_NEGATIVE, p99_ms=NON_NEGATIVE
        ),
        cpu_percent=NON_NEGATIVE,
        memory_bytes=COUNTS,
        model=optional(MODEL_REFS),
        period=optional(PERIODS),
    ),
    Ack: st.builds(Ack, node=IDS, seq=COUNTS, ts=TIMESTAMPS),
    InferRequest: st.builds(InferRequest, id=IDS, client=IDS, inputs=tuples(TENSORS, min_size=1)),
    InferReply: st.builds(
        InferReply, id=IDS, ok=st.booleans(), result=optional(RESULTS), error=optional(TEXT)
    ),
    ArtifactRequest: st.builds(
        ArtifactRequest,
        node=IDS,
        sha256=SHAS,
        ranges=st.integers(1, 64).map(lambda n: tuple((i << 20, 1 + i) for i in range(n))),
        ts=TIMESTAMPS,
    ),
    ControllerState: st.builds(
        ControllerState,
        controller_id=IDS,
        online=st.booleans(),
        session=COUNTS,
        version=TEXT,
        ts=TIMESTAMPS,
    ),
    OperatorRequest: st.builds(
        OperatorRequest,
        id=IDS,
        operator=IDS,
        nonce=st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
        op=st.from_regex(r"[a-z][a-z0-9_.]{0,20}", fullmatch=True),
        args=st.dictionaries(NAMES, JSON_VALUES, max_size=3),
        issued_at=TIMESTAMPS,
        expires_at=TIMESTAMPS,
    ),
    OperatorReply: st.builds(
        OperatorReply,
        id=IDS,
        ok=st.booleans(),
        code=st.sampled_from([0, 1, 2]),
        error=optional(TEXT),
        result=JSON_VALUES,
    ),
}


def test_every_message_type_has_a_strategy() -> None:
    # A new model in MESSAGE_TYPES without a strategy here fails this test.
    assert set(STRATEGIES) == set(MESSAGE_TYPES)
    assert len(MESSAGE_TYPES) == len(set(MESSAGE_TYPES))


@pytest.mark.parametrize("model", MESSAGE_TYPES, ids=lambda m: m.__name__)
@PROPERTY
@given(data=st.data())
def test_round_trip(model: type[Message], data: st.DataObject) -> None:
    message = data.draw(STRATEGIES[model], label=model.__name__)
    assert isinstance(message, model)
    payload = encode(message)
    assert decode(model, payload) == message
    assert encode(decode(model, payload)) == payload  # encoding is canonical


# ----- table: the reasons decode() refuses a payload ---------------------------


def _ack(**changes: Any) -> bytes:
    fields = {"v": 1, "type": "ack", "node": "n1", "seq": 3, "ts": NOW} | changes
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


def _command_dict(**changes: Any) -> bytes:
    document = json.loads(encode(command())) | changes
    return json.dumps(document).encode()


def _manifest_dict(**changes: Any) -> bytes:
    document = json.loads(encode(manifest())) | changes
    return json.dumps(document).encode()


DECODE_REJECTIONS: list[Any] = [
    pytest.param(Ack, _ack(type="status"), id="wrong-type"),
    pytest.param(Ack, _ack(type="Ack"), id="wrong-type-case"),
    pytest.param(Ack, _ack(v=2), id="wrong-v"),
    pytest.param(Ack, _ack(v=0), id="v-zero"),
    pytest.param(Ack, _ack(v="1"), id="v-as-string"),
    pytest.param(Ack, _ack(v=None), id="v-null"),
    pytest.param(Ack, _ack(extra=1), id="unknown-field"),
    pytest.param(Ack, _ack(v=...), id="missing-v"),
    pytest.param(Ack, _ack(type=...), id="missing-type"),
    pytest.param(Ack, _ack(v=..., type=...), id="missing-header"),
    pytest.param(Ack, _ack(node=...), id="missing-field"),
    pytest.param(Ack, _ack(node="a/b"), id="bad-id"),
    pytest.param(Ack, _ack(node="x" * 65), id="long-id"),
    pytest.param(Ack, _ack(seq=-1), id="negative-count"),
    pytest.param(Ack, _ack(seq="abc"), id="count-not-a-number"),
    pytest.param(Ack, _ack(ts=-0.5), id="negative-timestamp"),
    pytest.param(Ack, _ack(ts=float("nan")), id="nan-timestamp"),
    pytest.param(Ack, _ack(ts=float("inf")), id="infinite-timestamp"),
    pytest.param(Ack, _ack(seq=INT64_MAX + 1), id="int-beyond-int64"),
    pytest.param(Ack, b"[]", id="not-an-object"),
    pytest.param(Ack, b"null", id="null"),
    pytest.param(Ack, b'"ack"', id="string"),
    pytest.param(Ack, b"{", id="invalid-json"),
    pytest.param(Ack, b'{"type":"ack","type":"ack","node":"n","seq":1,"ts":1}', id="duplicate-key"),
    pytest.param(Ack, encode(command()), id="a-command"),
    pytest.param(Command, encode(Ack(node="n", seq=1, ts=NOW)), id="an-ack-as-command"),
    pytest.param(
        Command,
        _command_dict(target={"kind": "node", "node": "n", "x": 1}),
        id="nested-unknown-field",
    ),
    pytest.param(Command, _command_dict(target={"kind": "everyone"}), id="unknown-target-kind"),
    pytest.param(Command, _command_dict(body={"action": "explode"}), id="unknown-action"),
    pytest.param(Command, _command_dict(seq=0), id="seq-zero"),
    pytest.param(
        Command,
        _command_dict(target={"kind": "wave", "bucket_limit": 10_001, "wave": 0}),
        id="bucket-limit",
    ),
    pytest.param(
        PeriodStats,
        b'{"since":1,"inferences":5,"errors":0,"latency":[[3,1],[2,1]]}',
        id="period-buckets-descending",
    ),
    pytest.param(
        PeriodStats,
        b'{"since":1,"inferences":5,"errors":0,"latency":[[3,1],[3,1]]}',
        id="period-bucket-repeated",
    ),
    pytest.param(
        PeriodStats,
        b'{"since":1,"inferences":1,"errors":0,"latency":[[3,2]]}',
        id="period-histogram-over-inferences",
    ),
    pytest.param(
        PeriodStats,
        b'{"since":1,"inferences":9,"errors":0,"latency":[[128,2]]}',
        id="period-bucket-out-of-range",
    ),
    pytest.param(Command, _command_dict(v=1), id="command-of-version-1"),
    pytest.param(
        Command,
        _command_dict(
            target={"kind": "wave", "bucket_limit": 1, "wave": 0, "selector": {"site": "a"}}
        ),
        id="version-1-label-map-selector",
    ),
    pytest.param(
        Command,
        _command_dict(
            target={
                "kind": "wave",
                "bucket_limit": 1,
                "wave": 0,
                "selector": [{"key": "k", "op": "eq", "values": ["a"]}] * 2,
            }
        ),
        id="selector-repeats-a-term",
    ),
    pytest.param(
        Command,
        _command_dict(
            target={
                "kind": "wave",
                "bucket_limit": 1,
                "wave": 0,
                "selector": [{"key": f"k{i}", "op": "exists"} for i in range(MAX_TERMS + 1)],
            }
        ),
        id="selector-too-many-terms",
    ),
    pytest.param(
        Command,
        _command_dict(
            target={"kind": "wave", "bucket_limit": 1, "wave": 0, "exclude": ["n"] * 4097}
        ),
        id="too-many-exclusions",
    ),
    pytest.param(
        Command,
        _command_dict(target={"kind": "wave", "bucket_limit": 1, "wave": 0, "exclude": ["a/b"]}),
        id="exclusion-not-an-id",
    ),
    pytest.param(ModelManifest, _manifest_dict(version="1.0"), id="version-not-semver"),
    pytest.param(ModelManifest, _manifest_dict(version="1.0.0\n"), id="version-trailing-newline"),
    pytest.param(
        ModelManifest, _manifest_dict(version="1.0.0-01"), id="version-leading-zero-prerelease"
    ),
    pytest.param(ModelManifest, _manifest_dict(version="1\u0663.0.0"), id="version-unicode-digit"),
    pytest.param(ModelManifest, _manifest_dict(sha256=SHA.upper()), id="sha256-uppercase"),
    pytest.param(ModelManifest, _manifest_dict(size=0), id="size-zero"),
    pytest.param(ModelManifest, _manifest_dict(inputs=[]), id="no-inputs"),
    pytest.param(ModelManifest, _manifest_dict(name=""), id="empty-name"),
    pytest.param(ModelManifest, _manifest_dict(created_by="x" * 513), id="text-too-long"),
    pytest.param(
        ModelManifest, _manifest_dict(class_labels=["\ud800"]), id="escaped-lone-surrogate"
    ),
    pytest.param(
        OperatorRequest,
        json.dumps(
            {
                "type": "ctl_request",
                "id": "i",
                "operator": "o",
                "nonce": "0" * 32,
                "op": "x",
                "args": {"a": "\ud800"},
                "issued_at": 1,
                "expires_at": 1,
            }
        ).encode(),
        id="lone-surrogate-in-any",
    ),
    pytest.param(
        OperatorRequest,
        encode(command()).replace(b'"command"', b'"ctl_request"'),
        id="op-fields-missing",
    ),
    pytest.param(
        NodeStatus,
        json.dumps(
            {"type": "status", "node": "n", "seq": 1, "state": "exploded", "ts": 1}
        ).encode(),
        id="unknown-enum",
    ),
    pytest.param(
        NodeStatus,
        json.dumps(
            {"type": "status", "node": "n", "seq": 1, "state": "queued", "progress": 100.5, "ts": 1}
        ).encode(),
        id="progress-over-100",
    ),
]


@pytest.mark.parametrize(("model", "payload"), DECODE_REJECTIONS)
def test_decode_rejects(model: type[BaseModel], payload: bytes) -> None:
    with pytest.raises(
        DecodeError, match=r"^(invalid|duplicate|payload|string|integer|non-finite|number)"
    ):
        decode(model, payload)


def test_decode_size_limit_comes_first() -> None:
    payload = encode(Ack(node="n", seq=1, ts=NOW))
    assert decode(Ack, payload, max_bytes=len(payload)) == Ack(node="n", seq=1, ts=NOW)
    with pytest.raises(DecodeError, match="byte limit"):
        decode(Ack, payload, max_bytes=len(payload) - 1)
    with pytest.raises(DecodeError, match="byte limit"):
        decode(Ack, b"\xff" * 100, max_bytes=99)


def test_decode_accepts_the_written_form() -> None:
    assert decode(Ack, _ack()) == Ack(node="n1", seq=3, ts=NOW)
    assert decode(ModelManifest, encode(manifest())).ref == ModelRef(
        name="resnet", version="1.2.0", sha256=SHA
    )


# ----- properties: junk never escapes as anything but DecodeError --------------

JUNK_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
JUNK = st.recursive(
    JUNK_LEAVES,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)


def _decode_only_decode_error(model: type[BaseModel], payload: bytes) -> bool | None:
    """``None`` when ``payload`` is refused with DecodeError, else whether what decoded
    survives being written back and read again; any other exception fails the test."""
    try:
        decoded = decode(model, payload)
    except DecodeError:
        return None
    assert isinstance(decoded, model)
    return decode(model, encode(decoded)) == decoded


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("model", MESSAGE_TYPES, ids=lambda m: m.__name__)
@FUZZ
@given(
    payload=st.binary(max_size=120)
    | st.text(max_size=120).map(lambda t: t.encode("utf-8", "surrogatepass"))
)
def test_random_bytes_and_text_only_raise_decode_error(
    model: type[Message], payload: bytes
) -> None:
    assert _decode_only_decode_error(model, payload) is not False


@pytest.mark.parametrize("model", MESSAGE_TYPES, ids=lambda m: m.__name__)
@FUZZ
@given(data=st.data())
def test_json_ish_junk_only_raises_decode_error(model: type[Message], data: st.DataObject) -> None:
    fields = dict.fromkeys(model.model_fields, JUNK)
    document = data.draw(JUNK | st.fixed_dictionaries({}, optional=fields))
    assert _decode_only_decode_error(model, _dumps(document)) is not False


@pytest.mark.parametrize("model", MESSAGE_TYPES, ids=lambda m: m.__name__)
@FUZZ
@given(data=st.data())
def test_mutated_valid_message_only_raises_decode_error(
    model: type[Message], data: st.DataObject
) -> None:
    document = json.loads(encode(data.draw(STRATEGIES[model])))
    key = data.draw(st.sampled_from(sorted(document)))
    how = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if how == "replace":
        document[key] = data.draw(JUNK)
    elif how == "delete":
        del document[key]
    else:
        document[data.draw(st.text(max_size=8))] = data.draw(JUNK)
    assert _decode_only_decode_error(model, _dumps(document)) is not False
