"""``parse_database_url``: the one reading of a database URL (no file, no server touched)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_controller.store import StoreError, parse_database_url

HOME = Path("~").expanduser()


@pytest.mark.parametrize(
    ("url", "normalised", "display", "sqlite_path"),
    [
        pytest.param("fleet.db", "sqlite:///fleet.db", "sqlite:///fleet.db", Path("fleet.db")),
        pytest.param(
            "sqlite:///odd:name.db",
            "sqlite:///odd%3Aname.db",
            "sqlite:///odd%3Aname.db",
            Path("odd:name.db"),
            id="colon-in-a-sqlite-url",
        ),
        pytest.param(
            "/var/lib/edgefleet/fleet.db",
            "sqlite:////var/lib/edgefleet/fleet.db",
            "sqlite:////var/lib/edgefleet/fleet.db",
            Path("/var/lib/edgefleet/fleet.db"),
            id="absolute-path",
        ),
        pytest.param(
            "~/fleet.db",
            f"sqlite:///{HOME}/fleet.db",
            f"sqlite:///{HOME}/fleet.db",
            HOME / "fleet.db",
            id="home-path",
        ),
        pytest.param(
            "sqlite:///data/fleet.db",
            "sqlite:///data/fleet.db",
            "sqlite:///data/fleet.db",
            Path("data/fleet.db"),
            id="sqlite-relative",
        ),
        pytest.param(
            "sqlite:////srv/fleet.db",
            "sqlite:////srv/fleet.db",
            "sqlite:////srv/fleet.db",
            Path("/srv/fleet.db"),
            id="sqlite-absolute",
        ),
        pytest.param(
            "postgresql://ops:pw@db.example:5433/fleet",
            "postgresql+psycopg://ops:pw@db.example:5433/fleet",
            "postgresql+psycopg://ops:***@db.example:5433/fleet",
            None,
            id="postgresql",
        ),
        pytest.param(
            "postgres://ops@db/fleet",
            "postgresql+psycopg://ops@db/fleet",
            "postgresql+psycopg://ops@db/fleet",
            None,
            id="postgres-alias",
        ),
        pytest.param(
            "postgresql+psycopg2://ops@db/fleet?connect_timeout=3",
            "postgresql+psycopg2://ops@db/fleet?connect_timeout=3",
            "postgresql+psycopg2://ops@db/fleet?connect_timeout=3",
            None,
            id="explicit-driver-kept",
        ),
    ],
)
def test_urls_are_normalised(
    url: str, normalised: str, display: str, sqlite_path: Path | None
) -> None:
    parsed = parse_database_url(url)
    assert parsed.url.render_as_string(hide_password=False) == normalised
    assert parsed.display == display
    assert parsed.sqlite_path == sqlite_path
    assert parsed.dialect == ("sqlite" if sqlite_path is not None else "postgresql")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("", "no database given", id="empty"),
        pytest.param("   ", "no database given", id="blank"),
        pytest.param("mysql://u:secret@h/db", "unsupported database 'mysql'", id="mysql"),
        pytest.param("nonsense://x", "unsupported database 'nonsense'", id="unknown-scheme"),
        pytest.param("sqlite://", "in-memory", id="sqlite-no-file"),
        pytest.param("sqlite:///:memory:", "in-memory", id="sqlite-memory"),
        pytest.param("sqlite:///file:x?mode=memory&uri=true", "in-memory", id="sqlite-uri-memory"),
        pytest.param(
            "postgresql+psycopg://u:secret@h:notaport/db", "invalid database URL", id="port"
        ),
        pytest.param("://nothing", "invalid database URL", id="no-scheme"),
        pytest.param("garbage:::", "neither a URL", id="garbage"),
        pytest.param("postgres:fleet", "neither a URL", id="no-slashes"),
        pytest.param("sqlite:fleet.db", "neither a URL", id="sqlite-no-slashes"),
    ],
)
def test_bad_urls_are_one_line_store_errors(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as caught:
        parse_database_url(url)
    text = str(caught.value)
    assert "\n" not in text
    assert "secret" not in text
