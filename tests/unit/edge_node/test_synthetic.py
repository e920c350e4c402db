"""The synthetic source: pooled inputs of the model's own dtypes and shapes, paced or flat out."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_node.results_core import DIGEST_HEX, input_digest
from edge_node.sources import SyntheticSource
from shared.messages import DType, ModelManifest, TensorSpec


def manifest(sha: str, *inputs: TensorSpec) -> ModelManifest:
    return ModelManifest(
        name="m",
        version="1.0.0",
        sha256=sha * 64,
        size=1,
        inputs=inputs,
        outputs=(TensorSpec(name="out", dtype=DType.FLOAT32, shape=("N", 2)),),
        created_at=0.0,
    )


IMAGE = TensorSpec(name="image", dtype=DType.FLOAT16, shape=("N", 3, 4, 5))
IDS = TensorSpec(name="ids", dtype=DType.INT64, shape=("N", 7))
STATIC = TensorSpec(name="x", dtype=DType.FLOAT32, shape=(2, 3))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rows_have_the_models_dtypes_and_shapes_and_their_own_digests() -> None:
    source = SyntheticSource(rate_hz=None, pool_rows=8)
    drawn = source.draw(manifest("a", IMAGE, IDS), 5)
    assert drawn is not None
    assert drawn.rows == 5
    assert drawn.inputs["image"].dtype == np.float16
    assert drawn.inputs["image"].shape == (5, 3, 4, 5)
    assert drawn.inputs["ids"].dtype == np.int64
    assert drawn.inputs["ids"].shape == (5, 7)
    assert len(drawn.digests) == 5 * DIGEST_HEX
    for row in range(5):
        alone = {name: value[row : row + 1] for name, value in drawn.inputs.items()}
        assert drawn.digests[row * DIGEST_HEX : (row + 1) * DIGEST_HEX] == input_digest(alone)
    assert len(set(drawn.inputs["image"][:, 0, 0, 0].tolist())) > 1  # drawn, not repeated


def test_the_pool_is_reused_and_redrawn_for_a_new_model() -> None:
    source = SyntheticSource(rate_hz=None, pool_rows=4)
    model = manifest("a", IMAGE)
    first = source.draw(model, 4)
    again = source.draw(model, 4)
    assert first is not None
    assert again is not None
    assert again.digests == first.digests  # the same four pooled requests
    np.testing.assert_array_equal(again.inputs["image"], first.inputs["image"])
    capped = source.draw(model, 100)
    assert capped is not None
    assert capped.rows == 4  # never more rows than the pool holds
    other = source.draw(manifest("b", IDS), 2)
    assert other is not None
    assert set(other.inputs) == {"ids"}


def test_a_static_batch_model_gets_one_request_at_a_time() -> None:
    source = SyntheticSource(rate_hz=None)
    drawn = source.draw(manifest("c", STATIC), 16)
    assert drawn is not None
    assert drawn.rows == 1
    assert drawn.inputs["x"].shape == (2, 3)
    assert drawn.inputs["x"].dtype == np.float32


def test_the_pool_keeps_to_its_byte_budget() -> None:
    source = SyntheticSource(rate_hz=None, pool_rows=64, pool_bytes=3 * 4 * 5 * 2 * 3)
    drawn = source.draw(manifest("a", IMAGE), 64)
    assert drawn is not None
    assert drawn.rows == 3


def test_a_paced_source_hands_out_what_is_due() -> None:
    clock = Clock()
    source = SyntheticSource(rate_hz=10.0, clock=clock)
    model = manifest("a", IMAGE)
    first = source.draw(model, 8)
    assert first is not None
    assert first.rows == 1
    assert source.draw(model, 8) is None  # the next is due in 0.1 s
    clock.now += 0.35
    later = source.draw(model, 8)
    assert later is not None
    assert later.rows == 3
    clock.now += 60.0  # a stall: at most a second of backlog is made up
    backlog = source.draw(model, 64)
    assert backlog is not None
    assert backlog.rows == pytest.approx(11, abs=1)


def test_wait_due_ends_on_close() -> None:
    source = SyntheticSource(rate_hz=0.001)
    halt = threading.Event()
    source.draw(manifest("a", IMAGE), 1)  # the next input is due in 1000 s
    source.close()
    assert source.wait_due(halt) is False
    assert SyntheticSource(rate_hz=None).wait_due(halt) is True
