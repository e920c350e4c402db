"""Several real nodes download one blob from one broadcast through a real Mosquitto.

The harness serves chunks with the controller's own broadcaster
(:class:`~fleet_controller.artifacts.Artifacts`). Three nodes start together;
one of them loses two chunks on its way in (its transport drops them, as a
broker would for a slow consumer); a fourth joins while the broadcast is
paused. Every node ends with the verified model, the blob goes out once for
all of them plus exactly what was missed: the late node's head and the lossy
node's two chunks, which that node asks for alone, by range.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from edgefleet_io.transport import Link, Message, Session, Transport
from fleet_controller.artifacts import BROADCAST_WINDOW
from shared import topics
from shared.chunks import Chunk, decode_frame
from tests.support.broker import Broker
from tests.support.harness import Harness, RunningNode, node_config, start_node
from tests.support.models import make_classifier
from tests.support.node_checks import poll_until, wait_node_state

pytestmark = pytest.mark.integration

CHUNK_BYTES = 16 * 1024
PAUSE_AFTER = 6  # chunks broadcast before the late node joins
LOST = (8, 15)  # chunk numbers the lossy node misses


class LossyLink:
    """A node's link that loses the first arrival of some broadcast chunks."""

    def __init__(self, inner: Link, lose: set[int], lost: list[int]) -> None:
        self._inner = inner
        self._lose = lose
        self._lost = lost

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        await self._inner.publish(topic, payload, qos=qos, retain=retain)

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        await self._inner.subscribe(filters)

    async def unsubscribe(self, filters: Sequence[str]) -> None:
        await self._inner.unsubscribe(filters)

    async def messages(self) -> AsyncIterator[Message]:
        async for message in self._inner.messages():
            if topics.parse_topic(message.topic).kind is topics.TopicKind.ARTIFACT_BROADCAST:
                frame = decode_frame(message.payload)
                if isinstance(frame, Chunk) and frame.offset in self._lose:
                    self._lose.discard(frame.offset)
                    self._lost.append(frame.offset)
                    continue
            yield message


class LossyTransport:
    def __init__(self, inner: Transport, lose: set[int]) -> None:
        self._inner = inner
        self.lose = lose
        self.lost: list[int] = []

    def connect(self, session: Session) -> AbstractAsyncContextManager[Link]:
        return self._connect(session)

    @asynccontextmanager
    async def _connect(self, session: Session) -> AsyncIterator[Link]:
        async with self._inner.connect(session) as link:
            yield LossyLink(link, self.lose, self.lost)


def test_a_wave_shares_one_broadcast_and_each_node_repairs_only_its_gaps(
    broker: Broker, fleet_id: str, tmp_path: Path
) -> None:
    path = make_classifier(tmp_path / "model.onnx", n_in=1024, n_classes=96, seed=5)
    lossy_transport: LossyTransport | None = None

    async def scenario() -> Harness:
        nonlocal lossy_transport
        async with Harness(broker.url, fleet_id, tmp_path, chunk_bytes=CHUNK_BYTES) as harness:
            model = harness.register(path, "clf", "1.0.0")
            size, sha = model.manifest.size, model.manifest.sha256
            count = -(-size // CHUNK_BYTES)
            assert count > max(LOST) + 1
            lossy_transport = LossyTransport(
                harness.transport, {chunk * CHUNK_BYTES for chunk in LOST}
            )
            lossy = RunningNode(
                node_config(harness, "lossy", tmp_path / "lossy"), transport=lossy_transport
            )
            async with (
                start_node(harness, "n1", tmp_path / "n1") as n1,
                start_node(harness, "n2", tmp_path / "n2") as n2,
                lossy,
            ):
                harness.pause_after_chunks = PAUSE_AFTER
                wave = await harness.broadcast(model, rollout_id="w")
                await poll_until(
                    lambda: harness.chunks_answered >= PAUSE_AFTER,
                    timeout_s=60,
                    what="the first chunks of the broadcast",
                )
                async with start_node(harness, "late", tmp_path / "late") as late:
                    await harness.wait_for(
                        lambda: any(r.node == "late" for r in harness.chunk_requests),
                        what="the late node to ask",
                    )
                    harness.serving.set()
                    for node in ("n1", "n2", "lossy", "late"):
                        await wait_node_state(harness, node, wave, "activated")
                    for running in (n1, n2, lossy, late):
                        assert running.agent.active == model.manifest.ref

                # Once for all, plus the late node's head and the lossy node's two
                # chunks; plus the chunks held in flight at the pause (at most a
                # window of them) when a node asked for them meanwhile: they were
                # on their way, not scheduled, so they went again.
                expected = count + PAUSE_AFTER + len(LOST)
                assert expected <= harness.chunks_answered <= expected + BROADCAST_WINDOW
                lossy_asks = [r for r in harness.chunk_requests if r.node == "lossy"]
                assert lossy_asks[0].ranges == ((0, size),)
                # Its last asks (after the pass) name only chunks it lost, nothing it had.
                gaps = {(chunk * CHUNK_BYTES, CHUNK_BYTES) for chunk in LOST}
                assert lossy_asks[-1].ranges
                assert set(lossy_asks[-1].ranges) <= gaps
                late_asks = [r for r in harness.chunk_requests if r.node == "late"]
                assert late_asks[0].ranges == ((0, size),)
                for node in ("n1", "n2", "lossy", "late"):
                    stored = tmp_path / node / "models" / sha
                    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha
        return harness

    asyncio.run(asyncio.wait_for(scenario(), 180))
    assert lossy_transport is not None
    assert sorted(lossy_transport.lost) == [chunk * CHUNK_BYTES for chunk in LOST]
