"""Fixtures for the controller's unit tests on the in-memory broker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fleet_controller.keys import add_operator, init_keys
from shared.trust import OperatorRole
from tests.unit.fleet_controller.kit import NOW, OPERATORS


@pytest.fixture(scope="session")
def shared_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One key set for the whole session (generating keys is the slow part), with
    the operators of :data:`~tests.unit.fleet_controller.kit.OPERATORS`."""
    directory = tmp_path_factory.mktemp("keys")
    init_keys(directory, now=NOW)
    for name, role in OPERATORS.items():
        add_operator(directory, name, OperatorRole(role), public=None, now=NOW)
    return directory


@pytest.fixture
def keys(shared_keys: Path, tmp_path: Path) -> Path:
    """This test's copy of the keys (a test may rotate them)."""
    return Path(shutil.copytree(shared_keys, tmp_path / "keys"))
