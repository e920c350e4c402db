"""Input sources for the inference loop: synthetic, a directory of files, MQTT requests.

A directory and MQTT requests yield :class:`SourceItem` objects on the event
loop; ``next()`` returns ``None`` when the source is closed. Loading files
happens in a worker thread, never on the event loop. The synthetic source is
drawn from by the inference threads themselves, a batch of rows at a time
(:class:`SyntheticSource`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_node.inference_core import make_inputs, numpy_dtype
from edge_node.results_core import DIGEST_HEX, row_digests
from shared.messages import InferRequest, ModelManifest, TensorSpec

__all__ = [
    "DirectorySource",
    "InputQueue",
    "InputSource",
    "MqttSource",
    "SourceItem",
    "SyntheticRows",
    "SyntheticSource",
    "parse_source",
    "tensor_error",
]

log = logging.getLogger(__name__)

_QUEUE_POLL_S = 0.25  # how often a thread waiting on an InputQueue looks at its halt flag


@dataclass(frozen=True, slots=True)
class SourceItem:
    inputs: dict[str, np.ndarray]
    source: str
    request: InferRequest | None = None


class InputSource(Protocol):
    async def next(self) -> SourceItem | None: ...

    def close(self) -> None: ...

    def depth(self) -> int: ...


ManifestGetter = Callable[[], ModelManifest | None]


@dataclass(frozen=True, slots=True, eq=False)
class SyntheticRows:
    """Stacked synthetic inputs: ``rows`` requests, and their digests (``DIGEST_HEX`` each)."""

    inputs: dict[str, np.ndarray]
    rows: int
    digests: str


class _Pool:
    """Pre-drawn requests for one model: one array per input, requests along axis 0."""

    def __init__(
        self, manifest: ModelManifest, rng: np.random.Generator, *, max_rows: int, max_bytes: int
    ) -> None:
        template = make_inputs(manifest.inputs, manifest.warmup)
        request_bytes = max(1, sum(a.nbytes for a in template.values()))
        self.size = max(1, min(max_rows, max_bytes // request_bytes))
        self.sha256 = manifest.sha256
        self.arrays = {name: _draw(value, self.size, rng) for name, value in template.items()}
        # A row stacks when every input has a leading dimension of 1 (one request, one row).
        self.stackable = all(v.ndim >= 1 and v.shape[0] == 1 for v in template.values())
        self.digests = "".join(
            row_digests({name: array[i] for name, array in self.arrays.items()}, 1)
            for i in range(self.size)
        )
        self.cursor = 0

    def take(self, rows: int) -> SyntheticRows:
        """``rows`` consecutive pool requests (a view, no copy), stacked along axis 0."""
        rows = min(rows, self.size) if self.stackable else 1
        if self.cursor + rows > self.size:
            self.cursor = 0
        start, self.cursor = self.cursor, self.cursor + rows
        if self.stackable:
            inputs = {
                name: array[start : start + rows].reshape(rows, *array.shape[2:])
                for name, array in self.arrays.items()
            }
        else:
            inputs = {name: array[start] for name, array in self.arrays.items()}
        return SyntheticRows(
            inputs, rows, self.digests[start * DIGEST_HEX : (start + rows) * DIGEST_HEX]
        )


def _draw(template: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` requests like ``template``: floats drawn (as float32, then its dtype)."""
    shape = (count, *template.shape)
    if template.dtype.kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(template.dtype, copy=False)
    return np.ascontiguousarray(np.broadcast_to(template, shape))


