"""Write the JSON Schema of every EdgeFleet wire model into ``docs/schemas/``.

Usage::

    python scripts/gen_schemas.py          # (re)write docs/schemas/*.json
    python scripts/gen_schemas.py --check  # exit 1 if any file is out of date

The schemas come from :func:`shared.schemas.render_schemas`; ``*.json`` files in
the directory that no model produces are removed (or, with ``--check``,
reported).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.schemas import render_schemas  # noqa: E402 - needs ROOT on sys.path

SCHEMA_DIR = ROOT / "docs" / "schemas"


def out_of_date(directory: Path, expected: dict[str, str]) -> list[str]:
    """Relative paths of files in ``directory`` that are missing, differ, or are stale."""
    present = (
        {p.relative_to(directory).as_posix() for p in directory.rglob("*.json")}
        if directory.is_dir()
        else set()
    )
    changed = [
        name
        for name, text in expected.items()
        if name not in present or (directory / name).read_text(encoding="utf-8") != text
    ]
    stale = sorted(present - expected.keys())
    return sorted(changed) + stale


def write(directory: Path, expected: dict[str, str]) -> list[str]:
    """Bring ``directory`` in line with ``expected``; return the names touched."""
    touched = out_of_date(directory, expected)
    directory.mkdir(parents=True, exist_ok=True)
    for name in touched:
        path = directory / name
        if name in expected:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(expected[name], encoding="utf-8", newline="\n")
        else:
            path.unlink()
    return touched


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        description="Write the JSON Schema of every EdgeFleet wire model into docs/schemas/."
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 naming the files that are out of date",
    )
    args = parser.parse_args(argv)
    expected = render_schemas()
    if args.check:
        stale = out_of_date(SCHEMA_DIR, expected)
        if stale:
            print(
                f"docs/schemas out of date: {', '.join(stale)} "
                "(run `python scripts/gen_schemas.py`)",
                file=sys.stderr,
            )
            return 1
        print(f"docs/schemas up to date ({len(expected)} files)")
        return 0
    touched = write(SCHEMA_DIR, expected)
    print(f"docs/schemas: {len(touched)} of {len(expected)} files updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
