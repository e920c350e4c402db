"""Fixtures shared by every test layer: real Mosquitto brokers, fleet ids, ONNX models.

Brokers are function-scoped and each test gets its own fleet id, so no test
ever sees another's retained messages or sessions. A missing ``mosquitto``
fails the tests that need it (CI installs it); it is never a silent skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.support.broker import Broker, BrokerError, BrokerFactory, free_port
from tests.support.disk import small_disk as mount_small_disk
from tests.support.models import make_classifier
from tests.support.postgres import admin_engine

__all__ = ["free_port"]  # re-exported: the helper lives in tests/support/broker.py


@pytest.fixture
def broker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerFactory]:
    """Start brokers on demand: ``broker_factory(persistence=..., extra_config=[...])``.

    Keyword arguments are those of :class:`tests.support.broker.Broker`. Each
    broker gets its own temp directory and is stopped when the test ends.
    """
    brokers: list[Broker] = []

    def start(
        *,
        persistence: bool = False,
        extra_config: Sequence[str] = (),
        port: int | None = None,
        template: Path | None = None,
    ) -> Broker:
        broker = Broker(
            tmp_path_factory.mktemp("broker"),
            persistence=persistence,
            extra_config=extra_config,
            port=port,
            template=template,
        )
        brokers.append(broker)
        error: BrokerError | None = None
        try:
            broker.start()
        except BrokerError as exc:
            error = exc
        if error is not None:  # outside `except`: one clear message, no chained traceback
            pytest.fail(f"cannot start mosquitto: {error}", pytrace=False)
        return broker

    yield start
    for broker in reversed(brokers):
        broker.close()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> Broker:
    """A running dev broker (``broker_config/dev.conf``) on a free port, no persistence."""
    return broker_factory()


@pytest.fixture
def persistent_broker(broker_factory: BrokerFactory) -> Broker:
    """Like ``broker`` but with persistence: ``stop()``/``start()`` keep sessions and retained."""
    return broker_factory(persistence=True)


@pytest.fixture
def fleet_id() -> str:
    """A fleet id unique to this test (valid per ``shared.topics.check_id``)."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def topic_prefix(fleet_id: str) -> str:
    """``fleet/v1/{fleet_id}``: every topic of this test's fleet starts with it."""
    return f"fleet/v1/{fleet_id}"


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """An empty directory for model files built by ``tests.support.models``."""
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of ``tests.support.disk.DISK_BYTES`` mounted for the test (skipped,
    with the reason, where mounting is not permitted), unmounted after it."""
    with mount_small_disk(tmp_path / "disk") as mount_point:
        yield mount_point


@pytest.fixture
def classifier_v1(models_dir: Path) -> Path:
    """A small classifier (seed 1): float32 ``input`` [N, 8] -> ``probs`` [N, 4]."""
    return make_classifier(models_dir / "classifier-v1.onnx", seed=1)


@pytest.fixture
def classifier_v2(models_dir: Path) -> Path:
    """The same interface as ``classifier_v1`` with other weights (seed 2), another sha256."""
    return make_classifier(models_dir / "classifier-v2.onnx", seed=2)


@pytest.fixture(scope="module")
def pg_admin() -> Iterator[Engine]:
    """An engine on ``EDGEFLEET_TEST_PG_URL`` for making schemas; a clean skip when
    no server answers."""
    with admin_engine() as engine:
        if isinstance(engine, str):
            pytest.skip(engine)
        yield engine
