"""The pure parsers and formatters of flag values (:mod:`fleet_controller.cli.flags`)."""

from __future__ import annotations

import argparse

import pytest

from fleet_controller.cli import flags
from shared.errors import DecodeError, UsageError
from tests.unit.fleet_controller.cli._kit import NOW


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("0", 0.0),
        ("2.5", 2.5),
        ("250ms", 0.25),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("1h30m", 5400.0),
        ("2d", 172_800.0),
        (" 60s ", 60.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert flags.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "s", "5x", "-5s", "5 m", "5M", "nan", "inf", "1e3", "1_000", "\u0663s", "5m-", "9" * 80],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="invalid duration"):
        flags.parse_duration(text)


@pytest.mark.parametrize(
    ("text", "fraction"),
    [
        ("10%", 0.10),
        ("0.1", 0.10),
        ("12.5%", 0.125),
        ("0", 0.0),
        ("0%", 0.0),
        ("1", 1.0),
        ("100%", 1.0),
    ],
)
def test_parse_fraction(text: str, fraction: float) -> None:
    assert flags.parse_fraction(text) == pytest.approx(fraction)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", "write 10% for a percentage"),
        ("101%", "more than 100%"),
        ("-5%", "invalid percentage"),
        ("abc", "invalid percentage"),
        ("", "invalid percentage"),
        ("nan", "invalid percentage"),
        ("1e-1", "invalid percentage"),
        ("10%%", "invalid percentage"),
    ],
)
def test_parse_fraction_refuses(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        flags.parse_fraction(text)


def test_parse_fraction_without_maximum_takes_large_regressions() -> None:
    assert flags.parse_fraction("200%", maximum=None) == pytest.approx(2.0)
    assert flags.parse_fraction("3", maximum=None) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("text", "waves"),
    [
        ("1,10,50,100", [1.0, 10.0, 50.0, 100.0]),
        ("100", [100.0]),
        ("5%, 100%", [5.0, 100.0]),
        ("0.5,25,50", [0.5, 25.0, 50.0]),
    ],
)
def test_parse_waves(text: str, waves: list[float]) -> None:
    assert flags.parse_waves(text) == waves


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10,5", "waves must grow"),
        ("1,1", "waves must grow"),
        ("0,100", r"must be in \(0, 100\]"),
        ("150", r"must be in \(0, 100\]"),
        ("", "invalid wave"),
        ("1,,2", "invalid wave"),
        ("a", "invalid wave"),
        ("-1,100", "invalid wave"),
    ],
)
def test_parse_waves_refuses(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        flags.parse_waves(text)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("", ""),
        ("site=a", "site=a"),
        ("site=a,hw=jetson", "hw=jetson,site=a"),
        (" site = a , hw=pi ", "hw=pi,site=a"),
        ("site in (b,a), !canary, gpu", "!canary,gpu,site in (a,b)"),
    ],
)
def test_parse_select(text: str, canonical: str) -> None:
    assert flags.parse_select(text) == canonical


@pytest.mark.parametrize(
    "text", ["site=", "site=a,site=b", "si te=a", "site=a/b", "site=+", "k in x", "!"]
)
def test_parse_select_refuses(text: str) -> None:
    with pytest.raises(DecodeError):
        flags.parse_select(text)


