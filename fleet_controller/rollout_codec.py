"""JSON form of the rollout engine's :class:`~fleet_controller.rollout_core.RolloutRecord`.

The controller persists every record it acts on (``rollouts.record_json``), so a
restarted controller resumes each rollout exactly where it was. Pure: no I/O.

Invariants:

* **Exact round trip.** ``record_from_json(record_to_json(r)) == r`` for every
  record: enums travel as their values, ``ModelRef`` as its three fields,
  tuples as lists (rebuilt as tuples), mappings as objects (rebuilt as dicts),
  floats as floats (an ``int`` given for a float field comes back as ``float``,
  which compares equal), a selector as its canonical text (so a record's
  selector must be canonical, as :func:`shared.labels.parse_selector` makes it).
* **Deterministic.** Compact, key-sorted JSON: equal records give equal text.
* **Strict.** The text is read with :func:`shared.codec.decode_json` (no
  duplicate keys, no NaN, 64-bit integers); every object must hold exactly the
  known keys (a key that is absent takes the field's default, so records written
  before a field existed still load); every value must have its field's type.
  Anything else raises :class:`~shared.errors.DecodeError`. ``FORMAT`` is
  written as ``"format"``; a record of format 1 loads without its per-node
  ``baseline`` samples, and a record of any other format is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from pydantic import ValidationError

from fleet_controller.rollout_core import NodeProgress, RolloutRecord, RolloutSpec
from shared.codec import decode_json
from shared.errors import DecodeError
from shared.labels import Selector, format_labels, format_selector, parse_selector
from shared.messages import ModelRef, NodeRolloutState, RolloutState

__all__ = ["FORMAT", "MAX_RECORD_BYTES", "record_from_json", "record_to_json"]

FORMAT = 2  # 2: the health gate's judgements replaced the per-node baseline sample
# A record holds one entry (~0.5 KB) per node of the rollout: room for ~500k nodes.
MAX_RECORD_BYTES = 256 * 1024 * 1024

T = TypeVar("T")


# ----- encoding -------------------------------------------------------------------


def _ref(ref: ModelRef | None) -> dict[str, str] | None:
    if ref is None:
        return None
    return {"name": ref.name, "version": ref.version, "sha256": ref.sha256}


def _spec(spec: RolloutSpec) -> dict[str, Any]:
    return {
        "rollout_id": spec.rollout_id,
        "model": _ref(spec.model),
        "selector": format_selector(spec.selector),
        "nodes": list(spec.nodes),
        "deployment": spec.deployment,
        "waves": list(spec.waves),
        "max_failures": spec.max_failures,
        "wave_timeout_s": spec.wave_timeout_s,
        "health_window_s": spec.health_window_s,
        "max_latency_regression": spec.max_latency_regression,
        "min_latency_regression_ms": spec.min_latency_regression_ms,
        "max_error_increase": spec.max_error_increase,
        "gates": list(spec.gates),
        "confidence": spec.confidence,
        "min_samples": spec.min_samples,
        "breach_evaluations": spec.breach_evaluations,
        "auto_rollback": spec.auto_rollback,
        "activate_at": spec.activate_at,
        "max_retries": spec.max_retries,
        "retry_backoff_s": spec.retry_backoff_s,
    }


def _node(progress: NodeProgress) -> dict[str, Any]:
    return {
        "node_id": progress.node_id,
        "wave": progress.wave,
        "state": progress.state.value,
        "attempts": progress.attempts,
        "sent_at": progress.sent_at,
        "activated_at": progress.activated_at,
        "activated_ts": progress.activated_ts,
        "retry_at": progress.retry_at,
        "from_model": _ref(progress.from_model),
        "code": progress.code,
        "reason": progress.reason,
        "rollback_sent": progress.rollback_sent,
        "evaluated_ts": progress.evaluated_ts,
        "runs": progress.runs,
        "breaches": progress.breaches,
        "passes": progress.passes,
    }


def record_to_json(record: RolloutRecord) -> str:
    """Compact, key-sorted JSON of ``record``.

    Raises:
        ValueError: a float of the record is NaN or infinite (JSON cannot hold it).
    """
    value = {
        "format": FORMAT,
        "spec": _spec(record.spec),
        "state": record.state.value,
        "wave": record.wave,
        "wave_started_at": record.wave_started_at,
        "nodes": {key: _node(progress) for key, progress in record.nodes.items()},
        "reason": record.reason,
    }
    return json.dumps(
        value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    )


# ----- decoding -------------------------------------------------------------------


class _Obj:
    """One JSON object being decoded: typed getters that name the path on error."""

    def __init__(self, value: Any, path: str, known: frozenset[str]) -> None:
        if not isinstance(value, dict):
            raise DecodeError(f"rollout record: {path} must be an object")
        unknown = sorted(set(value) - known)
        if unknown:
            raise DecodeError(f"rollout record: {path}.{unknown[0]}: unknown field")
        self.value: dict[str, Any] = value
        self.path = path

    def has(self, key: str) -> bool:
        return key in self.value

    def get(self, key: str, check: Callable[[Any, str], T]) -> T:
        if key not in self.value:
            raise DecodeError(f"rollout record: {self.path}.{key}: field required")
        return check(self.value[key], f"{self.path}.{key}")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DecodeError(f"rollout record: {where} must be a string")
    return value


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeError(f"rollout record: {where} must be an integer")
    return value


def _float(value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise DecodeError(f"rollout record: {where} must be a number")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise DecodeError(f"rollout record: {where} must be true or false")
    return value


def _optional(check: Callable[[Any, str], T]) -> Callable[[Any, str], T | None]:
    def checked(value: Any, where: str) -> T | None:
        return None if value is None else check(value, where)

    return checked


def _enum(kind: Callable[[str], T]) -> Callable[[Any, str], T]:
    def checked(value: Any, where: str) -> T:
        try:
            return kind(_str(value, where))
        except ValueError:
            raise DecodeError(f"rollout record: {where}: unknown state {value!r}") from None

    return checked


def _model_ref(value: Any, where: str) -> ModelRef:
    obj = _Obj(value, where, frozenset({"name", "version", "sha256"}))
    try:
        return ModelRef(
            name=obj.get("name", _str),
            version=obj.get("version", _str),
            sha256=obj.get("sha256", _str),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise DecodeError(f"rollout record: {where}.{field}: {first['msg']}") from None


def _selector(value: Any, where: str) -> Selector:
    """The selector's canonical text; a label map (records written before selectors
    had operators) means those ``key=value`` terms."""
    if isinstance(value, dict):
        labels = {key: _str(item, f"{where}.{key}") for key, item in value.items()}
        value = format_labels(labels)
    try:
        return parse_selector(_str(value, where))
    except DecodeError as exc:
        raise DecodeError(f"rollout record: {where}: {exc}") from None


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise DecodeError(f"rollout record: {where} must be a list")
    return tuple(_str(item, f"{where}[{index}]") for index, item in enumerate(value))


def _floats(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise DecodeError(f"rollout record: {where} must be a list")
    return tuple(_float(item, f"{where}[{index}]") for index, item in enumerate(value))


def _kwargs(
    obj: _Obj, cls: type[Any], checks: Mapping[str, Callable[[Any, str], Any]]
) -> dict[str, Any]:
    """Decode every key ``obj`` holds; absent keys fall back to ``cls``'s defaults."""
    kwargs: dict[str, Any] = {}
    for field in fields(cls):
        if obj.has(field.name):
            kwargs[field.name] = obj.get(field.name, checks[field.name])
        elif field.default is MISSING and field.default_factory is MISSING:
            raise DecodeError(f"rollout record: {obj.path}.{field.name}: field required")
    return kwargs


