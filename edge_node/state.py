"""The node's small persistent state: ``state.json`` and its trust chain.

Invariants:

* every write is atomic (temp file, fsync, ``os.replace``) so a crash leaves
  either the old or the new state, never a torn file;
* the verifier's ``last_seq`` and attempted keys are written *before* the node
  acts on a command, so a restart never applies a command twice;
* an accepted deploy or rollback is written as ``pending`` in that same write
  and cleared once it ends (terminal status), so a node restarted mid-job
  resumes it instead of forgetting it (the verifier would now call it a
  duplicate);
* result sequence numbers are reserved in blocks (``result_seq_reserved`` is
  saved before a number of a new block is used; :mod:`edge_node.numbering`
  decides when): after a restart numbering resumes above every number handed
  out before, so ``(node, seq)`` stays unique for the controller's store;
* the trust list in force is the one reached by walking ``trust-chain.json``
  from the shipped trust list (TUF's root walk), never a file taken on its
  own; ``state.json`` records the highest version taken and its digest, so a
  deleted or shortened chain stops the node instead of reviving old keys;
* a save the disk has no room for raises :class:`~edge_node.disk.DiskFullError`
  (any other failed write: :class:`StateFileError`); the change stays in
  memory and the next save that finds room writes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edge_node.core import VerifierState
from edge_node.disk import DiskFullError, is_disk_full
from edge_node.numbering import RESULT_SEQ_BLOCK
from edgefleet_io.files import atomic_write
from shared.codec import decode_json, encode_json
from shared.errors import DecodeError, EdgeFleetError, TrustFileError
from shared.messages import ModelRef
from shared.trust import TrustStore

__all__ = [
    "RESULT_SEQ_BLOCK",
    "NodeStore",
    "PendingCommand",
    "PersistedState",
    "StateFileError",
    "StateKeeper",
]


log = logging.getLogger(__name__)

_MAX_CHAIN_BYTES = 64 * 1024 * 1024


class StateFileError(EdgeFleetError):
    """``state.json`` exists but cannot be read, or cannot be written."""


class PendingCommand(BaseModel):
    """An accepted deploy or rollback whose job has not ended yet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command_id: str
    envelope: str
    """The signed command envelope exactly as received (UTF-8 JSON): verified again on resume."""


class PersistedState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session: int = 0
    last_seq: int = 0
    attempted: list[str] = Field(default_factory=list)
    active: ModelRef | None = None
    previous: ModelRef | None = None
    result_seq_reserved: int = 0
    pending: PendingCommand | None = None
    trust_version: int = 0
    """The highest trust list version this node has taken, and its digest: a
    trust chain that no longer reaches it was cut short (the node refuses to start)."""
    trust_digest: str | None = None

    def verifier_state(self) -> VerifierState:
        return VerifierState(
            last_seq=self.last_seq,
            attempted=tuple(self.attempted),
            active=self.active,
            previous=self.previous,
        )


