"""The node's small persistent state: ``state.json`` and its copy of the trust list.

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
  out before, so ``(node, seq)`` stays unique for the controller's store.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edge_node.core import VerifierState
from edge_node.numbering import RESULT_SEQ_BLOCK
from edgefleet_io.files import atomic_write
from shared.errors import EdgeFleetError, TrustFileError
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


class StateFileError(EdgeFleetError):
    """``state.json`` exists but cannot be read."""


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

    def verifier_state(self) -> VerifierState:
        return VerifierState(
            last_seq=self.last_seq,
            attempted=tuple(self.attempted),
            active=self.active,
            previous=self.previous,
        )


class NodeStore:
    """``DATA/state.json`` and ``DATA/trust.json`` (the rotated trust list)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.state_path = data_dir / "state.json"
        self.trust_path = data_dir / "trust.json"
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
        atomic_write(self.state_path, state.model_dump_json(indent=2).encode())

    def load_trust(self, shipped: Path | None, *, now: float) -> TrustStore:
        """The newest trust list that verifies: the rotated copy, else the shipped file.

        The rotated copy may be missing (a node that never rotated); the shipped
        file, when named, must be readable: a wrong path is a misconfiguration,
        not a reason to carry on with whatever else is there.

        Raises:
            TrustFileError: the shipped file cannot be read, or no list verifies
                (missing, malformed, badly signed or expired; the reasons are named).
        """
        candidates: list[TrustStore] = []
        errors: list[str] = []
        for path in (self.trust_path, shipped):
            if path is None:
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                if path == shipped:
                    raise TrustFileError(f"trust file {path} does not exist") from None
                continue
            except OSError as exc:
                raise TrustFileError(f"cannot read trust file {path}: {exc.strerror}") from None
            try:
                candidates.append(TrustStore.bootstrap(data, now=now))
            except EdgeFleetError as exc:
                errors.append(f"{path}: {exc}")
        if not candidates:
            detail = "; ".join(errors) or "no trust file given and none rotated in"
            raise TrustFileError(f"no usable trust list ({detail})")
        return max(candidates, key=lambda store: store.version)

    def save_trust(self, store: TrustStore) -> None:
        atomic_write(self.trust_path, store.envelope_bytes())


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
        """Apply ``changes`` and save; returns the new state."""
        self.state = self.state.model_copy(update=changes)
        await self.save()
        return self.state

    async def save(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._store.save, self.state)
