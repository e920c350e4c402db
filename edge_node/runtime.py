"""onnxruntime at the edge: load, validate, warm up, hot-swap and run models.

Decisions (signatures, warm-up inputs, providers, batching) live in
:mod:`edge_node.inference_core`; this module only moves them onto threads and
sessions.

Invariants:

* Sessions are created and warmed up in a worker thread, never on the event
  loop, and created one at a time per *process* (a module-wide lock:
  concurrent session creation is not safe, and ``edge-node simulate`` runs many
  runtimes in one process).
* A model is served only after its session's inputs and outputs match its
  manifest (:func:`~edge_node.inference_core.check_signature`) and a warm-up
  inference succeeded.
* Every request acquires one :class:`LoadedModel` before it runs and releases it
  when ``session.run`` has returned (or was never started); the
  :class:`~shared.messages.ModelRef` it reports is that model's, so an output is
  always attributed to the weights that produced it.
* The active model is replaced by one assignment on the event loop. A retired
  model takes no new request; its session is dropped exactly once, when its
  last in-flight request returns.
* ``availability`` mode (default, as TF Serving): load the new model while the
  old one serves; memory holds both for the length of a load. A failed load
  changes nothing. ``resource`` mode (devices that cannot hold two models):
  retire the old model and wait for its in-flight requests first, then load
  the new one. Requests arriving in that *gap* wait (they do not fail); the gap
  costs drain + load + warm-up time of added latency, reported as ``gap_ms``. If
  the new load fails (or the activation is cancelled), the old model is
  reloaded from its path and the error is raised; the requests that waited run
  on it.
* All coroutine methods of one :class:`ModelRuntime` are called from one event
  loop; :class:`LoadedModel` itself is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, ParamSpec, TypeVar

import numpy as np
import onnxruntime as ort

from edge_node.inference_core import (
    ModelMismatchError,
    check_signature,
    first_line,
    holds_rows,
    make_inputs,
    resolve_specs,
    spec_from_ort,
)
from edge_node.results_core import LatencyWindow
from edge_node.sessions import (
    GraphOptimization,
    InferenceOutcome,
    LoadedModel,
    ModelRetiredError,
    Run,
    SessionOptionsConfig,
    elapsed_ms,
    run_one,
)
from shared.errors import EdgeFleetError, TrustError
from shared.messages import ModelManifest, ModelRef

__all__ = [
    "ActivationResult",
    "GraphOptimization",
    "InferenceError",
    "InferenceOutcome",
    "LoadedModel",
    "ModelLoadError",
    "ModelMismatchError",
    "ModelRetiredError",
    "ModelRuntime",
    "NoModelError",
    "Run",
    "SessionOptionsConfig",
    "SwapMode",
]

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

SwapMode = Literal["availability", "resource"]

# Concurrent InferenceSession creation is not safe; this guards every runtime in
# the process, not just one.
_SESSION_CREATE_LOCK: Final = threading.Lock()
_HALT_POLL_S: Final = 0.25  # how often a thread waiting for a model looks at its halt flag


class ModelLoadError(TrustError):
    """A model could not be loaded or warmed up (corrupt file, bad graph, warm-up failed)."""

    code = "model_invalid"


class NoModelError(EdgeFleetError):
    """No model is active (none activated yet, or the runtime is closed)."""


class InferenceError(EdgeFleetError):
    """``session.run`` failed on these inputs (wrong names, dtypes or shapes, runtime fault)."""


# ----- results ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationResult:
    """What an activation did and how long it took (milliseconds).

    ``gap_ms`` is how long no model was active (always 0 in availability mode;
    drain + load + warm-up in resource mode); ``drain_ms`` how long the old
    model's in-flight requests took to return in resource mode.
    """

    model: ModelRef
    previous: ModelRef | None
    mode: SwapMode
    providers: tuple[str, ...]
    load_ms: float
    warmup_ms: float
    gap_ms: float
    drain_ms: float


# ----- the runtime -----------------------------------------------------------


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class ModelRuntime:
    """The node's models: one active, hot-swapped without failing a request.

    ``executor`` runs ``session.run`` (onnxruntime releases the GIL); when
    omitted the runtime owns a small pool and shuts it down in :meth:`close`.
    Loads always run on the runtime's own single loader thread.
    """

    def __init__(
        self,
        *,
        options: SessionOptionsConfig,
        swap_mode: SwapMode = "availability",
        executor: ThreadPoolExecutor | None = None,
        latency_capacity: int = 2048,
    ) -> None:
        if swap_mode not in ("availability", "resource"):
            raise ValueError(f"unknown swap_mode {swap_mode!r}")
        self.options = options
        self.swap_mode: SwapMode = swap_mode
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=_default_workers(), thread_name_prefix="ort-run"
        )
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort-load")
        self._active: LoadedModel | None = None
        # Notified on every change of _active, for threads waiting for a model.
        self._active_changed = threading.Condition()
        self._counts = threading.Lock()  # counters updated from inference threads
        # Requests waiting through a resource-mode gap; None when there is no gap.
        self._waiters: list[asyncio.Future[LoadedModel]] | None = None
        self._swap_lock = asyncio.Lock()
        self._closed = False
        self.latency = LatencyWindow(latency_capacity)
        self.inferences = 0
        self.stacked_runs = 0  # batches that ran as one session.run
        self.errors = 0

    @property
    def active(self) -> ModelRef | None:
        """The model new requests run on; ``None`` before the first activation and in a gap."""
        return self._active.ref if self._active is not None else None

    @property
    def handle(self) -> LoadedModel | None:
        """The active :class:`LoadedModel` (for status and tests; do not retire it)."""
        return self._active

    # ----- loading -------------------------------------------------------

    async def load(self, path: Path, manifest: ModelManifest) -> LoadedModel:
        """Create, check and warm up a session for ``path`` on the loader thread.

        The result is not active; :meth:`activate` makes it so.

        Raises:
            ModelLoadError: onnxruntime refused the file, or the warm-up inputs
                or the warm-up inference failed (one-line reason).
            ModelMismatchError: the model's inputs or outputs differ from the manifest's.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, self._load_sync, Path(path), manifest)

    def _load_sync(self, path: Path, manifest: ModelManifest) -> LoadedModel:
        what = f"{manifest.name} {manifest.version}"
        providers = self.options.providers_for(manifest)
        start = time.perf_counter()
        try:
            with _SESSION_CREATE_LOCK:
                session = ort.InferenceSession(
                    str(path),
                    sess_options=self.options.session_options(),
                    providers=list(providers),
                )
        except Exception as exc:
            raise ModelLoadError(f"cannot load {what} from {path.name}: {first_line(exc)}") from exc
        load_ms = elapsed_ms(start)
        inputs = tuple(spec_from_ort(a.name, a.type, a.shape) for a in session.get_inputs())
        outputs = tuple(spec_from_ort(o.name, o.type, o.shape) for o in session.get_outputs())
        check_signature(manifest, inputs, outputs)
        try:
            feed = make_inputs(resolve_specs(manifest.inputs, inputs), manifest.warmup)
        except ValueError as exc:
            raise ModelLoadError(f"warm-up inputs of {what} are invalid: {exc}") from exc
        start = time.perf_counter()
        try:
            session.run(None, feed)
        except Exception as exc:
            raise ModelLoadError(f"warm-up inference of {what} failed: {first_line(exc)}") from exc
        warmup_ms = elapsed_ms(start)
        return LoadedModel(
            manifest=manifest,
            path=path,
            session=session,
            inputs=inputs,
            outputs=outputs,
            providers=tuple(session.get_providers()),
            load_ms=load_ms,
            warmup_ms=warmup_ms,
            dispose=self._dispose,
        )

    # ----- swapping ------------------------------------------------------

    async def activate(self, path: Path, manifest: ModelManifest) -> ActivationResult:
        """Make the model at ``path`` the active one, in this runtime's ``swap_mode``.

        Activations are serialized. See the module docstring for what each mode
        guarantees.

        Raises:
            ModelLoadError, ModelMismatchError: the new model was refused; the
                previous model (if any) is active again (resource mode: reloaded).
            NoModelError: the runtime is closed.
        """
        self._check_open()
        async with self._swap_lock:
            self._check_open()
            if self.swap_mode == "resource":
                return await self._activate_resource(Path(path), manifest)
            return await self._activate_availability(Path(path), manifest)

    async def _activate_availability(self, path: Path, manifest: ModelManifest) -> ActivationResult:
        new = await self.load(path, manifest)  # the old model serves meanwhile
        # One step on the loop: no request can see both, or neither.
        old = self._active
        self._set_active(new)
        if old is not None:
            old.retire()
        log.info(
            "activated %s %s (load %.1f ms, warm-up %.1f ms)",
            manifest.name,
            manifest.version,
            new.load_ms,
            new.warmup_ms,
        )
        return ActivationResult(
            model=new.ref,
            previous=old.ref if old is not None else None,
            mode="availability",
            providers=new.providers,
            load_ms=new.load_ms,
            warmup_ms=new.warmup_ms,
            gap_ms=0.0,
            drain_ms=0.0,
        )

    async def _activate_resource(self, path: Path, manifest: ModelManifest) -> ActivationResult:
        old = self._active
        gap_start = time.perf_counter()
        self._waiters = []
        self._set_active(None)
        try:
            try:
                if old is not None:
                    await self._retire_and_drain(old)
                drain_ms = elapsed_ms(gap_start)
                new = await self.load(path, manifest)
            except BaseException as exc:
                # Failed or cancelled (even while draining): bring the old model back.
                if old is not None:
                    await self._restore(old, exc)
                raise
            self._set_active(new)
        finally:
            self._end_gap()
        gap_ms = elapsed_ms(gap_start)
        log.info(
            "activated %s %s in resource mode (gap %.1f ms: drain %.1f, load %.1f, warm-up %.1f)",
            manifest.name,
            manifest.version,
            gap_ms,
            drain_ms,
            new.load_ms,
            new.warmup_ms,
        )
        return ActivationResult(
            model=new.ref,
            previous=old.ref if old is not None else None,
            mode="resource",
            providers=new.providers,
            load_ms=new.load_ms,
            warmup_ms=new.warmup_ms,
            gap_ms=gap_ms,
            drain_ms=drain_ms,
        )

    async def _restore(self, old: LoadedModel, exc: BaseException) -> None:
        log.warning(
            "loading the new model failed (%s); reloading %s %s",
            first_line(exc),
            old.manifest.name,
            old.manifest.version,
        )
        try:
            self._set_active(await self.load(old.path, old.manifest))
        except Exception as again:
            log.exception("could not reload %s %s", old.manifest.name, old.manifest.version)
            exc.add_note(f"reloading the previous model also failed: {first_line(again)}")

    def _end_gap(self) -> None:
        # Hand the new (or restored) model to every waiter now, each with its
        # own reference, rather than waking them to race for it: an activation
        # that follows at once cannot starve them, and its drain waits for them.
        waiters, self._waiters = self._waiters or [], None
        handle = self._active
        for waiter in waiters:
            if waiter.done():  # its request was cancelled
                continue
            if handle is None:
                waiter.set_exception(
                    NoModelError("no model is active: the new model and the previous one failed")
                )
            else:
                handle.acquire()
                waiter.set_result(handle)

    def _dispose(self, session: Any) -> None:
        # The loader thread drops the last reference, so a big session's
        # destructor never stalls the event loop. Once the loader is shut down,
        # the caller's thread drops it.
        with contextlib.suppress(RuntimeError):
            self._loader.submit(_drop, session)

    async def _retire_and_drain(self, handle: LoadedModel) -> None:
        loop = asyncio.get_running_loop()
        drained: asyncio.Future[None] = loop.create_future()

        def closed() -> None:
            # Called from the thread that released the last reference; the loop
            # may be gone by then if the caller abandoned it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, drained)

        handle.on_closed(closed)
        handle.retire()
        await drained

    # ----- inference -----------------------------------------------------

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> InferenceOutcome:
        """Run the active model on ``inputs`` in the executor.

        In a resource-mode gap, waits for the new (or restored) model.

        Raises:
            NoModelError: no model is active, or the runtime is closed.
            InferenceError: ``session.run`` refused or failed (one-line reason).
        """
        handle = await self._acquire()
        future = self._submit(handle, run_one, handle.session, dict(inputs))
        try:
            outputs, ms = await asyncio.wrap_future(future)
        except Exception as exc:
            with self._counts:
                self.errors += 1
            raise InferenceError(f"inference failed on {_what(handle)}: {first_line(exc)}") from exc
        with self._counts:
            self.inferences += 1
        self.latency.add(ms)
        return InferenceOutcome(
            outputs=dict(zip(handle.output_names, outputs, strict=True)),
            model=handle.ref,
            latency_ms=ms,
        )

    # ----- inference from a thread ---------------------------------------

    def acquire_blocking(self, halt: threading.Event) -> LoadedModel | None:
        """From an inference thread: the active model, with a reference taken.

        Waits while no model is active (before the first activation, in a
        resource-mode gap); ``None`` once ``halt`` is set or the runtime is
        closed. The caller runs on it and then calls ``release()``.
        """
        while not (halt.is_set() or self._closed):
            handle = self._active
            if handle is not None:
                try:
                    handle.acquire()
                except ModelRetiredError:
                    continue  # swapped out between the read and the acquire: read again
                return handle
            with self._active_changed:
                if self._active is None and not self._closed:
                    # Bounded, so a halt is seen without a notification.
                    self._active_changed.wait(_HALT_POLL_S)
        return None

    def run_rows(self, handle: LoadedModel, feed: Mapping[str, np.ndarray], rows: int) -> list[Run]:
        """From an inference thread: run ``rows`` stacked requests on ``handle`` (acquired).

        One ``session.run`` for all rows; if an output does not hold ``rows``
        rows (the model mixes them), the requests run again one by one (row
        ``i`` is ``array[i:i+1]``). With ``rows`` 1, ``feed`` is one request
        as it is.

        Raises:
            InferenceError: ``session.run`` refused or failed (one-line reason).
        """
        session = handle.session
        try:
            outputs, ms = run_one(session, dict(feed))
            runs = [Run(0, rows, dict(zip(handle.output_names, outputs, strict=True)), ms)]
            if rows > 1 and not holds_rows(outputs, rows):
                runs = []
                for row in range(rows):
                    single = {name: value[row : row + 1] for name, value in feed.items()}
                    outputs, ms = run_one(session, single)
                    runs.append(
                        Run(row, 1, dict(zip(handle.output_names, outputs, strict=True)), ms)
                    )
        except Exception as exc:
            with self._counts:
                self.errors += rows
            raise InferenceError(f"inference failed on {_what(handle)}: {first_line(exc)}") from exc
        with self._counts:
            self.inferences += rows
            self.stacked_runs += rows > 1 and len(runs) == 1
        return runs

    async def _acquire(self) -> LoadedModel:
        self._check_open()
        handle = self._active
        if handle is not None:
            # No await between reading _active and acquiring: a swap (which
            # runs on this loop) cannot retire it in between.
            handle.acquire()
            return handle
        if self._waiters is None:
            raise NoModelError("no model is active")
        waiter: asyncio.Future[LoadedModel] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Cancelled after the handle was handed over: give the reference back.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                waiter.result().release()
            raise

    def _submit(
        self,
        handle: LoadedModel,
        fn: Callable[_P, _R],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> Future[_R]:
        # Release from the future's done-callback rather than after the await:
        # if the awaiting task is cancelled, session.run still finishes in its
        # thread, and the reference must be held until it really has (or the
        # job was cancelled before it started). Registered before wrap_future's
        # callback, it runs first, so the release has happened by the time the
        # awaiting coroutine resumes.
        try:
            future = self._executor.submit(fn, *args, **kwargs)
        except BaseException:
            handle.release()
            raise
        future.add_done_callback(lambda _f: handle.release())
        return future

    # ----- shutdown ------------------------------------------------------

    async def close(self) -> None:
        """Stop taking requests, wait for in-flight ones, drop the session. Idempotent.

        Threads waiting in :meth:`acquire_blocking` get ``None``.

        An executor passed in by the caller is left running.
        """
        if self._closed:
            return
        self._closed = True
        async with self._swap_lock:
            old = self._active
            self._set_active(None)
            if old is not None:
                await self._retire_and_drain(old)
        self._loader.shutdown(wait=False)  # queued session drops still run
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _set_active(self, handle: LoadedModel | None) -> None:
        # One assignment (atomic for readers on any thread), then wake waiting threads.
        with self._active_changed:
            self._active = handle
            self._active_changed.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise NoModelError("the model runtime is closed")


def _drop(session: Any) -> None:
    """Run on the loader thread; its work item holds the last reference until it returns."""
    del session


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _what(handle: LoadedModel) -> str:
    return f"{handle.ref.name} {handle.ref.version}"
