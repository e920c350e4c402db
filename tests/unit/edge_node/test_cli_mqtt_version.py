"""``edge-node run --mqtt-version`` and the config file's ``mqtt_version``, over the URL's."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_node.cli import build_config, build_parser
from shared.errors import DecodeError

NATS_URL = "mqtt://127.0.0.1:1883?protocol=3.1.1"


def _config(tmp_path: Path, *flags: str, toml: dict[str, object] | None = None) -> str:
    args = build_parser().parse_args(["run", "--id", "n1", "--data", str(tmp_path), *flags])
    return build_config(args, toml or {}).broker.mqtt_version


def test_the_url_names_the_version(tmp_path: Path) -> None:
    assert _config(tmp_path, "--broker", "mqtt://127.0.0.1:1883") == "5"
    assert _config(tmp_path, "--broker", NATS_URL) == "3.1.1"


def test_the_flag_and_the_config_file_override_the_url(tmp_path: Path) -> None:
    assert _config(tmp_path, "--broker", "mqtt://h:1883", "--mqtt-version", "3.1.1") == "3.1.1"
    assert _config(tmp_path, "--broker", NATS_URL, "--mqtt-version", "5") == "5"
    assert _config(tmp_path, toml={"broker": "mqtt://h:1883", "mqtt_version": "3.1.1"}) == "3.1.1"


def test_an_unknown_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="MQTT version '4'"):
        _config(tmp_path, toml={"mqtt_version": "4"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--mqtt-version", "4"])
