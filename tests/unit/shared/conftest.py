"""Fixtures for the unit tests of ``shared/``: one key set and its trust store per module."""

from __future__ import annotations

import pytest

from shared.trust import TrustStore
from tests.support.shared_kit import Keys, store_for


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def store(keys: Keys) -> TrustStore:
    return store_for(keys)
