"""Pure parsers (and, for help texts, formatters) of ``fleetctl`` flag values.

Every parser takes the text an operator typed and returns a value or raises
:class:`~shared.errors.UsageError` (exit 2) with a one-line reason; none of
them reads a file, the environment or the clock (``now`` is passed in). The
formatters are the parsers' inverses: ``parse_duration(format_duration(s)) == s``,
so a default shown in ``--help`` is one an operator can type back.

Numeric flags are range-checked by argparse itself: :func:`whole_number` and
:func:`number` make ``type=`` functions that refuse text that is not a finite
number within the flag's bounds (argparse then prints one line, exit 2).

Importing this module is cheap (every ``fleetctl`` command and ``--help`` does):
the parsers that need the wire models (pydantic) import them when they run.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from shared.errors import DecodeError, UsageError
from shared.topics import check_id
from shared.version import SemVer

if TYPE_CHECKING:
    from pydantic import ValidationError

    from shared.messages import WarmupInput

__all__ = [
    "check_node_username",
    "first_error",
    "format_duration",
    "format_fraction",
    "format_waves",
    "named",
    "number",
    "parse_activate_at",
    "parse_duration",
    "parse_fraction",
    "parse_model_ref",
    "parse_names",
    "parse_positive_duration",
    "parse_select",
    "parse_shape",
    "parse_warmup_input",
    "parse_waves",
    "whole_number",
]

_NUMBER = r"\d+(?:\.\d+)?"
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)", re.ASCII)
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+", re.ASCII)
_FRACTION = re.compile(rf"({_NUMBER})(%?)", re.ASCII)
_MAX_FLAG_CHARS = 64


def named(option: str, parse: Callable[[str], Any], text: str) -> Any:
    """``parse(text)``, naming ``option`` in the error.

    Raises:
        UsageError: ``parse`` raised a DecodeError; the message starts with ``option``.
    """
    try:
        return parse(text)
    except DecodeError as exc:
        raise UsageError(f"{option}: {exc}") from None


def first_error(exc: ValidationError) -> str:
    """The first problem pydantic found, as ``field: message``."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90`` (seconds), ``90s``, ``250ms``, ``5m``, ``1h30m``, ``2d``.

    Raises:
        UsageError: anything else (negative, empty, unknown unit, not finite).
    """
    value = text.strip()
    if len(value) <= _MAX_FLAG_CHARS:
        if re.fullmatch(_NUMBER, value, re.ASCII):
            return float(value)
        if _DURATION.fullmatch(value):
            return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value))
    raise UsageError(f"invalid duration {text[:40]!r}: use e.g. 90, 60s, 5m, 1h30m")


def parse_positive_duration(text: str, *, maximum_s: float) -> float:
    """:func:`parse_duration`, above zero and at most ``maximum_s``.

    Raises:
        UsageError: not a duration, zero, or longer than ``maximum_s``.
    """
    seconds = parse_duration(text)
    if not 0 < seconds <= maximum_s:
        raise UsageError(
            f"duration {text.strip()[:40]!r} must be above zero and at most "
            f"{format_duration(maximum_s)}"
        )
    return seconds


def whole_number(minimum: int, maximum: int) -> Callable[[str], int]:
    """An argparse ``type=``: a whole number from ``minimum`` to ``maximum``."""

    def parse(text: str) -> int:
        value = text.strip()
        if len(value) <= _MAX_FLAG_CHARS and re.fullmatch(r"[+-]?\d+", value, re.ASCII):
            number = int(value)
            if minimum <= number <= maximum:
                return number
        raise argparse.ArgumentTypeError(
            f"expected a whole number from {minimum} to {maximum}, got {text[:40]!r}"
        )

    return parse


def number(minimum: float, maximum: float, *, above: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a finite number from ``minimum`` (exclusive when
    ``above``) to ``maximum``; NaN and infinities are refused."""
    bounds = (
        f"above {minimum:g} and at most {maximum:g}"
        if above
        else f"from {minimum:g} to {maximum:g}"
    )

    def parse(text: str) -> float:
        try:
            value = float(text) if len(text) <= _MAX_FLAG_CHARS else math.nan
        except ValueError:
            value = math.nan
        in_range = (value > minimum if above else value >= minimum) and value <= maximum
        if math.isfinite(value) and in_range:
            return value
        raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text[:40]!r}")

    return parse


