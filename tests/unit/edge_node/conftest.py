"""Fixtures for the unit tests of ``edge_node/``."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.trust import TrustStore
from tests.unit.edge_node.verifier_kit import Kit


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Where a test's outbox database lives (not created yet)."""
    return tmp_path / "outbox.sqlite"


@pytest.fixture(scope="module")
def kit() -> Kit:
    """Real keys and a trust list for the verifier's scenarios."""
    return Kit()


@pytest.fixture(scope="module")
def store(kit: Kit) -> TrustStore:
    return kit.store()
