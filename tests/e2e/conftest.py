"""Fixtures for the end-to-end tests: keys, model files, a fleet of real processes, PostgreSQL.

Each test gets its own broker (``broker`` from ``tests/conftest.py``), fleet id,
working directory, controller and nodes (:class:`tests.support.fleet.Fleet`),
killed when the test ends whatever happened. What no test changes is made once
per module: the signing keys (``fleetctl keys init``) and the ONNX files.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.support.broker import Broker
from tests.support.fleet import OPERATOR, Fleet, program
from tests.support.models import make_broken_model, make_classifier, make_slow_model
from tests.support.postgres import PG_URL

# About 200 MFLOP per inference (400 layers of 512x512): milliseconds even on a
# fast core, against microseconds for the classifier, so p95 regresses far
# beyond +50% on any machine however noisy the baseline.
SLOW_WORK = 400
SLOW_WIDTH = 512


@dataclass(frozen=True)
class ModelFiles:
    v1: Path  # classifier, seed 1
    v2: Path  # same interface, other weights
    slow: Path  # same interface, much slower
    broken: Path  # a classifier cut in half: onnxruntime refuses it


@pytest.fixture(scope="module")
def e2e_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root, release and rollout keys, the tests' operator and ``trust.json``, made by
    ``fleetctl keys init`` and ``fleetctl operator add``."""
    keys = tmp_path_factory.mktemp("keys") / "keys"
    env = {k: v for k, v in os.environ.items() if k != "FLEET_KEY_PASSPHRASE"}
    # The tests act as their own admin: the audit log must show that name, from the key.
    for args in (
        ("keys", "init", "--dir", str(keys), "--json"),
        ("operator", "add", OPERATOR, "--role", "admin", "--dir", str(keys)),
    ):
        done = subprocess.run(
            [*program("fleetctl"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert done.returncode == 0, f"fleetctl {args[0]} {args[1]} failed: {done.stderr}"
    assert (keys / "trust.json").is_file()
    return keys


@pytest.fixture(scope="module")
def e2e_models(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    folder = tmp_path_factory.mktemp("models")
    return ModelFiles(
        v1=make_classifier(folder / "classifier-v1.onnx", seed=1),
        v2=make_classifier(folder / "classifier-v2.onnx", seed=2),
        slow=make_slow_model(folder / "slow.onnx", work=SLOW_WORK, width=SLOW_WIDTH, seed=3),
        broken=make_broken_model(folder / "broken.onnx", seed=4),
    )


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker, fleet_id: str, e2e_keys: Path) -> Iterator[Fleet]:
    """A :class:`Fleet` on this test's broker; every process it started is killed after."""
    fleet = Fleet(tmp_path, broker_url=broker.url, fleet_id=fleet_id, keys_dir=e2e_keys)
    try:
        yield fleet
    finally:
        fleet.close()


@dataclass(frozen=True)
class PgDatabase:
    url: str  # what ``fleetctl serve --db`` gets
    schema: str  # where its tables must land


@pytest.fixture
def pg_database(pg_admin: Engine) -> Iterator[PgDatabase]:
    """A database URL whose connections use a fresh schema (``search_path`` in the URL).

    ``fleetctl serve --db URL`` has no schema flag: libpq's ``options`` parameter,
    which psycopg passes through from the URL, sets ``search_path``. The schema is
    made here and dropped, with everything in it, after the test (request this
    fixture before ``fleet``, so the controller is gone by then).
    """
    schema = f"e2e_{uuid.uuid4().hex[:16]}"
    with pg_admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in PG_URL else "?"
    try:
        yield PgDatabase(f"{PG_URL}{separator}options=-csearch_path%3D{schema}", schema)
    finally:
        with pg_admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
