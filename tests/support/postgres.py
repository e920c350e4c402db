"""The PostgreSQL server tests use, when one is reachable."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import SQLAlchemyError

PG_URL = os.environ.get(
    "EDGEFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
CONNECT_TIMEOUT_S = 3


@contextmanager
def admin_engine() -> Iterator[Engine | str]:
    """An engine on ``PG_URL``, or the one-line reason it is not reachable."""
    engine = create_engine(PG_URL, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, ImportError) as exc:
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"])[0]
        engine.dispose()
        yield f"PostgreSQL not reachable at EDGEFLEET_TEST_PG_URL ({PG_URL}): {first}"
        return
    try:
        yield engine
    finally:
        engine.dispose()