@pytest.mark.parametrize(
    ("text", "name", "shape", "fill"),
    [
        ("input=1x8", "input", (1, 8), 0.0),
        ("input=[1,8]", "input", (1, 8), 0.0),
        ("input=[1, 3, 224, 224]:0.5", "input", (1, 3, 224, 224), 0.5),
        ("sample_rate=[]:16000", "sample_rate", (), 16000.0),
        ("offset=[]:-1", "offset", (), -1.0),
        ("length=4", "length", (4,), 0.0),
        ("input:0=1x8", "input:0", (1, 8), 0.0),
    ],
)
def test_parse_warmup_input(text: str, name: str, shape: tuple[int, ...], fill: float) -> None:
    warmup = flags.parse_warmup_input(text)
    assert (warmup.name, warmup.shape, warmup.fill, warmup.values) == (name, shape, fill, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input", "use NAME=SHAPE"),
        ("=1x8", "use NAME=SHAPE"),
        ("input=1xa", "invalid shape"),
        ("input=1x-8", "invalid shape"),
        ("input=[1,8", "invalid shape"),
        ("input=1x8:abc", "is not a number"),
        ("input=1x8:nan", "is not a number"),
        ("input=1x8:inf", "is not a number"),
        ("input=1x99999999", "invalid shape"),
        ("input=1x2000000", "less than or equal to 1000000"),
    ],
)
def test_parse_warmup_input_refuses(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        flags.parse_warmup_input(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1900000000", 1_900_000_000.0),
        ("+30m", NOW + 1800),
        ("+90", NOW + 90),
        ("2030-01-01T00:00:00Z", 1_893_456_000.0),
        ("2030-01-01T01:00:00+01:00", 1_893_456_000.0),
    ],
)
def test_parse_activate_at(text: str, expected: float) -> None:
    assert flags.parse_activate_at(text, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2030-01-01T00:00:00", "has no time zone"),
        ("tomorrow", "invalid time"),
        ("1700000000", "in the past"),
        ("2020-01-01T00:00:00Z", "in the past"),
        ("+5x", "invalid duration"),
    ],
)
def test_parse_activate_at_refuses(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        flags.parse_activate_at(text, now=NOW)


@pytest.mark.parametrize(
    ("text", "ref"),
    [("classifier@1.2.0", ("classifier", "1.2.0")), ("c@1.0.0-rc.1", ("c", "1.0.0-rc.1"))],
)
def test_parse_model_ref(text: str, ref: tuple[str, str]) -> None:
    assert flags.parse_model_ref(text) == ref


@pytest.mark.parametrize("text", ["classifier", "classifier@1", "@1.0.0", "a/b@1.0.0", "c@v1.0.0"])
def test_parse_model_ref_refuses(text: str) -> None:
    with pytest.raises(DecodeError):
        flags.parse_model_ref(text)


def test_parse_names_refuses_repeats_and_bad_ids() -> None:
    assert flags.parse_names(" a, b ,", "operator") == ["a", "b"]
    with pytest.raises(UsageError, match="given twice"):
        flags.parse_names("a,a", "operator")
    with pytest.raises(DecodeError):
        flags.parse_names("a/b", "operator")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (300.0, "5m"),
        (60.0, "1m"),
        (90.0, "90s"),
        (10.0, "10s"),
        (1.5, "1.5s"),
        (0.001, "1ms"),
        (0.25, "250ms"),
        (0.0, "0s"),
        (7200.0, "2h"),
        (172_800.0, "2d"),
        (1_000_000.0, "1000000s"),
    ],
)
def test_format_duration_is_read_back_by_parse_duration(seconds: float, text: str) -> None:
    assert flags.format_duration(seconds) == text
    assert flags.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("fraction", "text"),
    [(0.1, "10%"), (0.5, "50%"), (0.01, "1%"), (0.125, "12.5%"), (2.0, "200%")],
)
def test_format_fraction_is_read_back_by_parse_fraction(fraction: float, text: str) -> None:
    assert flags.format_fraction(fraction) == text
    assert flags.parse_fraction(text, maximum=None) == pytest.approx(fraction)


def test_format_waves_is_read_back_by_parse_waves() -> None:
    assert flags.format_waves((1.0, 10.0, 50.0, 100.0)) == "1,10,50,100"
    assert flags.format_waves((0.5, 100.0)) == "0.5,100"
    assert flags.parse_waves("0.5,100") == [0.5, 100.0]


def test_named_puts_the_option_first() -> None:
    assert flags.named("--waves", flags.parse_waves, "1,100") == [1.0, 100.0]
    with pytest.raises(UsageError, match=r"^--select: "):
        flags.named("--select", flags.parse_select, "site=")


@pytest.mark.parametrize("node", ["controller", "Controller", "operator", "operator-x", "a/b"])
def test_check_node_username_refuses(node: str) -> None:
    with pytest.raises(DecodeError):
        flags.check_node_username(node)
    assert flags.check_node_username("node-1") == "node-1"


# ----- numeric flags ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"), [("1", 1), ("3650", 3650), (" 7 ", 7), ("+12", 12), ("0012", 12)]
)
def test_whole_number(text: str, value: int) -> None:
    assert flags.whole_number(1, 3650)(text) == value


@pytest.mark.parametrize("text", ["0", "-5", "3651", "1.5", "1e3", "ten", "", "nan", "9" * 80])
def test_whole_number_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="a whole number from 1 to 3650"):
        flags.whole_number(1, 3650)(text)


@pytest.mark.parametrize(
    ("above", "text", "value"),
    [(True, "0.5", 0.5), (True, "3650", 3650.0), (False, "0", 0.0), (False, "1e2", 100.0)],
)
def test_number(above: bool, text: str, value: float) -> None:
    assert flags.number(0, 3650, above=above)(text) == value


@pytest.mark.parametrize(
    ("above", "text"),
    [
        (True, "0"),
        (False, "-0.1"),
        (False, "3650.5"),
        (False, "nan"),
        (False, "inf"),
        (False, "-inf"),
        (False, "lots"),
        (False, "1" * 80),
    ],
)
def test_number_refuses(above: bool, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a number (above|from) 0"):
        flags.number(0, 3650, above=above)(text)


@pytest.mark.parametrize(("text", "seconds"), [("1s", 1.0), ("250ms", 0.25), ("1m", 60.0)])
def test_parse_positive_duration(text: str, seconds: float) -> None:
    assert flags.parse_positive_duration(text, maximum_s=60) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [("0", "must be above zero and at most 1m"), ("61s", "at most 1m"), ("-1", "invalid")],
)
def test_parse_positive_duration_refuses(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        flags.parse_positive_duration(text, maximum_s=60)
