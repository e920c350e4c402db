"""Signed commands: verify, persist, then act; resume what a stop interrupted.

Invariants:

* every command goes through :func:`edge_node.core.verify_command`; without a
  usable trust list the node does not start at all (:meth:`CommandHandler.load_trust`
  raises), so no command is ever judged without one;
* the verifier state (last ``seq``, attempted keys) is saved *before* acting,
  and an accepted deploy or rollback is saved as ``pending`` in that same
  write, so a restart never applies a command twice and never forgets a job;
* a repeated command is answered as :mod:`edge_node.repeats` decides, never run
  again;
* a pending job is verified again with today's trust list before it resumes
  (a key rotated out since must not keep acting); its expiry is not checked
  again, since it was accepted while valid and this only finishes it;
* commands are handled one at a time, in arrival order; the queue is bounded
  and a full one drops (the controller retries);
* junk cannot fill the queue (:meth:`CommandHandler.offer`): what is not a
  DSSE envelope is refused at once, with no status (a flood of junk must not
  become a flood of fsync'd statuses), counted in ``counters["refused_commands"]``
  (reported in telemetry) and logged at most once a second; an envelope whose
  rollout-role signatures do not verify is refused the same way, except one
  per :data:`UNSIGNED_REPORT_EVERY_S`, which goes on to be answered
  ``rejected`` with its reason (so a key mismatch still shows at the
  controller). Only verified commands (and those few) wait in the queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_node.artifacts import ArtifactStore
from edge_node.context import ServingModel
from edge_node.core import (
    Accepted,
    Duplicate,
    Ignored,
    NodeIdentity,
    Rejected,
    record,
    verify_command,
)
from edge_node.jobs import JobRunner, StatusReporter
from edge_node.repeats import answer_duplicate
from edge_node.runtime import ModelRuntime
from edge_node.state import NodeStore, PendingCommand, StateKeeper
from edgefleet_io.throttle import LogThrottle
from shared.acks import open_ack
from shared.envelope import Envelope
from shared.errors import DecodeError, EdgeFleetError, TrustError, TrustFileError
from shared.messages import (
    CancelAction,
    Command,
    DeployAction,
    ModelManifest,
    NodeRolloutState,
    RollbackAction,
    TrustUpdateAction,
    decode,
)
from shared.rates import RateLimiter
from shared.trust import Role, TrustStore

__all__ = ["UNSIGNED_REPORT_EVERY_S", "CommandHandler"]

log = logging.getLogger(__name__)

_QUEUE_LENGTH = 256  # commands waiting to be handled
UNSIGNED_REPORT_EVERY_S = 10.0  # at most one `rejected` status for unverifiable commands


class CommandHandler:
    """The node's commands: trust, verification, answers, and handing jobs to the runner."""

    def __init__(
        self,
        *,
        me: NodeIdentity,
        trust_file: Path | None,
        store: NodeStore,
        keeper: StateKeeper,
        artifacts: ArtifactStore,
        runtime: ModelRuntime,
        serving: ServingModel,
        runner: JobRunner,
        reporter: StatusReporter,
        stopping: asyncio.Event,
        clock: Callable[[], float],
        counters: Counter[str],
    ) -> None:
        self._me = me
        self._trust_file = trust_file
        self._store = store
        self._keeper = keeper
        self._artifacts = artifacts
        self._runtime = runtime
        self._serving = serving
        self._runner = runner
        self._reporter = reporter
        self._stopping = stopping
        self._clock = clock
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(_QUEUE_LENGTH)
        self._trust: TrustStore | None = None
        self._counters = counters
        self._unsigned_reports = RateLimiter(1.0 / UNSIGNED_REPORT_EVERY_S, 1.0, max_keys=1)
        self._refused_log = LogThrottle(log)
        self.refused_acks = 0

    # ----- start ------------------------------------------------------------------

    def load_trust(self) -> None:
        """Walk the trust chain from the shipped list; call it before anything else.

        Raises:
            TrustFileError: there is none (the node must not start: fail closed).
        """
        self._trust = self._store.load_trust(self._trust_file, now=self._clock())

    async def remember_trust(self) -> None:
        """Record the trust list in force as the highest taken (``state.json``)."""
        trust = self.trust
        state = self._keeper.state
        if (state.trust_version, state.trust_digest) != (trust.version, trust.digest):
            await self._keeper.update(trust_version=trust.version, trust_digest=trust.digest)

    @property
    def trust(self) -> TrustStore:
        """The trust list in force. Raises: TrustFileError before :meth:`load_trust`."""
        if self._trust is None:
            raise TrustFileError("the trust list has not been loaded")
        return self._trust

    async def restore_active(self) -> None:
        """Load the active model again after a restart, re-hashing its blob first."""
        ref = self._keeper.state.active
        if ref is None:
            return
        manifest = self._stored_manifest(ref.sha256)
        if manifest is None or not await self._artifacts.verify(ref.sha256):
            log.error("active model %s %s is missing or damaged on disk", ref.name, ref.version)
            return
        try:
            await self._runtime.activate(self._artifacts.path(ref.sha256), manifest)
        except EdgeFleetError as exc:
            log.error("cannot load active model %s %s: %s", ref.name, ref.version, exc)
            return
        self._serving.set(manifest)

    def _stored_manifest(self, sha256: str) -> ModelManifest | None:
        """The release-signed manifest saved with a blob, verified again.

        A manifest whose release key has since been rotated out no longer
        verifies; for the models this node itself verified and installed (its
        active and previous ones, recorded in ``state.json``) it is still used,
        and the blob's digest is checked again by the caller's load.
        """
        try:
            data = self._artifacts.load_manifest_bytes(sha256)
            if data is None:
                log.error("no stored manifest for %s", sha256[:12])
                return None
            manifest = decode(ModelManifest, self._open_stored(sha256, data, self.trust))
        except (OSError, EdgeFleetError) as exc:
            log.error("stored manifest for %s is unusable: %s", sha256[:12], exc)
            return None
        if manifest.sha256 != sha256:
            log.error("stored manifest for %s names another blob", sha256[:12])
            return None
        return manifest

    def _open_stored(self, sha256: str, data: bytes, trust: TrustStore) -> bytes:
        """Raises: TrustError (not an installed model), DecodeError."""
        envelope = Envelope.from_bytes(data)
        try:
            return trust.open(envelope, Role.RELEASE, now=self._clock())
        except TrustError as exc:
            state = self._keeper.state
            installed = {ref.sha256 for ref in (state.active, state.previous) if ref}
            if sha256 not in installed:
                raise
            log.warning("manifest of installed model %s: %s; kept", sha256[:12], exc)
            return envelope.payload_bytes()

    # ----- the queue --------------------------------------------------------------

    def verified_ack(self, data: bytes) -> int | None:
        """The ``seq`` of a signed ack for this node; None (logged, counted in
        ``refused_acks``) when it does not verify, so nothing is freed."""
        try:
            ack = open_ack(data, trust=self.trust, node=self._me.node_id, now=self._clock())
        except (DecodeError, TrustError) as exc:
            self.refused_acks += 1
            self._refused_log.warning("refusing an ack: %s", exc)
            return None
        return ack.seq

    def offer(self, data: bytes) -> None:
        """Queue a received command envelope (called for every message on a command
        topic) once its signatures verify; see the module docstring for what is refused."""
        now = self._clock()
        try:
            envelope = Envelope.from_bytes(data)
        except DecodeError as exc:
            self._refuse(exc)
            return
        trust = self.trust
        try:
            trust.open(envelope, Role.ROLLOUT, now=now, allow_expired=trust.expired(now))
        except (TrustError, DecodeError) as exc:
            self._refuse(exc)
            if not self._unsigned_reports.allow("", now):
                return
        try:
            self._queue.put_nowait(data)
        except asyncio.QueueFull:
            log.error("command queue full: dropping a command (the controller retries)")

    def _refuse(self, error: DecodeError | TrustError) -> None:
        self._counters["refused_commands"] += 1
        self._refused_log.warning("refusing a command: %s", error)

    async def run(self) -> None:
        """Resume an interrupted job, then handle commands one at a time."""
        await self.resume_pending()
        while not self._stopping.is_set():  # see OutboxSender.run: a cancel may be swallowed
            data = await self._queue.get()
            await self.handle(data)

    # ----- one command ------------------------------------------------------------

    async def handle(self, data: bytes) -> None:
        state = self._keeper.state
        outcome = verify_command(
            data, trust=self.trust, me=self._me, state=state.verifier_state(), now=self._clock()
        )
        if isinstance(outcome, Ignored):
            log.debug("ignoring command: %s", outcome.reason)
        elif isinstance(outcome, Rejected):
            log.warning("rejected command (%s): %s", outcome.code, outcome.error)
            await self._reporter.report(
                NodeRolloutState.REJECTED,
                outcome.command,
                code=outcome.code,
                reason=str(outcome.error),
            )
        elif isinstance(outcome, Duplicate):
            log.info("duplicate command %s: %s", outcome.command.command_id, outcome.reason)
            await self._answer_duplicate(outcome)
        else:
            await self._accept(outcome, data)
            await self._act(outcome)

    async def _accept(self, accepted: Accepted, data: bytes) -> None:
        """Persist the verifier state (and a job as pending) before acting."""
        verifier = record(self._keeper.state.verifier_state(), accepted, now=self._clock())
        update: dict[str, Any] = {
            "last_seq": verifier.last_seq,
            "attempted": list(verifier.attempted),
        }
        if isinstance(accepted.command.body, DeployAction | RollbackAction):
            # In the same write: after a restart the verifier calls this command a
            # duplicate, so only this record lets the node finish the job.
            update["pending"] = PendingCommand(
                command_id=accepted.command.command_id, envelope=data.decode()
            )
        await self._keeper.update(**update)

    async def _answer_duplicate(self, duplicate: Duplicate) -> None:
        """Acknowledge a repeated command with where it stands, without re-running it."""
        running = self._runner.current
        answer = answer_duplicate(
            duplicate.command,
            duplicate.manifest,
            running=running.command if running is not None else None,
            active=self._keeper.state.active,
        )
        if answer is not None:
            await self._reporter.report(
                answer.state,
                duplicate.command,
                model=answer.model,
                reason=duplicate.reason,
                duplicate=True,
            )

    async def _act(self, accepted: Accepted) -> None:
        command, body = accepted.command, accepted.command.body
        if isinstance(body, TrustUpdateAction):
            await self._rotate_trust(accepted)
        elif isinstance(body, CancelAction):
            if not self._runner.cancel(command):
                await self._reporter.report(
                    NodeRolloutState.CANCELED, command, reason="nothing to cancel"
                )
        else:
            assert accepted.manifest is not None
            await self._runner.start(command, body, accepted.manifest)

    async def _rotate_trust(self, accepted: Accepted) -> None:
        new_trust = accepted.new_trust
        assert new_trust is not None
        await asyncio.to_thread(self._store.save_trust, new_trust)
        self._trust = new_trust
        await self.remember_trust()
        log.info("trust list rotated to v%d", new_trust.version)
        await self._reporter.report(
            NodeRolloutState.SUCCEEDED, accepted.command, reason=f"trust v{new_trust.version}"
        )

    # ----- resuming ---------------------------------------------------------------

    async def resume_pending(self) -> None:
        """Resume the deploy or rollback that a stop or crash interrupted.

        One whose envelope no longer verifies ends as ``failed``.
        """
        pending = self._keeper.state.pending
        if pending is None:
            return
        try:
            command, body, manifest = _open_pending(pending, self.trust, now=self._clock())
        except (TrustError, DecodeError) as exc:
            log.error("cannot resume command %s: %s", pending.command_id, exc)
            await self._reporter.report(
                NodeRolloutState.FAILED,
                None,
                code=exc.code if isinstance(exc, TrustError) else "malformed",
                reason=f"command {pending.command_id} was interrupted and cannot resume: {exc}",
            )
            if self._keeper.state.pending == pending:
                await self._keeper.update(pending=None)
            return
        log.info("resuming command %s after a restart", command.command_id)
        await self._runner.start(command, body, manifest, resumed=True)


def _open_pending(
    pending: PendingCommand, trust: TrustStore, *, now: float
) -> tuple[Command, DeployAction | RollbackAction, ModelManifest]:
    """Verify a persisted command envelope again: command, action and manifest.

    Raises:
        TrustError: a signature no longer verifies (e.g. a key rotated out).
        DecodeError: the stored envelope is malformed or holds no deploy or rollback.
    """
    envelope = Envelope.from_bytes(pending.envelope.encode())
    command = decode(Command, trust.open(envelope, Role.ROLLOUT, now=now))
    body = command.body
    if not isinstance(body, DeployAction | RollbackAction):
        raise DecodeError(f"pending command is a {body.action}, not a deploy or rollback")
    manifest = decode(ModelManifest, trust.open(body.manifest, Role.RELEASE, now=now))
    return command, body, manifest
