"""Fixtures for the controller's unit tests on the in-memory broker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fleet_controller.keys import init_keys
from tests.unit.fleet_controller.kit import NOW


@pytest.fixture(scope="session")
def shared_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One key set for the whole session (generating keys is the slow part)."""
    directory = tmp_path_factory.mktemp("keys")
    init_keys(directory, now=NOW)
    return directory


@pytest.fixture
def keys(shared_keys: Path, tmp_path: Path) -> Path:
    """This test's copy of the keys (a test may rotate them)."""
    return Path(shutil.copytree(shared_keys, tmp_path / "keys"))