_SPEC_CHECKS: Mapping[str, Callable[[Any, str], Any]] = {
    "rollout_id": _str,
    "model": _model_ref,
    "selector": _selector,
    "nodes": _strs,
    "deployment": _optional(_str),
    "waves": _floats,
    "max_failures": _float,
    "wave_timeout_s": _float,
    "health_window_s": _float,
    "max_latency_regression": _float,
    "min_latency_regression_ms": _float,
    "max_error_increase": _float,
    "gates": _strs,
    "confidence": _float,
    "min_samples": _int,
    "breach_evaluations": _int,
    "auto_rollback": _bool,
    "activate_at": _optional(_float),
    "max_retries": _int,
    "retry_backoff_s": _float,
}

_NODE_CHECKS: Mapping[str, Callable[[Any, str], Any]] = {
    "node_id": _str,
    "wave": _int,
    "state": _enum(NodeRolloutState),
    "attempts": _int,
    "sent_at": _optional(_float),
    "activated_at": _optional(_float),
    "activated_ts": _optional(_float),
    "retry_at": _optional(_float),
    "from_model": _optional(_model_ref),
    "code": _optional(_str),
    "reason": _optional(_str),
    "rollback_sent": _bool,
    "evaluated_ts": _optional(_float),
    "runs": _int,
    "breaches": _int,
    "passes": _int,
}

