"""Mosquitto configuration files for EdgeFleet (dev and secure) and their paths."""

from __future__ import annotations

from pathlib import Path

__all__ = ["config_path"]

_HERE = Path(__file__).resolve().parent


def config_path(name: str) -> Path:
    """Return the path of the file ``name`` shipped in this folder, e.g. ``"dev.conf"``.

    Raises:
        ValueError: ``name`` is not a plain file name (it has a directory part).
        FileNotFoundError: no such file ships with EdgeFleet.
    """
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")
    path = _HERE / name
    if not path.is_file():
        raise FileNotFoundError(f"no broker configuration file named {name!r} in {_HERE}")
    return path
