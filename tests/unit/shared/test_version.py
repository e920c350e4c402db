"""Semantic version order (shared.version)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import DecodeError
from shared.version import SemVer, VersionError
from tests.support.shared_kit import PROPERTY, VERSIONS

# ----- SemVer -------------------------------------------------------------------

# Strictly increasing (semver.org §11's own example, plus numeric-vs-alphanumeric cases).
ASCENDING = [
    "0.9.99",
    "1.0.0-0",
    "1.0.0-2",
    "1.0.0-10",
    "1.0.0-a",
    "1.0.0-a.0",
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1",
    "1.0.10",
    "1.1.0",
    "1.9.0",
    "1.10.0",
    "2.0.0-alpha",
    "2.0.0",
    "10.0.0",
]


@pytest.mark.parametrize(
    ("lower", "higher"),
    [pytest.param(a, b, id=f"{a}<{b}") for a, b in itertools.combinations(ASCENDING, 2)],
)
def test_semver_order(lower: str, higher: str) -> None:
    a, b = SemVer.parse(lower), SemVer.parse(higher)
    assert a < b
    assert b > a
    assert a <= b
    assert a != b
    assert not b < a


@pytest.mark.parametrize(
    ("left", "right"),
    [
        pytest.param("1.0.0+build.1", "1.0.0", id="build-ignored"),
        pytest.param("1.0.0+a", "1.0.0+b", id="builds-differ"),
        pytest.param("1.0.0-alpha+001", "1.0.0-alpha", id="prerelease-build-ignored"),
        pytest.param("1.0.0+01.x", "1.0.0", id="build-may-have-leading-zeros"),
    ],
)
def test_build_metadata_is_ignored(left: str, right: str) -> None:
    assert SemVer.parse(left) == SemVer.parse(right)
    assert not SemVer.parse(left) < SemVer.parse(right)


@pytest.mark.parametrize(
    ("text", "parsed", "printed"),
    [
        ("1.2.3", SemVer(1, 2, 3), "1.2.3"),
        ("0.0.0", SemVer(0, 0, 0), "0.0.0"),
        ("1.2.3-rc.1+sha.abc", SemVer(1, 2, 3, ("rc", "1")), "1.2.3-rc.1"),
        ("999999999.0.0", SemVer(999_999_999, 0, 0), "999999999.0.0"),
    ],
)
def test_semver_parse_and_str(text: str, parsed: SemVer, printed: str) -> None:
    assert SemVer.parse(text) == parsed
    assert str(parsed) == printed


INVALID_VERSIONS: list[Any] = [
    pytest.param("", id="empty"),
    pytest.param("1", id="major-only"),
    pytest.param("1.0", id="no-patch"),
    pytest.param("1.0.0.0", id="four-parts"),
    pytest.param("v1.0.0", id="v-prefix"),
    pytest.param("01.0.0", id="leading-zero-major"),
    pytest.param("1.01.0", id="leading-zero-minor"),
    pytest.param("1.0.00", id="leading-zero-patch"),
    pytest.param("-1.0.0", id="negative"),
    pytest.param("1.0.0-", id="empty-prerelease"),
    pytest.param("1.0.0+", id="empty-build"),
    pytest.param("1.0.0-alpha..1", id="empty-prerelease-identifier"),
    pytest.param("1.0.0-01", id="leading-zero-prerelease-number"),
    pytest.param("1.0.0-rc.007", id="leading-zero-inner-prerelease-number"),
    pytest.param("1.0.0-al_pha", id="underscore"),
    pytest.param("1.0.0-\u00e9", id="non-ascii-prerelease"),
    pytest.param("1\u0663.0.0", id="arabic-indic-digit"),
    pytest.param("\uff11.0.0", id="fullwidth-digit"),
    pytest.param("1.0.0\n", id="trailing-newline"),
    pytest.param(" 1.0.0", id="leading-space"),
    pytest.param("1.0.0 ", id="trailing-space"),
    pytest.param("1234567890.0.0", id="ten-digit-major"),
    pytest.param("1.0.0-" + "a" * 123, id="129-chars"),
]


@pytest.mark.parametrize("text", INVALID_VERSIONS)
def test_invalid_versions(text: str) -> None:
    with pytest.raises(VersionError):
        SemVer.parse(text)


def test_version_error_is_a_decode_error() -> None:
    assert issubclass(VersionError, DecodeError)


def test_semver_compared_with_other_types() -> None:
    assert SemVer(1, 0, 0) != "1.0.0"
    with pytest.raises(TypeError):
        assert SemVer(1, 0, 0) < "2.0.0"  # type: ignore[operator]


SMALL_VERSIONS = st.builds(
    lambda core, pre: core + (f"-{'.'.join(pre)}" if pre else ""),
    st.sampled_from(["0.0.0", "1.0.0", "1.0.1", "1.1.0"]),
    st.lists(st.sampled_from(["0", "1", "2", "10", "a", "b", "rc"]), max_size=2),
)


@PROPERTY
@given(SMALL_VERSIONS | VERSIONS, SMALL_VERSIONS | VERSIONS, SMALL_VERSIONS | VERSIONS)
def test_semver_is_a_total_order(x: str, y: str, z: str) -> None:
    a, b, c = SemVer.parse(x), SemVer.parse(y), SemVer.parse(z)
    assert [a < b, a == b, a > b].count(True) == 1  # exactly one holds
    if a <= b <= c:
        assert a <= c
    assert SemVer.parse(str(a)) == a