class NodeStore:
    """``DATA/state.json`` and ``DATA/trust-chain.json`` (the rotations taken since
    the shipped trust list, in order)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.state_path = data_dir / "state.json"
        self.chain_path = data_dir / "trust-chain.json"
        self.legacy_trust_path = data_dir / "trust.json"  # the one rotated copy of 0.1
        self._links: list[bytes] = []  # the chain as last walked
        data_dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> PersistedState:
        """Raises: StateFileError when the file exists but is unreadable."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            # A new (or wiped) node numbers its results from the clock in
            # microseconds, above anything an earlier life of it reported.
            return PersistedState(result_seq_reserved=int(time.time() * 1_000_000))
        except OSError as exc:
            raise StateFileError(f"cannot read {self.state_path}: {exc.strerror}") from None
        try:
            return PersistedState.model_validate(json.loads(raw))
        except ValueError as exc:
            first = str(exc).splitlines()[0]
            raise StateFileError(f"{self.state_path} is corrupt: {first}") from None

    def save(self, state: PersistedState) -> None:
        """Raises: DiskFullError (no room), StateFileError (any other failed write)."""
        try:
            atomic_write(self.state_path, state.model_dump_json(indent=2).encode())
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(f"cannot save {self.state_path}: disk full") from exc
            raise StateFileError(f"cannot save {self.state_path}: {exc.strerror or exc}") from exc

    def load_trust(self, shipped: Path | None, *, now: float) -> TrustStore:
        """The trust list reached by walking the stored chain from the shipped one.

        The shipped file is the anchor: every stored rotation must follow from
        it, version by version, so a file planted in the data directory cannot
        replace it. A chain that no longer reaches the version ``state.json``
        records (deleted or cut short) is refused: rotated-out keys never come back.

        Raises:
            TrustFileError: no shipped file, it cannot be read, the list reached has
                expired or is older than the one this node has taken.
            StateFileError: ``state.json`` is unreadable.
        """
        if shipped is None:
            raise TrustFileError("no trust file given: the node's trust anchor is required")
        try:
            anchor = shipped.read_bytes()
        except FileNotFoundError:
            raise TrustFileError(f"trust file {shipped} does not exist") from None
        except OSError as exc:
            raise TrustFileError(f"cannot read trust file {shipped}: {exc.strerror}") from None
        try:
            chain = self._chain()
            store, taken, broken = TrustStore.walk(anchor, chain, now=now)
        except TrustFileError:
            raise
        except EdgeFleetError as exc:
            raise TrustFileError(f"no usable trust list ({shipped}: {exc})") from None
        if broken is not None:
            log.warning("%s: %s", self.chain_path, broken)
        state = self.load()
        if store.version < state.trust_version or (
            store.version == state.trust_version and state.trust_digest not in (None, store.digest)
        ):
            raise TrustFileError(
                f"the trust chain reaches v{store.version}, but this node has taken "
                f"v{state.trust_version}: {self.chain_path} was removed or altered "
                "(restore it, or enroll the node again with a fresh data directory)"
            )
        self._links = chain[:taken]
        return store

    def _chain(self) -> list[bytes]:
        """The stored rotations (unreadable entries end the chain where they are)."""
        try:
            raw = self.chain_path.read_bytes()
        except FileNotFoundError:
            try:
                return [self.legacy_trust_path.read_bytes()]
            except OSError:
                return []
        except OSError as exc:
            raise TrustFileError(f"cannot read {self.chain_path}: {exc.strerror}") from None
        try:
            links = decode_json(raw, max_bytes=_MAX_CHAIN_BYTES)
        except DecodeError as exc:
            log.warning(
                "%s is unreadable (%s): walking from the shipped list", self.chain_path, exc
            )
            return []
        if not isinstance(links, list):
            return []
        return [encode_json(link) for link in links if isinstance(link, dict)]

    def save_trust(self, store: TrustStore) -> None:
        """Write the chain walked by :meth:`load_trust`, then the rotation to ``store``
        (links that did not verify are dropped)."""
        self._links = [*self._links, store.envelope_bytes()]
        atomic_write(self.chain_path, encode_json([decode_json(link) for link in self._links]))
        self.legacy_trust_path.unlink(missing_ok=True)


class StateKeeper:
    """The node's :class:`PersistedState` in memory, written through to ``state.json``.

    Every change is made on the event loop (one ``model_copy``, so two parts
    changing different fields never lose each other's change) and then saved;
    saves run one at a time in a worker thread, each writing the latest state.
    """

    def __init__(self, store: NodeStore) -> None:
        """Raises: StateFileError when ``state.json`` exists but is unreadable."""
        self._store = store
        self.state = store.load()
        self._lock = asyncio.Lock()

    async def update(self, **changes: Any) -> PersistedState:
        """Apply ``changes`` and save; returns the new state.

        Raises:
            DiskFullError / StateFileError: the save failed (the change is kept in memory).
        """
        self.state = self.state.model_copy(update=changes)
        await self.save()
        return self.state

    async def save(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._store.save, self.state)