class SyntheticSource:
    """Random inputs shaped like the serving model's, at ``rate_hz`` or flat out.

    Worker threads draw from it (thread-safe). Inputs come from a small pool of
    requests drawn once per model in the inputs' own dtypes (at most
    ``pool_rows`` requests and ``pool_bytes`` bytes), reused in turn, with their
    digests computed once: a draw costs no random numbers, copies or hashing.
    """

    def __init__(
        self,
        *,
        rate_hz: float | None,
        seed: int = 0,
        pool_rows: int = 64,
        pool_bytes: int = 4 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = 1.0 / rate_hz if rate_hz else 0.0
        self._rng = np.random.default_rng(seed)
        self._pool_rows = pool_rows
        self._pool_bytes = pool_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._next_at = clock()
        self._pool: _Pool | None = None

    def wait_due(self, halt: threading.Event) -> bool:
        """Wait until an input is due (at once when flat out); False once closed or halted."""
        while not (self._closed.is_set() or halt.is_set()):
            delay = self._next_at - self._clock() if self._interval else 0.0
            if delay <= 0:
                return True
            halt.wait(delay)
        return False

    def draw(self, manifest: ModelManifest, max_rows: int) -> SyntheticRows | None:
        """Up to ``max_rows`` due inputs for ``manifest``'s model; ``None`` when none is due.

        Raises:
            InputSpecError: the model's inputs cannot be built (see
                :func:`~edge_node.inference_core.make_inputs`).
        """
        with self._lock:
            pool = self._pool
            if pool is None or pool.sha256 != manifest.sha256:
                pool = self._pool = _Pool(
                    manifest, self._rng, max_rows=self._pool_rows, max_bytes=self._pool_bytes
                )
            # What one draw can give: the rate is paid only for rows actually made.
            rows = min(max_rows, pool.size) if pool.stackable else 1
            if self._interval:
                now = self._clock()
                # At most a second of backlog is made up after a stall.
                self._next_at = max(self._next_at, now - 1.0)
                due = int((now - self._next_at) // self._interval) + 1
                if due < 1:
                    return None
                rows = min(rows, due)
                self._next_at += rows * self._interval
            return pool.take(rows)

    def close(self) -> None:
        self._closed.set()

    def depth(self) -> int:
        return 0


class DirectorySource:
    """Every new ``.npy``/``.npz`` (and image, when Pillow is installed) file is an input.

    ``.npy`` feeds the model's first input; ``.npz`` maps array names to inputs.
    Files are taken in name order; a file that cannot be read is logged and skipped.
    """

    def __init__(self, directory: Path, manifest: ManifestGetter, *, poll_s: float = 0.5) -> None:
        self._dir = directory
        self._manifest = manifest
        self._poll_s = poll_s
        self._seen: set[str] = set()
        self._ready: list[Path] = []
        self._closed = asyncio.Event()

    async def next(self) -> SourceItem | None:
        while not self._closed.is_set():
            manifest = self._manifest()
            if manifest is not None:
                if not self._ready:
                    self._ready = await asyncio.to_thread(self._scan)
                while self._ready:
                    path = self._ready.pop(0)
                    try:
                        inputs = await asyncio.to_thread(_load_file, path, manifest.inputs)
                    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                        log.warning("skipping input file %s: %s", path.name, exc)
                        continue
                    return SourceItem(inputs, f"dir:{path.name}")
            await _first(self._closed.wait(), asyncio.sleep(self._poll_s))
        return None

    def _scan(self) -> list[Path]:
        try:
            names = sorted(p for p in self._dir.iterdir() if p.is_file())
        except OSError as exc:
            log.warning("cannot list input directory %s: %s", self._dir, exc)
            return []
        fresh = [p for p in names if p.name not in self._seen and not p.name.startswith(".")]
        self._seen.update(p.name for p in fresh)
        return fresh

    def close(self) -> None:
        self._closed.set()

    def depth(self) -> int:
        return len(self._ready)


def _load_file(path: Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        return {specs[0].name: _conform(array, specs[0])}
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            by_name = {spec.name: spec for spec in specs}
            missing = [name for name in by_name if name not in archive.files]
            if missing:
                raise ValueError(f"archive lacks input {missing[0]!r}")
            return {name: _conform(archive[name], spec) for name, spec in by_name.items()}
    if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        return {specs[0].name: _load_image(path, specs[0])}
    raise ValueError(f"unsupported input file type {suffix!r}")


def _conform(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Cast to the input's dtype and add a leading batch axis when one is missing."""
    value = array.astype(numpy_dtype(spec.dtype), copy=False)
    if value.ndim == len(spec.shape) - 1:
        value = value[np.newaxis, ...]
    if value.ndim != len(spec.shape):
        raise ValueError(
            f"input {spec.name!r} has rank {value.ndim}, model expects {len(spec.shape)}"
        )
    return value


def _load_image(path: Path, spec: TensorSpec) -> np.ndarray:
    try:
        from PIL import Image  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ValueError("reading images needs Pillow (pip install pillow)") from None
    dims = [d if isinstance(d, int) else None for d in spec.shape]
    with Image.open(path) as image:
        if len(dims) == 4 and dims[2] and dims[3]:  # NCHW
            rgb = image.convert("RGB").resize((dims[3], dims[2]))
            array = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
        else:
            array = np.asarray(image.convert("L"), dtype=np.float32).reshape(-1) / 255.0
    return _conform(array, spec)


class MqttSource:
    """Requests from local applications (``node/{id}/infer/request``), bounded."""

    def __init__(self, manifest: ManifestGetter, *, max_queue: int = 1000) -> None:
        self._manifest = manifest
        self._queue: asyncio.Queue[InferRequest | None] = asyncio.Queue(max_queue)

    def offer(self, request: InferRequest) -> bool:
        """Queue a request; False when the queue is full (the caller replies busy)."""
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            return False
        return True

    async def next(self) -> SourceItem | None:
        while True:
            request = await self._queue.get()
            if request is None:
                self._queue.put_nowait(None)  # wake the next worker too
                return None
            inputs = {
                t.name: np.asarray(t.data, dtype=numpy_dtype(t.dtype)).reshape(t.shape)
                for t in request.inputs
            }
            return SourceItem(inputs, f"mqtt:{request.client}", request)

    def close(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def depth(self) -> int:
        return self._queue.qsize()


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``waits`` (coroutines) finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def parse_source(text: str) -> tuple[str, Path | None]:
    """``synthetic``, ``mqtt``, ``none`` or ``dir:PATH``.

    Raises:
        ValueError: anything else.
    """
    if text in ("synthetic", "mqtt", "none"):
        return text, None
    if text.startswith("dir:") and len(text) > 4:
        return "dir", Path(text[4:])
    raise ValueError(f"unknown source {text!r}: use synthetic, mqtt, none or dir:PATH")


class InputQueue:
    """Inputs from the event loop to the inference threads, bounded; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[SourceItem] = deque()
        self._ready = threading.Condition()
        self._capacity = capacity
        self._closed = False
        self._room = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: SourceItem) -> None:
        """Queue ``item``, waiting (on the loop) while the queue is full."""
        while True:
            with self._ready:
                if len(self._items) < self._capacity:
                    self._items.append(item)
                    self._ready.notify()
                    return
                self._room.clear()
            await self._room.wait()

    def take(
        self, most: int, halt: threading.Event, loop: asyncio.AbstractEventLoop
    ) -> list[SourceItem]:
        """From a thread: up to ``most`` items, waiting for one; ``[]`` once closed and empty."""
        with self._ready:
            while not self._items and not self._closed and not halt.is_set():
                self._ready.wait(_QUEUE_POLL_S)
            items = [self._items.popleft() for _ in range(min(most, len(self._items)))]
        if items:
            loop.call_soon_threadsafe(self._room.set)
        return items

    def close(self) -> None:
        """No more items: threads take what is left, then see the end."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()


def tensor_error(request: InferRequest) -> str | None:
    """Why a request's tensors cannot become arrays (data not filling the shape, a
    value out of the dtype's range), else ``None``. Checked before queueing: the
    source builds the arrays in an inference worker, where the error would end it.
    """
    for tensor in request.inputs:
        try:
            np.asarray(tensor.data, dtype=numpy_dtype(tensor.dtype)).reshape(tensor.shape)
        except (ValueError, OverflowError) as exc:
            return f"input {tensor.name!r}: {exc}"
    return None
