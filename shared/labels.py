"""Node labels and label selectors, identical on the controller and the nodes.

A selector is a conjunction of requirements on a node's labels, written the
Kubernetes way (whitespace around tokens is ignored; empty terms are skipped)::

    selector := "" | term ("," term)*
    term     := KEY "=" VALUE | KEY "==" VALUE | KEY "!=" VALUE
              | KEY "in" "(" VALUE ("," VALUE)* ")"
              | KEY "notin" "(" VALUE ("," VALUE)* ")"
              | KEY | "!" KEY
    KEY, VALUE := [A-Za-z0-9_.-]{1,64}

=====================  ================================================
``k=v`` (``k==v``)     the node has label ``k`` with value ``v``
``k!=v``               it has no label ``k``, or one with another value
``k in (a,b)``         it has label ``k`` with one of the values
``k notin (a,b)``      it has no label ``k``, or one with none of them
``k``                  it has label ``k``, whatever its value
``!k``                 it has no label ``k``
=====================  ================================================

The empty selector matches every node.

Invariants:

* **One typed form.** :class:`Requirement` is the selector on the wire (a list
  of them in a wave command) and in the controller; the text is only for people.
* **Canonical.** :func:`parse_selector` returns the requirements sorted, each
  set's values sorted, and :func:`format_selector` writes that order back, so
  ``parse_selector(format_selector(s)) == canonical(s)`` and two texts that say
  the same terms parse equal.
* **Bounded and strict.** At most :data:`MAX_TERMS` requirements and
  :data:`MAX_VALUES` values per set, text of at most :data:`MAX_SELECTOR_CHARS`;
  a value repeated in a set, a requirement given twice, or two ``=`` terms on
  one key (which could never match) are refused with :class:`DecodeError`,
  whether the selector arrives as text or on the wire.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from shared.errors import DecodeError
from shared.topics import check_id

__all__ = [
    "MAX_LABELS",
    "MAX_SELECTOR_CHARS",
    "MAX_TERMS",
    "MAX_VALUES",
    "LabelOp",
    "Requirement",
    "Selector",
    "WireSelector",
    "canonical",
    "check_selector",
    "format_labels",
    "format_selector",
    "matches",
    "overlay",
    "parse_labels",
    "parse_selector",
]

MAX_TERMS = 32  # requirements in one selector
MAX_VALUES = 64  # values in one ``in`` / ``notin`` set
MAX_SELECTOR_CHARS = 4096  # of a selector's text
MAX_LABELS = 64  # labels on one node


class LabelOp(StrEnum):
    """A requirement's operator, as it travels on the wire."""

    EQ = "eq"
    NE = "ne"
    IN = "in"
    NOTIN = "notin"
    EXISTS = "exists"
    ABSENT = "absent"


_ONE_VALUE = frozenset({LabelOp.EQ, LabelOp.NE})
_SET = frozenset({LabelOp.IN, LabelOp.NOTIN})
_ORDER = {op: index for index, op in enumerate(LabelOp)}

LabelId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class Requirement(BaseModel):
    """One term of a selector: ``key``, an operator and the values it takes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: LabelId
    op: LabelOp
    values: tuple[LabelId, ...] = Field(default=(), max_length=MAX_VALUES)

    @model_validator(mode="after")
    def _arity(self) -> Self:
        count = len(self.values)
        if self.op in _ONE_VALUE and count != 1:
            raise ValueError(f"{self.key}: {self.op.value} takes exactly one value")
        if self.op in _SET and count == 0:
            raise ValueError(f"{self.key}: {self.op.value} takes at least one value")
        if self.op not in _ONE_VALUE | _SET and count:
            raise ValueError(f"{self.key}: {self.op.value} takes no value")
        if len(set(self.values)) != count:
            raise ValueError(f"{self.key}: a value is repeated")
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op is LabelOp.EQ:
            return value == self.values[0]
        if self.op is LabelOp.NE:
            return value != self.values[0]
        if self.op is LabelOp.IN:
            return value is not None and value in self.values
        if self.op is LabelOp.NOTIN:
            return value is None or value not in self.values
        if self.op is LabelOp.EXISTS:
            return value is not None
        return value is None

    def __str__(self) -> str:
        if self.op is LabelOp.EQ:
            return f"{self.key}={self.values[0]}"
        if self.op is LabelOp.NE:
            return f"{self.key}!={self.values[0]}"
        if self.op in _SET:
            return f"{self.key} {self.op.value} ({','.join(sorted(self.values))})"
        return self.key if self.op is LabelOp.EXISTS else f"!{self.key}"

    def sort_key(self) -> tuple[str, int, tuple[str, ...]]:
        return (self.key, _ORDER[self.op], tuple(sorted(self.values)))


Selector = tuple[Requirement, ...]
"""A conjunction of requirements; ``()`` matches every node."""


def check_selector(selector: Sequence[Requirement]) -> Selector:
    """``selector`` if it is within the bounds and says nothing twice.

    Raises:
        DecodeError: more than :data:`MAX_TERMS` requirements, one given twice,
            or two ``=`` terms on one key.
    """
    if len(selector) > MAX_TERMS:
        raise DecodeError(f"selector has {len(selector)} terms, more than {MAX_TERMS}")
    seen: set[tuple[str, int, tuple[str, ...]]] = set()
    equal: set[str] = set()
    for requirement in selector:
        key = requirement.sort_key()
        if key in seen:
            raise DecodeError(f"selector repeats the term {requirement}")
        seen.add(key)
        if requirement.op is LabelOp.EQ:
            if requirement.key in equal:
                raise DecodeError(f"selector repeats key {requirement.key!r}")
            equal.add(requirement.key)
    return tuple(selector)


def _wire_check(selector: Selector) -> Selector:
    try:
        return check_selector(selector)
    except DecodeError as exc:
        raise ValueError(str(exc)) from None


WireSelector = Annotated[
    tuple[Requirement, ...], Field(max_length=MAX_TERMS), AfterValidator(_wire_check)
]
"""A selector as a field of a wire model: the same checks as :func:`check_selector`."""


def canonical(selector: Iterable[Requirement]) -> Selector:
    """``selector`` sorted, every set's values sorted."""
    return tuple(
        sorted(
            (r.model_copy(update={"values": tuple(sorted(r.values))}) for r in selector),
            key=Requirement.sort_key,
        )
    )


