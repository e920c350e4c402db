"""JSON Schemas of every wire model, rendered as text (pure: builds strings only).

:func:`render_schemas` is the single source of the files under ``docs/schemas/``:
one ``<ModelName>.json`` per top-level message in
:data:`shared.messages.MESSAGE_TYPES`, plus the DSSE :class:`~shared.envelope.Envelope`,
the signed :class:`~shared.trust.TrustList` and the columnar
:class:`~shared.result_batch.ResultBatch` (a msgspec struct), and one
``operations/<op>.json`` per operator API operation (the ``args`` of its
:class:`~shared.messages.OperatorRequest`, from :data:`shared.operations.OPERATIONS`).
``scripts/gen_schemas.py`` writes them and a unit test checks that the committed
files match.
"""

from __future__ import annotations

import json

import msgspec
from pydantic import BaseModel

from shared.envelope import Envelope
from shared.messages import MESSAGE_TYPES
from shared.operations import OPERATIONS
from shared.result_batch import ResultBatch
from shared.trust import TrustList

__all__ = [
    "OPERATIONS_DIR",
    "SCHEMA_MODELS",
    "SCHEMA_STRUCTS",
    "render_schema",
    "render_schemas",
    "schema_filename",
]

OPERATIONS_DIR = "operations"

SCHEMA_MODELS: tuple[type[BaseModel], ...] = (*MESSAGE_TYPES, Envelope, TrustList)
SCHEMA_STRUCTS: tuple[type[msgspec.Struct], ...] = (ResultBatch,)


def schema_filename(model: type[BaseModel]) -> str:
    """The file name of ``model``'s schema, e.g. ``"Command.json"``."""
    return f"{model.__name__}.json"


def render_schema(model: type[BaseModel]) -> str:
    """``model``'s JSON Schema as stable text: indented, key-sorted, newline-terminated."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def _operation_schema(name: str) -> str:
    schema = OPERATIONS[name].request.model_json_schema()
    schema["title"] = f"{name} arguments"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def _struct_schema(struct: type[msgspec.Struct]) -> str:
    """A msgspec struct's schema with the struct itself at the top, as pydantic writes one."""
    schema = msgspec.json.schema(struct)
    defs = schema.pop("$defs")
    top = defs.pop(struct.__name__)
    if defs:
        top["$defs"] = defs
    return json.dumps(top, indent=2, sort_keys=True) + "\n"


def render_schemas() -> dict[str, str]:
    """Every schema file's relative path mapped to its exact text, in a stable order."""
    files = {schema_filename(model): render_schema(model) for model in SCHEMA_MODELS}
    for struct in SCHEMA_STRUCTS:
        files[f"{struct.__name__}.json"] = _struct_schema(struct)
    for name in sorted(OPERATIONS):
        files[f"{OPERATIONS_DIR}/{name}.json"] = _operation_schema(name)
    return files
