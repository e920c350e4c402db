"""Strict JSON decoding and canonical encoding (shared.codec)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import codec
from shared.codec import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_PAYLOAD_BYTES,
    INT64_MAX,
    INT64_MIN,
    decode_json,
    encode_json,
)
from shared.errors import DecodeError
from tests.support.shared_kit import PROPERTY

# ----- table: every reason decode_json refuses a payload ---------------------

REJECTED: list[Any] = [
    pytest.param(b"[" + b"0," * 600_000 + b"0]", id="over-size-limit"),
    pytest.param(b'"\xff"', id="invalid-utf8"),
    pytest.param(b'"\xc3"', id="truncated-utf8"),
    pytest.param(b'"\xed\xa0\x80"', id="utf8-encoded-surrogate"),
    pytest.param(b'"\\ud800"', id="escaped-lone-surrogate"),
    pytest.param(b'{"\\udfff": 1}', id="escaped-lone-surrogate-key"),
    pytest.param(b'{"a": 1, "a": 1}', id="duplicate-key"),
    pytest.param(b'{"a": {"b": 1, "b": 2}}', id="duplicate-key-nested"),
    pytest.param(b'[{"x": [{"k": 1, "k": 1}]}]', id="duplicate-key-in-list"),
    pytest.param(b"NaN", id="nan"),
    pytest.param(b"[Infinity]", id="infinity"),
    pytest.param(b'{"a": -Infinity}', id="minus-infinity"),
    pytest.param(b"1e999", id="float-overflow"),
    pytest.param(b"-1e999", id="float-overflow-negative"),
    pytest.param(b"1" + b"0" * 400 + b".0", id="float-overflow-long-mantissa"),
    pytest.param(str(INT64_MAX + 1).encode(), id="int-above-int64"),
    pytest.param(str(INT64_MIN - 1).encode(), id="int-below-int64"),
    pytest.param(b"9" * 5000, id="int-5000-digits"),
    pytest.param(b"-" + b"9" * 5000, id="int-5000-digits-negative"),
    pytest.param(b"[" * 10_000, id="deep-unclosed-10000"),
    pytest.param(b"[" * 10_000 + b"]" * 10_000, id="deep-closed-10000"),
    pytest.param(b'{"a":' * 5000 + b"1" + b"}" * 5000, id="deep-objects-5000"),
    pytest.param(b"[" * 33 + b"]" * 33, id="depth-33"),
    pytest.param(b"", id="empty"),
    pytest.param(b"   ", id="whitespace-only"),
    pytest.param(b"{", id="unterminated-object"),
    pytest.param(b'{"a" 1}', id="missing-colon"),
    pytest.param(b"[1,]", id="trailing-comma"),
    pytest.param(b"{'a': 1}", id="single-quotes"),
    pytest.param(b"1 2", id="two-values"),
    pytest.param(b"// c\n1", id="comment"),
    pytest.param(b"01", id="leading-zero"),
    pytest.param(b'"\x01"', id="raw-control-character"),
    pytest.param(b"\xef\xbb\xbf{}", id="utf8-bom"),
]


@pytest.mark.parametrize("payload", REJECTED)
def test_decode_json_rejects(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_json(payload)


def test_size_limit_is_checked_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_parse(*args: object, **kwargs: object) -> object:
        raise AssertionError("payload was parsed before its size was checked")

    monkeypatch.setattr(codec.json, "loads", must_not_parse)
    with pytest.raises(DecodeError, match="exceeds the 8-byte limit"):
        decode_json(b"[1,2,3,4]", max_bytes=8)  # 9 bytes
    with pytest.raises(DecodeError, match="byte limit"):
        decode_json(b"\xff" * (DEFAULT_MAX_PAYLOAD_BYTES + 1))  # not even UTF-8


def test_size_limit_is_inclusive() -> None:
    assert decode_json(b"[1,2,3]", max_bytes=7) == [1, 2, 3]


def test_depth_limit_is_inclusive() -> None:
    nested: Any = 1
    for _ in range(DEFAULT_MAX_DEPTH):
        nested = [nested]
    assert decode_json(encode_json(nested)) == nested
    assert decode_json(b'{"a":{"b":[]}}', max_depth=3) == {"a": {"b": []}}
    with pytest.raises(DecodeError, match="nesting deeper than 2"):
        decode_json(b'{"a":{"b":[]}}', max_depth=2)


ACCEPTED: list[Any] = [
    pytest.param(str(INT64_MAX).encode(), INT64_MAX, id="int64-max"),
    pytest.param(str(INT64_MIN).encode(), INT64_MIN, id="int64-min"),
    pytest.param(b"-0", 0, id="minus-zero-int"),
    pytest.param(b"1.7976931348623157e308", 1.7976931348623157e308, id="largest-float"),
    pytest.param(b"1e-400", 0.0, id="float-underflow-is-zero"),
    pytest.param(b'"\\ud83d\\ude00"', "\U0001f600", id="escaped-surrogate-pair"),
    pytest.param('"ünïcødé"'.encode(), "ünïcødé", id="utf8-text"),
    pytest.param(
        b' {"b": [true, false, null], "a": 1.5} ',
        {"a": 1.5, "b": [True, False, None]},
        id="whitespace",
    ),
]


@pytest.mark.parametrize(("payload", "expected"), ACCEPTED)
def test_decode_json_accepts(payload: bytes, expected: object) -> None:
    assert decode_json(payload) == expected


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1.0, {"a": math.nan}]])
def test_encode_json_refuses_non_finite(value: object) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        encode_json(value)


def test_encode_json_is_compact_sorted_utf8() -> None:
    value = {"b": [1, 2.5, None], "a": {"z": "é", "y": True}}
    assert encode_json(value) == '{"a":{"y":true,"z":"é"},"b":[1,2.5,null]}'.encode()


# ----- properties ---------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=20)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, INT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_TEXT, children, max_size=5),
    max_leaves=30,
)


def _key_orders(payload: bytes) -> list[list[str]]:
    """The key order of every object in ``payload``, as written."""
    orders: list[list[str]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        orders.append([key for key, _ in pairs])
        return dict(pairs)

    json.loads(payload, object_pairs_hook=hook)
    return orders


@PROPERTY
@given(JSON_VALUES)
def test_encode_json_round_trips_and_is_canonical(value: Any) -> None:
    payload = encode_json(value)
    decoded = decode_json(payload)
    assert decoded == value
    assert encode_json(decoded) == payload  # a fixed point: one value, one text
    assert all(order == sorted(order) for order in _key_orders(payload))
    # Compact: the only bytes outside strings are JSON's own tokens.
    assert payload == json.dumps(
        value, separators=(",", ":"), sort_keys=True, ensure_ascii=False
    ).encode("utf-8")


@PROPERTY
@given(st.dictionaries(_TEXT, _SCALARS, max_size=8))
def test_encode_json_ignores_insertion_order(value: dict[str, Any]) -> None:
    reversed_value = dict(reversed(list(value.items())))
    assert encode_json(reversed_value) == encode_json(value)


@PROPERTY
@given(st.recursive(_SCALARS.filter(lambda s: not isinstance(s, str)), st.lists, max_leaves=20))
def test_encode_json_has_no_whitespace_outside_strings(value: Any) -> None:
    payload = encode_json(value)
    assert not set(payload) & set(b" \t\r\n")


def _strict_or_refused(payload: bytes) -> tuple[bool, Any]:
    """``(True, value)`` when ``payload`` decodes, ``(False, None)`` on DecodeError;
    any other exception propagates and fails the test."""
    try:
        return True, decode_json(payload)
    except DecodeError:
        return False, None


@PROPERTY
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_decode_error(payload: bytes) -> None:
    decoded, value = _strict_or_refused(payload)
    assert not decoded or json.loads(payload) == value  # what decodes is plain JSON


@PROPERTY
@given(st.text(max_size=200))
def test_random_text_only_raises_decode_error(text: str) -> None:
    payload = text.encode("utf-8", "surrogatepass")
    decoded, value = _strict_or_refused(payload)
    assert not decoded or json.loads(payload) == value


JUNK_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond int64 too
    | st.floats()  # NaN and infinities too
    | st.text(max_size=10)
)
JUNK = st.recursive(
    JUNK_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=25,
)


@PROPERTY
@given(JUNK)
def test_json_ish_junk_only_raises_decode_error(value: Any) -> None:
    try:
        payload = json.dumps(value).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return
    try:
        decoded = decode_json(payload)
    except DecodeError:
        return
    assert decoded == value  # what is accepted is read exactly


@PROPERTY
@given(st.integers())
def test_integers_decode_iff_int64(number: int) -> None:
    payload = str(number).encode()
    if INT64_MIN <= number <= INT64_MAX:
        assert decode_json(payload) == number
    else:
        with pytest.raises(DecodeError, match="exceeds 64 bits"):
            decode_json(payload)


@pytest.mark.parametrize("depth", [100, 999, 1000, 1001, 5000, 100_000])
def test_deep_nesting_never_raises_recursion_error(depth: int) -> None:
    with pytest.raises(DecodeError, match="nesting deeper"):
        decode_json(b"[" * depth + b"]" * depth)
