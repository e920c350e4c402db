"""Strict JSON decoding and canonical encoding for every payload on the wire.

Invariants kept here, before any message logic sees a payload:

* the payload is at most ``max_bytes`` long (checked before parsing);
* it is UTF-8 and one JSON value;
* no string or key holds a lone surrogate (``"\\ud800"`` is valid JSON but no
  UTF-8 text, so :func:`encode_json` could not write it back);
* no object repeats a key (``{"a": 1, "a": 2}`` could mean two things to two parsers);
* no ``NaN``, ``Infinity`` or float that overflows to infinity;
* every integer fits in a signed 64-bit range;
* nesting is at most ``max_depth`` containers deep.

Any violation raises :class:`~shared.errors.DecodeError` with a one-line reason.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from shared.errors import DecodeError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "INT64_MAX",
    "INT64_MIN",
    "decode_json",
    "encode_json",
]

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024  # bytes; a result batch or an artifact chunk fits
DEFAULT_MAX_DEPTH = 32  # containers
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"non-finite number {name} is not allowed")


def _parse_int(text: str) -> int:
    # Bound the digits first: int() of a megabyte of digits is quadratic.
    if len(text.lstrip("-")) > 19:
        raise DecodeError(f"integer {text[:24]}... exceeds 64 bits")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise DecodeError(f"integer {text} exceeds 64 bits")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise DecodeError(f"number {text[:24]} overflows a 64-bit float")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DecodeError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DecodeError("string holds a lone UTF-16 surrogate") from None


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates anywhere in a parsed value (iteratively, no recursion)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key in item:
                _check_text(key)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# Scans of the raw bytes, in C and linear in their length, that keep
# per-value Python work off the common path.
#
# Numbers that may leave int64 or overflow a float have 19+ digits in a row
# or a three-digit exponent; digits (also those inside strings, which only
# costs the slower path) are mapped to "0" and the marks searched for. Only
# then are numbers parsed one by one with checks.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789E", b"000000000e")
_RISKY_MARKS = (b"0" * 19, b"e000", b"e+000", b"e-000")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Nesting: string literals are blanked (the unrolled form runs through a
# string's plain characters at once; without escapes, a split at the quotes
# does) before brackets are counted.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if chr(c) not in "[]{}")


def _risky_numbers(payload: bytes) -> bool:
    zeros = payload.translate(_DIGITS_TO_ZERO)
    return any(mark in zeros for mark in _RISKY_MARKS)


def _deeper_than(payload: bytes, text: str, max_depth: int) -> bool:
    """Whether JSON ``text`` (``payload`` decoded) nests deeper than ``max_depth``.

    Exact for valid JSON; for invalid JSON (refused by the parser anyway) it may
    say either, and says yes at once when no bracket pair is left to remove.

    With no more opening brackets than ``max_depth`` anywhere, it cannot.
    Otherwise strings are blanked and only the brackets kept; more than
    ``max_depth`` opening brackets in a row are too deep at once. Each pass then
    turns the innermost pairs into a mark (so a pair that only the removal
    exposes waits for the next pass) and drops the marks of the pass before. A
    nesting of ``max_depth`` is gone after ``max_depth`` passes, each a few C
    scans of what is left.
    """
    if payload.count(b"[") + payload.count(b"{") <= max_depth:
        return False
    if b"\\" in payload:
        stripped = _STRING.sub('""', text).encode("ascii", "ignore")
    else:  # no escapes: strings lie between alternate quotes
        stripped = b"".join(payload.split(b'"')[0::2])
    brackets = stripped.translate(None, _NOT_BRACKETS)
    if re.search(rb"[{\[]{%d}" % (max_depth + 1), brackets):
        return True  # that many opened in a row: deeper, whatever follows
    for _ in range(max_depth):
        brackets = brackets.translate(None, b"x")
        if not brackets:
            return False
        paired = brackets.replace(b"[]", b"x").replace(b"{}", b"x")
        if paired == brackets:  # no pair left: unbalanced, not JSON; no more passes
            return True
        brackets = paired
    return bool(brackets.translate(None, b"x"))


def decode_json(
    payload: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Parse ``payload`` as strict JSON.

    Raises:
        DecodeError: for any of the violations listed in the module docstring.
    """
    if len(payload) > max_bytes:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"payload is not UTF-8: {exc.reason} at byte {exc.start}") from None
    # Before parsing: json.loads recurses once per level, and a deep nesting
    # costs it a thousand frames before its RecursionError (~0.5 ms a message).
    if _deeper_than(payload, text, max_depth):
        raise DecodeError(f"nesting deeper than {max_depth} levels")
    surrogates = b"\\u" in payload and _SURROGATE_ESCAPE.search(text) is not None
    checked: dict[str, Any] = (
        {"parse_int": _parse_int, "parse_float": _parse_float} if _risky_numbers(payload) else {}
    )
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            **checked,
        )
    except RecursionError:
        raise DecodeError(f"nesting deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise DecodeError(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:  # e.g. int() digit limits
        raise DecodeError(f"invalid JSON number: {exc}") from None
    if surrogates:
        _check_strings(value)
    return value


def encode_json(value: Any) -> bytes:
    """Compact, key-sorted UTF-8 JSON. Refuses NaN and Infinity."""
    return json.dumps(
        value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
