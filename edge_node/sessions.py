"""One onnxruntime session as the node holds it: how sessions are built, the
reference-counted handle requests run on, and timed ``session.run`` calls.

Invariants:

* :class:`SessionOptionsConfig` only asks for providers this machine offers: a
  node's own ``providers`` are checked when it starts (``edge-node`` refuses
  unknown or unavailable ones); a manifest's are preferences, of which those
  missing here are skipped, falling back to ``CPUExecutionProvider``;
* a :class:`LoadedModel` takes no new request once retired, and drops its
  session exactly once, when it is retired and its last request has returned;
  it is thread-safe.

:class:`~edge_node.runtime.ModelRuntime` creates, swaps and retires these.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import onnxruntime as ort

from edge_node.inference_core import (
    choose_providers,
    has_dynamic_batch,
)
from shared.errors import EdgeFleetError
from shared.messages import ModelManifest, ModelRef, TensorSpec

__all__ = [
    "GraphOptimization",
    "InferenceOutcome",
    "LoadedModel",
    "ModelRetiredError",
    "Run",
    "SessionOptionsConfig",
    "elapsed_ms",
    "run_one",
]

GraphOptimization = Literal["disable", "basic", "extended", "all"]

_GRAPH_LEVELS: Final[Mapping[str, Any]] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelRetiredError(EdgeFleetError):
    """A retired model was asked to take a new request (a bug in the caller)."""


# ----- configuration ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOptionsConfig:
    """How sessions are built.

    * ``intra_op_threads`` / ``inter_op_threads``: onnxruntime thread pools; 0
      lets onnxruntime choose (intra-op: one per physical core). Inter-op
      threads only matter for models run in parallel execution mode.
    * ``graph_optimization``: ``"extended"`` (default) applies every
      optimization that is portable across CPUs. ``"all"`` adds layout
      transformations specific to the CPU it runs on: fine for a session built
      in memory on the device, but an optimized model *file* saved with it is
      tied to that CPU, so never ship one across the fleet.
    * ``providers``: execution providers in order of preference, each one this
      machine offers (``edge-node`` checks them at start). ``None`` uses the
      manifest's ``providers``, keeping those this machine offers and falling
      back to ``CPUExecutionProvider``.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: GraphOptimization = "extended"
    providers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0 (0 lets onnxruntime choose)")
        if self.graph_optimization not in _GRAPH_LEVELS:
            raise ValueError(f"unknown graph_optimization {self.graph_optimization!r}")

    def session_options(self) -> Any:
        """A fresh ``onnxruntime.SessionOptions`` for these settings."""
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.graph_optimization_level = _GRAPH_LEVELS[self.graph_optimization]
        return opts

    def providers_for(
        self, manifest: ModelManifest, available: Sequence[str] | None = None
    ) -> tuple[str, ...]:
        """The providers to ask for when loading ``manifest``'s model."""
        preferred = self.providers if self.providers is not None else manifest.providers
        have = ort.get_available_providers() if available is None else available
        return choose_providers(preferred, have)


# ----- a loaded model --------------------------------------------------------


class LoadedModel:
    """One session and its manifest, shared by the requests that run on it.

    A reference-counted handle: :meth:`acquire` before a request, :meth:`release`
    after. :meth:`retire` stops new requests; the session is dropped (``closed``
    becomes true, exactly once) as soon as the handle is retired and its count
    is zero. ``dispose``, when given, receives the session at that moment so the
    last reference can be dropped on another thread (a big session's destructor
    takes a while). Thread-safe.
    """

    def __init__(
        self,
        *,
        manifest: ModelManifest,
        path: Path,
        session: Any,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        providers: tuple[str, ...],
        load_ms: float,
        warmup_ms: float,
        dispose: Callable[[Any], None] | None = None,
    ) -> None:
        self.manifest = manifest
        self.path = path
        self.inputs = inputs
        self.outputs = outputs
        self.output_names = tuple(o.name for o in outputs)
        self.providers = providers
        self.load_ms = load_ms
        self.warmup_ms = warmup_ms
        self.dynamic_batch = has_dynamic_batch(inputs)
        #: Requests in flight when :meth:`retire` was called (``None`` until then).
        self.in_flight_at_retire: int | None = None
        self._dispose = dispose
        self._lock = threading.Lock()
        self._session: Any | None = session
        self._refcount = 0
        self._served = 0
        self._retired = False
        self._closed = False
        self._on_closed: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return (
            f"LoadedModel({self.manifest.name} {self.manifest.version}, "
            f"refcount={self._refcount}, retired={self._retired}, closed={self._closed})"
        )

    @property
    def ref(self) -> ModelRef:
        return self.manifest.ref

    @property
    def session(self) -> Any:
        """The ``InferenceSession``; only valid while holding a reference.

        Raises:
            ModelRetiredError: the session was already closed.
        """
        session = self._session
        if session is None:
            raise ModelRetiredError(f"{self.ref.name} {self.ref.version} is closed")
        return session

    @property
    def refcount(self) -> int:
        return self._refcount

    @property
    def served(self) -> int:
        """How many requests acquired this model (warm-up not included)."""
        return self._served

    @property
    def retired(self) -> bool:
        return self._retired

    @property
    def closed(self) -> bool:
        return self._closed

    def acquire(self) -> None:
        """Take a reference for one request.

        Raises:
            ModelRetiredError: the model is retired and takes no new request.
        """
        with self._lock:
            if self._retired:
                raise ModelRetiredError(f"{self.ref.name} {self.ref.version} is retired")
            self._refcount += 1
            self._served += 1

    def release(self) -> None:
        """Drop one reference; closes the session if retired and this was the last.

        Raises:
            RuntimeError: more releases than acquires.
        """
        with self._lock:
            if self._refcount <= 0:
                raise RuntimeError(f"{self!r} released more often than acquired")
            self._refcount -= 1
            closing = self._close_locked() if self._retired and self._refcount == 0 else None
        self._finish_close(closing)

    def retire(self) -> None:
        """Take no new request; close once the in-flight ones have returned. Idempotent."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            self.in_flight_at_retire = self._refcount
            closing = self._close_locked() if self._refcount == 0 else None
        self._finish_close(closing)

    def on_closed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from whichever thread closes it) once closed; now if already."""
        with self._lock:
            if not self._closed:
                self._on_closed.append(callback)
                return
        callback()

    def _close_locked(self) -> tuple[Any, list[Callable[[], None]]]:
        session, self._session = self._session, None
        self._closed = True
        callbacks, self._on_closed = self._on_closed, []
        return session, callbacks

    def _finish_close(self, closing: tuple[Any, list[Callable[[], None]]] | None) -> None:
        # Outside the lock: dropping the last reference runs the session's
        # destructor, and callbacks may take other locks.
        if closing is None:
            return
        session, callbacks = closing
        if self._dispose is not None:
            self._dispose(session)
        del session
        for callback in callbacks:
            callback()


# ----- running a session ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class InferenceOutcome:
    """One request's outputs (by name), the model that produced them and ``session.run`` time."""

    outputs: dict[str, np.ndarray]
    model: ModelRef
    latency_ms: float


@dataclass(frozen=True, slots=True, eq=False)
class Run:
    """One ``session.run`` over ``rows`` requests from row ``first`` of a stacked feed."""

    first: int
    rows: int
    outputs: dict[str, np.ndarray]
    latency_ms: float


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def run_one(session: Any, feed: dict[str, np.ndarray]) -> tuple[list[np.ndarray], float]:
    start = time.perf_counter()
    outputs: list[np.ndarray] = session.run(None, feed)
    return outputs, elapsed_ms(start)