def _plain(value: float) -> str:
    """``value`` without an exponent or trailing zeros (``1.5``, ``300``), as the parsers read."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def format_duration(seconds: float) -> str:
    """``seconds`` in the largest unit that holds it whole: ``5m``, ``90s``, ``1ms``, ``2d``."""
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and (seconds / size).is_integer():
            return f"{_plain(seconds / size)}{unit}"
    if 0 < seconds < 1:
        return f"{_plain(seconds * 1000)}ms"
    return f"{_plain(seconds)}s"


def parse_fraction(text: str, *, maximum: float | None = 1.0) -> float:
    """A fraction from ``10%`` or ``0.1``; at most ``maximum`` (None: no upper bound).

    Raises:
        UsageError: not a non-negative number or percentage, or above ``maximum``.
    """
    match = _FRACTION.fullmatch(text.strip()) if len(text) <= _MAX_FLAG_CHARS else None
    if match is None:
        raise UsageError(f"invalid percentage {text[:40]!r}: use e.g. 10% or 0.1")
    value = float(match.group(1)) / (100 if match.group(2) else 1)
    if maximum is not None and value > maximum:
        hint = "" if match.group(2) else f": write {match.group(1)}% for a percentage"
        raise UsageError(f"{text.strip()} is more than {maximum * 100:g}%{hint}")
    return value


def format_fraction(fraction: float) -> str:
    """``0.1`` as ``10%``."""
    return f"{_plain(fraction * 100)}%"


def parse_waves(text: str) -> list[float]:
    """Cumulative wave sizes in percent: ``1,10,50,100`` (a ``%`` sign is allowed).

    Raises:
        UsageError: empty, not numbers, outside (0, 100], not strictly increasing,
            or more than 64 waves.
    """
    waves: list[float] = []
    for raw in text.split(","):
        match = _FRACTION.fullmatch(raw.strip()) if len(raw) <= _MAX_FLAG_CHARS else None
        if match is None:
            raise UsageError(f"invalid wave {raw.strip()[:20]!r}: use percentages like 1,10,50,100")
        percent = float(match.group(1))
        if not 0 < percent <= 100:
            raise UsageError(f"wave {raw.strip()} must be in (0, 100] percent")
        if waves and percent <= waves[-1]:
            raise UsageError(f"waves must grow: {percent:g}% after {waves[-1]:g}%")
        waves.append(percent)
    if len(waves) > 64:
        raise UsageError("at most 64 waves")
    return waves


def format_waves(waves: Sequence[float]) -> str:
    """``(1.0, 10.0, 100.0)`` as ``1,10,100``."""
    return ",".join(_plain(w) for w in waves)


def parse_select(text: str) -> str:
    """A label selector (:mod:`shared.labels`) in canonical form (empty: every node).

    Raises:
        DecodeError: the text does not follow the selector grammar or its bounds.
    """
    from shared.labels import format_selector, parse_selector

    return format_selector(parse_selector(text))


def parse_model_ref(text: str) -> tuple[str, str]:
    """``NAME@VERSION`` → (name, version).

    Raises:
        UsageError / VersionError: no ``@``, an invalid name, or not a semantic version.
    """
    name, sep, version = text.partition("@")
    if not sep:
        raise UsageError(f"model {text[:80]!r} must be NAME@VERSION, e.g. classifier@1.2.0")
    SemVer.parse(version)
    return check_id(name, "model name"), version


def parse_shape(text: str) -> tuple[int, ...]:
    """A tensor shape: ``1x8``, ``[1,8]``, ``8``, or ``[]`` (a scalar).

    Raises:
        UsageError: a dimension is not a non-negative integer.
    """
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1].strip()
        parts = [p.strip() for p in inner.split(",")] if inner else []
    elif value:
        parts = value.split("x")
    else:
        parts = []
    if not all(p.isascii() and p.isdigit() and len(p) <= 7 for p in parts):
        raise UsageError(f"invalid shape {text[:40]!r}: use e.g. 1x8, [1,8] or [] for a scalar")
    return tuple(int(p) for p in parts)


def parse_warmup_input(text: str) -> WarmupInput:
    """``NAME=SHAPE`` (zeros) or ``NAME=SHAPE:VALUE`` (every element ``VALUE``).

    ``input=1x8``, ``sample_rate=[]:16000``. The name may contain ``:`` (as
    TensorFlow exports do), so the last ``=`` separates name and shape.

    Raises:
        UsageError: the text does not have that form, or the value is not finite.
    """
    name, sep, spec = text.rpartition("=")
    if not sep or not name:
        raise UsageError(
            f"invalid warm-up input {text[:60]!r}: use NAME=SHAPE or NAME=SHAPE:VALUE, "
            "e.g. input=1x8 or sample_rate=[]:16000"
        )
    shape_text, colon, value_text = spec.partition(":")
    shape = parse_shape(shape_text)
    fill = 0.0
    if colon:
        try:
            fill = float(value_text)
        except ValueError:
            fill = math.nan
        if not math.isfinite(fill):
            raise UsageError(f"warm-up input {name!r}: value {value_text[:40]!r} is not a number")
    from pydantic import ValidationError

    from shared.messages import WarmupInput

    try:
        return WarmupInput(name=name, shape=shape, fill=fill)
    except ValidationError as exc:
        raise UsageError(f"warm-up input {name[:40]!r}: {first_error(exc)}") from None


def parse_activate_at(text: str, *, now: float) -> float:
    """UNIX seconds from ``1767225600``, ISO 8601 with a zone, or ``+DURATION`` from ``now``.

    A time without a zone is refused rather than guessed (local? UTC?).

    Raises:
        UsageError: unreadable, without a time zone, or in the past.
    """
    value = text.strip()
    if value.startswith("+"):
        when = now + parse_duration(value[1:])
    elif re.fullmatch(_NUMBER, value, re.ASCII):
        when = float(value)
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise UsageError(
                f"invalid time {text[:40]!r}: use ISO 8601 with a zone "
                "(2026-03-01T02:00:00Z), UNIX seconds, or +DURATION (+30m)"
            ) from None
        if moment.tzinfo is None:
            raise UsageError(f"time {value!r} has no time zone: add Z or an offset like +01:00")
        when = moment.timestamp()
    if when < now:
        raise UsageError(f"activation time {value!r} is in the past")
    return when


def check_node_username(node_id: str) -> str:
    """A node id that may become a broker username.

    Raises:
        UsageError: not a valid id, or reserved: ``controller`` and ``operator*``
            have ACL rights of their own, and the ACL's node patterns apply to them.
    """
    check_id(node_id, "node id")
    lowered = node_id.lower()
    if lowered == "controller" or lowered.startswith("operator"):
        raise UsageError(
            f"node id {node_id!r} is reserved: 'controller' and 'operator*' usernames "
            "have broker rights of their own"
        )
    return node_id


def parse_names(text: str, what: str) -> list[str]:
    """``a,b`` → broker usernames (each a valid id, no repeats).

    Raises:
        UsageError: an invalid id or a repeat.
    """
    names: list[str] = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        check_id(raw, f"{what} name")
        if raw in names:
            raise UsageError(f"{what} {raw!r} is given twice")
        names.append(raw)
    return names
