"""The committed JSON Schemas in docs/schemas/ match the wire models exactly."""

from __future__ import annotations

import json
from pathlib import Path

from shared.operations import OPERATIONS
from shared.schemas import SCHEMA_MODELS, SCHEMA_STRUCTS, render_schemas

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "docs" / "schemas"
FIX = "run `python scripts/gen_schemas.py`"


def test_every_model_and_operation_has_a_schema() -> None:
    rendered = render_schemas()
    assert len(rendered) == len(SCHEMA_MODELS) + len(SCHEMA_STRUCTS) + len(OPERATIONS)
    for name, text in rendered.items():
        schema = json.loads(text)
        if name.startswith("operations/"):
            assert schema["title"] == f"{name.removeprefix('operations/')[:-5]} arguments"
            assert schema["additionalProperties"] is False
        else:
            assert schema["title"] == name.removesuffix(".json")
        assert text.endswith("\n")


def test_committed_schemas_are_up_to_date() -> None:
    expected = render_schemas()
    present = {p.relative_to(SCHEMA_DIR).as_posix() for p in SCHEMA_DIR.rglob("*.json")}
    missing = sorted(expected.keys() - present)
    extra = sorted(present - expected.keys())
    differ = sorted(
        name
        for name in expected.keys() & present
        if (SCHEMA_DIR / name).read_text(encoding="utf-8") != expected[name]
    )
    problems = [
        f"{label}: {', '.join(names)}"
        for label, names in (("missing", missing), ("extra", extra), ("differ", differ))
        if names
    ]
    assert not problems, f"docs/schemas out of date ({'; '.join(problems)}); {FIX}"
