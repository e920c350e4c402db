"""Fixtures for the integration tests: two versions of a small real classifier."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.runtime_kit import Model, write_model


@pytest.fixture
def v1(tmp_path: Path) -> Model:
    return write_model(tmp_path, "1.0.0", seed=1)


@pytest.fixture
def v2(tmp_path: Path) -> Model:
    return write_model(tmp_path, "2.0.0", seed=2)