_RECORD_KEYS = frozenset({"format", "spec", "state", "wave", "wave_started_at", "nodes", "reason"})


def _spec_from(value: Any, where: str) -> RolloutSpec:
    obj = _Obj(value, where, frozenset(_SPEC_CHECKS))
    return RolloutSpec(**_kwargs(obj, RolloutSpec, _SPEC_CHECKS))


def _progress_from(value: Any, where: str) -> NodeProgress:
    obj = _Obj(value, where, frozenset(_NODE_CHECKS))
    return NodeProgress(**_kwargs(obj, NodeProgress, _NODE_CHECKS))


def _nodes(value: Any, where: str) -> dict[str, NodeProgress]:
    if not isinstance(value, dict):
        raise DecodeError(f"rollout record: {where} must be an object")
    # Key order: sorted, as written; the engine enrols nodes in sorted order too.
    return {key: _progress_from(item, f"{where}[{key!r}]") for key, item in value.items()}


def _upgrade_format_1(value: dict[str, Any]) -> None:
    """Format 1 kept each node's last sample before the rollout (``baseline``);
    the health gate now reads the telemetry itself, so the sample is dropped."""
    nodes = value.get("nodes")
    if isinstance(nodes, dict):
        for node in nodes.values():
            if isinstance(node, dict):
                node.pop("baseline", None)


def record_from_json(text: str | bytes) -> RolloutRecord:
    """Parse what :func:`record_to_json` wrote.

    Raises:
        DecodeError: the text is not strict JSON, not of format :data:`FORMAT`,
            has an unknown key, lacks a required key, or holds a value of the
            wrong type (including an unknown state or an invalid model reference).
    """
    payload = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    value = decode_json(payload, max_bytes=MAX_RECORD_BYTES)
    obj = _Obj(value, "record", _RECORD_KEYS)
    version = obj.get("format", _int)
    if version == 1:
        _upgrade_format_1(obj.value)
    elif version != FORMAT:
        raise DecodeError(f"rollout record: format {version} is not supported (expected {FORMAT})")
    kwargs: dict[str, Any] = {"spec": obj.get("spec", _spec_from)}
    optional: Mapping[str, Callable[[Any, str], Any]] = {
        "state": _enum(RolloutState),
        "wave": _int,
        "wave_started_at": _optional(_float),
        "nodes": _nodes,
        "reason": _optional(_str),
    }
    for key, check in optional.items():
        if obj.has(key):
            kwargs[key] = obj.get(key, check)
    return RolloutRecord(**kwargs)
