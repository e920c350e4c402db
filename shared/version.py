"""Semantic versions (``MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]``) and their order.

Ordering follows semver.org §11: build metadata is ignored, a pre-release sorts
before its release, numeric pre-release identifiers compare numerically and sort
before alphanumeric ones. :meth:`SemVer.parse` takes ASCII digits only, no
trailing newline, and (§9) no numeric pre-release identifier with a leading zero,
so that two different texts never compare as neither equal nor ordered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from shared.errors import DecodeError

__all__ = ["SEMVER_PATTERN", "SemVer", "VersionError"]

SEMVER_PATTERN = (
    r"^(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
# ASCII: ``\d`` would otherwise match any Unicode digit ("1\u0663.0.0" read as 13.0.0).
_SEMVER = re.compile(SEMVER_PATTERN, re.ASCII)


class VersionError(DecodeError):
    """A string is not a semantic version."""


@total_ordering
@dataclass(frozen=True, slots=True)
class SemVer:
    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> SemVer:
        """Raises: VersionError if ``text`` is not ``MAJOR.MINOR.PATCH[-pre][+build]``."""
        # fullmatch: ``$`` alone also matches before a trailing newline.
        match = _SEMVER.fullmatch(text) if len(text) <= 128 else None
        if match is None:
            raise VersionError(f"invalid version {text[:40]!r}: expected MAJOR.MINOR.PATCH")
        pre = tuple(match.group(4).split(".")) if match.group(4) else ()
        if any(p.isdigit() and len(p) > 1 and p[0] == "0" for p in pre):
            raise VersionError(f"invalid version {text[:40]!r}: pre-release has a leading zero")
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)), pre)

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, SemVer):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return f"{core}-{'.'.join(self.prerelease)}" if self.prerelease else core
