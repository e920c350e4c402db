"""Label selectors and label sets (shared.labels): grammar, semantics, bounds, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.errors import DecodeError
from shared.labels import (
    MAX_TERMS,
    MAX_VALUES,
    LabelOp,
    Requirement,
    Selector,
    canonical,
    check_selector,
    format_labels,
    format_selector,
    matches,
    overlay,
    parse_labels,
    parse_selector,
)
from tests.support.shared_kit import PROPERTY

Op = LabelOp


def req(key: str, op: LabelOp, *values: str) -> Requirement:
    return Requirement(key=key, op=op, values=values)


# ----- parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", (), id="empty-selects-all"),
        pytest.param("  ", (), id="blank"),
        pytest.param("site=berlin", (req("site", Op.EQ, "berlin"),), id="equals"),
        pytest.param("site==berlin", (req("site", Op.EQ, "berlin"),), id="double-equals"),
        pytest.param("site!=berlin", (req("site", Op.NE, "berlin"),), id="not-equals"),
        pytest.param("site in (b,a)", (req("site", Op.IN, "a", "b"),), id="in-sorted"),
        pytest.param("site notin (a)", (req("site", Op.NOTIN, "a"),), id="notin"),
        pytest.param("gpu", (req("gpu", Op.EXISTS),), id="exists"),
        pytest.param("!canary", (req("canary", Op.ABSENT),), id="absent"),
        pytest.param(
            " site = berlin , hw=jetson ",
            (req("hw", Op.EQ, "jetson"), req("site", Op.EQ, "berlin")),
            id="spaces-and-sorted",
        ),
        pytest.param(
            "site in ( a , b ),!canary,gpu",
            (req("canary", Op.ABSENT), req("gpu", Op.EXISTS), req("site", Op.IN, "a", "b")),
            id="mixed",
        ),
        pytest.param("site=berlin,", (req("site", Op.EQ, "berlin"),), id="trailing-comma"),
        pytest.param(",,a=b,,", (req("a", Op.EQ, "b"),), id="empty-terms"),
        pytest.param("a.b-c_d=1.2.3", (req("a.b-c_d", Op.EQ, "1.2.3"),), id="id-characters"),
        pytest.param("in in (in)", (req("in", Op.IN, "in"),), id="keyword-as-key-and-value"),
        pytest.param("notin", (req("notin", Op.EXISTS),), id="keyword-as-exists"),
        pytest.param(
            "k,k!=x", (req("k", Op.NE, "x"), req("k", Op.EXISTS)), id="two-terms-on-one-key"
        ),
    ],
)
def test_parse_selector(text: str, expected: Selector) -> None:
    assert parse_selector(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("site=", "expected a label value, got the end", id="empty-value"),
        pytest.param("=berlin", "expected a label key, got '='", id="empty-key"),
        pytest.param("a=b=c", "expected ',' after a=b, got '='", id="two-equals"),
        pytest.param("a=b,a=c", "repeats key 'a'", id="repeated-key"),
        pytest.param("a=b, a =b", "repeats the term a=b", id="repeated-term"),
        pytest.param("!k,!k", "repeats the term !k", id="repeated-absent"),
        pytest.param("a/b=c", "unexpected '/'", id="slash-in-key"),
        pytest.param("a=+", "unexpected '+'", id="wildcard-value"),
        pytest.param("a=#", "unexpected '#'", id="hash-value"),
        pytest.param("a=b c", "expected ',' after a=b, got 'c'", id="space-in-value"),
        pytest.param("st\u00e4dt=x", "unexpected", id="non-ascii-key"),
        pytest.param("a=" + "x" * 65, "invalid label value", id="long-value"),
        pytest.param("k in ()", "expected a label value, got ')'", id="empty-set"),
        pytest.param("k in (a,a)", "repeats a value", id="repeated-value"),
        pytest.param("k in (a,b", "expected ')' after 'b', got the end", id="unclosed"),
        pytest.param("k in a", "expected '(' after 'k in'", id="set-without-parens"),
        pytest.param("k (a)", "expected =, !=, in or notin after 'k'", id="no-operator"),
        pytest.param("!", "expected a label key, got the end", id="bare-bang"),
        pytest.param("!k=v", "expected ',' after !k, got '='", id="absent-with-value"),
        pytest.param("k!", "expected =, !=, in or notin after 'k', got '!'", id="trailing-bang"),
        pytest.param("k=(a)", "expected a label value, got '('", id="parens-after-equals"),
        pytest.param(",".join(f"k{i}" for i in range(MAX_TERMS + 1)), "terms", id="too-many"),
        pytest.param(
            "k in (" + ",".join(f"v{i}" for i in range(MAX_VALUES + 1)) + ")",
            f"more than {MAX_VALUES} values",
            id="too-many-values",
        ),
        pytest.param("a=" + "b" * 5000, "longer than", id="too-long"),
    ],
)
def test_parse_selector_rejects(text: str, message: str) -> None:
    with pytest.raises(DecodeError) as caught:
        parse_selector(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "canonical_text"),
    [
        ("", ""),
        ("b=1,a=2", "a=2,b=1"),
        ("site in (c, a ,b)", "site in (a,b,c)"),
        ("site==x", "site=x"),
        ("!z,y,x notin (2,1),w!=0", "w!=0,x notin (1,2),y,!z"),
    ],
)
def test_format_selector_is_canonical(text: str, canonical_text: str) -> None:
    assert format_selector(parse_selector(text)) == canonical_text


# ----- matching ---------------------------------------------------------------------

BERLIN_JETSON = {"site": "berlin", "hw": "jetson"}


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("", {}, True),
        ("", BERLIN_JETSON, True),
        ("site=berlin", BERLIN_JETSON, True),
        ("site=paris", BERLIN_JETSON, False),
        ("site=berlin", {}, False),
        ("site=berlin,hw=jetson", {"site": "berlin"}, False),
        ("site!=paris", BERLIN_JETSON, True),
        ("site!=berlin", BERLIN_JETSON, False),
        ("site!=berlin", {}, True),  # no label: not equal
        ("site in (paris,berlin)", BERLIN_JETSON, True),
        ("site in (paris,rome)", BERLIN_JETSON, False),
        ("site in (paris,rome)", {}, False),
        ("site notin (paris,rome)", BERLIN_JETSON, True),
        ("site notin (berlin)", BERLIN_JETSON, False),
        ("site notin (berlin)", {}, True),  # no label: not in the set
        ("hw", BERLIN_JETSON, True),
        ("gpu", BERLIN_JETSON, False),
        ("!gpu", BERLIN_JETSON, True),
        ("!hw", BERLIN_JETSON, False),
        ("site in (berlin),!canary,hw!=pi", BERLIN_JETSON, True),
        ("site in (berlin),!canary,hw!=pi", {**BERLIN_JETSON, "canary": "yes"}, False),
        ("k,k!=x", {"k": "y"}, True),
        ("k,k!=x", {"k": "x"}, False),
        ("k,k!=x", {}, False),
    ],
)
def test_matches(text: str, labels: dict[str, str], expected: bool) -> None:
    assert matches(parse_selector(text), labels) is expected


# ----- the wire form ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"key": "k", "op": "eq"}, "exactly one value", id="eq-without-value"),
        pytest.param({"key": "k", "op": "ne", "values": ["a", "b"]}, "exactly one", id="ne-two"),
        pytest.param({"key": "k", "op": "in"}, "at least one value", id="in-empty"),
        pytest.param({"key": "k", "op": "exists", "values": ["a"]}, "no value", id="exists-value"),
        pytest.param({"key": "k", "op": "absent", "values": ["a"]}, "no value", id="absent-value"),
        pytest.param({"key": "k", "op": "in", "values": ["a", "a"]}, "repeated", id="repeat"),
        pytest.param({"key": "k", "op": "like", "values": ["a"]}, "op", id="unknown-op"),
        pytest.param({"key": "k/x", "op": "exists"}, "key", id="bad-key"),
        pytest.param({"key": "k", "op": "eq", "values": ["+"]}, "values", id="bad-value"),
        pytest.param({"key": "k", "op": "exists", "extra": 1}, "extra", id="unknown-field"),
        pytest.param(
            {"key": "k", "op": "in", "values": [f"v{i}" for i in range(MAX_VALUES + 1)]},
            "values",
            id="too-many-values",
        ),
    ],
)
def test_requirement_validation(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Requirement.model_validate(fields)
    assert message in str(caught.value)


def test_check_selector_bounds() -> None:
    many = tuple(req(f"k{i}", Op.EXISTS) for i in range(MAX_TERMS + 1))
    with pytest.raises(DecodeError, match="more than"):
        check_selector(many)
    with pytest.raises(DecodeError, match="repeats key"):
        check_selector((req("a", Op.EQ, "1"), req("a", Op.EQ, "2")))
    with pytest.raises(DecodeError, match="repeats the term"):
        check_selector((req("a", Op.IN, "1", "2"), req("a", Op.IN, "2", "1")))
    assert check_selector(many[:MAX_TERMS]) == many[:MAX_TERMS]


# ----- properties -------------------------------------------------------------------

IDS = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)


@st.composite
def requirements(draw: st.DrawFn) -> Requirement:
    op = draw(st.sampled_from(list(LabelOp)))
    count = {Op.EQ: 1, Op.NE: 1, Op.EXISTS: 0, Op.ABSENT: 0}.get(op)
    if count is None:
        values = draw(st.lists(IDS, min_size=1, max_size=4, unique=True))
    else:
        values = draw(st.lists(IDS, min_size=count, max_size=count))
    return Requirement(key=draw(IDS), op=op, values=tuple(values))


@st.composite
def selectors(draw: st.DrawFn) -> Selector:
    chosen = draw(st.lists(requirements(), max_size=6, unique_by=Requirement.sort_key))
    equal_keys = [r.key for r in chosen if r.op is Op.EQ]
    if len(equal_keys) != len(set(equal_keys)):
        chosen = [r for r in chosen if r.op is not Op.EQ]
    return canonical(chosen)


@PROPERTY
@given(selectors())
def test_parse_format_parse_round_trip(selector: Selector) -> None:
    text = format_selector(selector)
    assert parse_selector(text) == selector
    assert format_selector(parse_selector(text)) == text
    assert format_selector(tuple(reversed(selector))) == text  # order does not matter


@PROPERTY
@given(selectors(), st.dictionaries(IDS, IDS, max_size=5))
def test_matches_is_the_conjunction_of_the_terms(
    selector: Selector, labels: dict[str, str]
) -> None:
    expected = all(
        {
            Op.EQ: lambda r: labels.get(r.key) == r.values[0],
            Op.NE: lambda r: labels.get(r.key) != r.values[0],
            Op.IN: lambda r: r.key in labels and labels[r.key] in r.values,
            Op.NOTIN: lambda r: r.key not in labels or labels[r.key] not in r.values,
            Op.EXISTS: lambda r: r.key in labels,
            Op.ABSENT: lambda r: r.key not in labels,
        }[r.op](r)
        for r in selector
    )
    assert matches(selector, labels) is expected
    assert matches(parse_selector(format_selector(selector)), labels) is expected


@PROPERTY
@given(selectors(), st.dictionaries(IDS, IDS, max_size=5), st.sampled_from(["k", "site"]))
def test_negations_are_complements(selector: Selector, labels: dict[str, str], key: str) -> None:
    for positive, negative in ((Op.EXISTS, Op.ABSENT), (Op.IN, Op.NOTIN), (Op.EQ, Op.NE)):
        values = () if positive is Op.EXISTS else ("x",)
        assert matches((req(key, positive, *values),), labels) is not matches(
            (req(key, negative, *values),), labels
        )


# ----- label sets -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("site=berlin", {"site": "berlin"}),
        (" site = berlin , hw=jetson,", {"site": "berlin", "hw": "jetson"}),
    ],
)
def test_parse_labels(text: str, expected: dict[str, str]) -> None:
    assert parse_labels(text) == expected
    assert parse_labels(format_labels(expected)) == expected


@pytest.mark.parametrize(
    "text",
    ["site", "site=", "=x", "a=b,a=c", "a=b c", "a in (b)", ",".join(f"k{i}=v" for i in range(65))],
)
def test_parse_labels_rejects(text: str) -> None:
    with pytest.raises(DecodeError):
        parse_labels(text)


@pytest.mark.parametrize(
    ("announced", "central", "effective"),
    [
        ({}, {}, {}),
        ({"site": "a"}, {}, {"site": "a"}),
        ({"site": "a"}, {"site": "b"}, {"site": "b"}),
        ({"site": "a"}, {"tier": "edge"}, {"site": "a", "tier": "edge"}),
        ({"site": "a", "hw": "pi"}, {"site": None}, {"hw": "pi"}),
        ({}, {"site": None}, {}),
    ],
)
def test_overlay(
    announced: dict[str, str], central: dict[str, str | None], effective: dict[str, str]
) -> None:
    assert overlay(announced, central) == effective