# ----- text ----------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
_TOKEN = re.compile(r"\s*(?:(?P<word>[A-Za-z0-9_.-]+)|(?P<sym>!=|==|=|!|\(|\)|,))", re.ASCII)


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    end = len(text.rstrip())
    while position < end:
        match = _TOKEN.match(text, position)
        if match is None:
            bad = text[position:].lstrip()[:1]
            raise DecodeError(f"selector: unexpected {bad!r} in {text[:80]!r}")
        tokens.append(match.group("word") or match.group("sym"))
        position = match.end()
    return tokens


class _Reader:
    """A cursor over a selector's tokens."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> str | None:
        token = self.peek()
        self.at += token is not None
        return token

    def expect(self, wanted: str, after: str) -> None:
        token = self.take()
        if token != wanted:
            raise DecodeError(f"selector: expected {wanted!r} after {after!r}, got {_shown(token)}")

    def name(self, what: str) -> str:
        token = self.take()
        if token is None or not _WORD.fullmatch(token):
            raise DecodeError(f"selector: expected a label {what}, got {_shown(token)}")
        return check_id(token, f"label {what}")


def _shown(token: str | None) -> str:
    return "the end" if token is None else repr(token)


def _term(reader: _Reader) -> Requirement:
    if reader.peek() == "!":
        reader.take()
        return Requirement(key=reader.name("key"), op=LabelOp.ABSENT)
    key = reader.name("key")
    token = reader.peek()
    if token in (None, ","):
        return Requirement(key=key, op=LabelOp.EXISTS)
    reader.take()
    if token in ("=", "==", "!="):
        op = LabelOp.EQ if token in ("=", "==") else LabelOp.NE
        return Requirement(key=key, op=op, values=(reader.name("value"),))
    if token in ("in", "notin"):
        reader.expect("(", f"{key} {token}")
        values = [reader.name("value")]
        while reader.peek() == ",":
            reader.take()
            values.append(reader.name("value"))
        reader.expect(")", values[-1])
        if len(values) > MAX_VALUES:
            raise DecodeError(f"selector: {key} {token} has more than {MAX_VALUES} values")
        if len(set(values)) != len(values):
            raise DecodeError(f"selector: {key} {token} repeats a value")
        return Requirement(key=key, op=LabelOp(token), values=tuple(sorted(values)))
    raise DecodeError(f"selector: expected =, !=, in or notin after {key!r}, got {token!r}")


def parse_selector(text: str) -> Selector:
    """The canonical selector ``text`` writes (see the module docstring); ``""`` is ``()``.

    Raises:
        DecodeError: the text does not follow the grammar, is longer than
            :data:`MAX_SELECTOR_CHARS`, or breaks a bound of :func:`check_selector`.
    """
    if len(text) > MAX_SELECTOR_CHARS:
        raise DecodeError(f"selector is longer than {MAX_SELECTOR_CHARS} characters")
    reader = _Reader(text)
    requirements: list[Requirement] = []
    while reader.peek() is not None:
        if reader.peek() == ",":
            reader.take()
            continue
        requirements.append(_term(reader))
        following = reader.take()
        if following not in (None, ","):
            raise DecodeError(f"selector: expected ',' after {requirements[-1]}, got {following!r}")
    return check_selector(canonical(requirements))


def format_selector(selector: Iterable[Requirement]) -> str:
    """The canonical text of ``selector`` (``""`` for the empty one)."""
    return ",".join(str(r) for r in canonical(selector))


def matches(selector: Iterable[Requirement], labels: Mapping[str, str]) -> bool:
    """True when ``labels`` meet every requirement of ``selector``."""
    return all(r.matches(labels) for r in selector)


# ----- label sets ----------------------------------------------------------------------


def parse_labels(text: str) -> dict[str, str]:
    """A label set from ``k=v,k2=v2`` (empty terms skipped; ``""`` is no label).

    Raises:
        DecodeError: a term is not ``key=value`` with valid ids, a key repeats,
            or there are more than :data:`MAX_LABELS`.
    """
    labels: dict[str, str] = {}
    for raw_term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = raw_term.partition("=")
        if not sep:
            raise DecodeError(f"label {raw_term!r} is not key=value")
        key = check_id(key.strip(), "label key")
        if key in labels:
            raise DecodeError(f"label key {key!r} is given twice")
        labels[key] = check_id(value.strip(), "label value")
    if len(labels) > MAX_LABELS:
        raise DecodeError(f"more than {MAX_LABELS} labels")
    return labels


def format_labels(labels: Mapping[str, str]) -> str:
    """``k=v,k2=v2``, sorted by key: what :func:`parse_labels` reads back."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def overlay(announced: Mapping[str, str], central: Mapping[str, str | None]) -> dict[str, str]:
    """A node's effective labels: what it announces, with the controller's labels on top.

    A central value replaces or adds a label; a central ``None`` removes it.
    """
    effective = dict(announced)
    for key, value in central.items():
        if value is None:
            effective.pop(key, None)
        else:
            effective[key] = value
    return effective
