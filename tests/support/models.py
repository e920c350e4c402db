"""Small, real ONNX models built with ``onnx.helper`` for tests.

Every builder writes one file and returns its path. Output is deterministic:
the same arguments (including ``seed``) give byte-identical files, so digests
are stable across runs; different seeds give different weights and digests.

All models use opset 17 and IR version 8, which every onnxruntime EdgeFleet
supports (>= 1.17) loads. Unless stated otherwise a model has the classifier's
interface: float32 input ``"input"`` of shape ``[N, n_in]`` (``N`` symbolic
when ``dynamic_batch``) and float32 output ``"probs"`` of shape
``[N, n_classes]``, each row a softmax distribution.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "BATCH_DIM",
    "IR_VERSION",
    "OPSET",
    "make_broken_model",
    "make_classifier",
    "make_failing_warmup_model",
    "make_int64_model",
    "make_slow_model",
    "matmul_flops",
]

OPSET = 17
IR_VERSION = 8
BATCH_DIM = "N"
_PRODUCER = "edgefleet-tests"


def _batch(dynamic_batch: bool) -> str | int:
    return BATCH_DIM if dynamic_batch else 1


def _weights(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _save(graph: onnx.GraphProto, path: Path | str, *, doc: str) -> Path:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=_PRODUCER,
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString(deterministic=True))
    return out


def _io(n_in: int, n_classes: int, dynamic_batch: bool) -> tuple[onnx.ValueInfoProto, ...]:
    batch = _batch(dynamic_batch)
    return (
        helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, n_in]),
        helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, n_classes]),
    )


def _head(
    rng: np.random.Generator, source: str, width: int, n_classes: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``probs = Softmax(source @ W + b)``: the classifier's last layer."""
    weight = numpy_helper.from_array(_weights(rng, (width, n_classes), 1.0), "head_w")
    bias = numpy_helper.from_array(_weights(rng, (n_classes,), 0.1), "head_b")
    nodes = [
        helper.make_node("MatMul", [source, "head_w"], ["logits_raw"], name="head_matmul"),
        helper.make_node("Add", ["logits_raw", "head_b"], ["logits"], name="head_add"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    return nodes, [weight, bias]


def make_classifier(
    path: Path | str,
    *,
    n_in: int = 8,
    n_classes: int = 4,
    seed: int = 0,
    dynamic_batch: bool = True,
) -> Path:
    """A linear classifier: ``probs = Softmax(input @ W + b)`` (3 nodes)."""
    rng = np.random.default_rng(seed)
    nodes, inits = _head(rng, "input", n_in, n_classes)
    inputs, outputs = _io(n_in, n_classes, dynamic_batch)
    graph = helper.make_graph(nodes, "classifier", [inputs], [outputs], inits)
    return _save(graph, path, doc=f"test classifier n_in={n_in} n_classes={n_classes} seed={seed}")


def make_slow_model(
    path: Path | str,
    *,
    work: int = 48,
    width: int = 256,
    n_in: int = 8,
    n_classes: int = 4,
    seed: int = 0,
    dynamic_batch: bool = True,
) -> Path:
    """The classifier's interface with ``work`` hidden ``width``x``width`` layers.

    ``h = Tanh(h @ W)`` repeated ``work`` times, every layer sharing one weight
    matrix (so the file stays about ``width * width * 4`` bytes). Each layer
    depends on the input, so onnxruntime cannot constant-fold the chain away:
    per inference it costs about ``2 * work * width**2`` FLOPs per row (about
    6.3 MFLOP with the defaults: roughly 0.25 ms on one desktop core, some 20x
    the default classifier's 64 FLOPs plus call overhead). See
    :func:`matmul_flops`.
    """
    if work < 1 or width < 1:
        raise ValueError("work and width must be positive")
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_weights(rng, (n_in, width), n_in**-0.5), "embed_w"),
        # Scaled so that tanh stays in its sensitive range through the chain.
        numpy_helper.from_array(_weights(rng, (width, width), width**-0.5), "hidden_w"),
    ]
    nodes = [helper.make_node("MatMul", ["input", "embed_w"], ["h0"], name="embed")]
    for layer in range(work):
        nodes.append(
            helper.make_node(
                "MatMul", [f"h{layer}", "hidden_w"], [f"z{layer + 1}"], name=f"hidden{layer}"
            )
        )
        nodes.append(helper.make_node("Tanh", [f"z{layer + 1}"], [f"h{layer + 1}"]))
    head_nodes, head_inits = _head(rng, f"h{work}", width, n_classes)
    nodes.extend(head_nodes)
    inputs, outputs = _io(n_in, n_classes, dynamic_batch)
    graph = helper.make_graph(nodes, "slow", [inputs], [outputs], inits + head_inits)
    return _save(graph, path, doc=f"slow test model work={work} width={width} seed={seed}")


def make_flaky_model(
    path: Path | str,
    *,
    error_rate: float = 0.1,
    n_in: int = 8,
    n_classes: int = 4,
    seed: int = 0,
) -> Path:
    """The classifier, failing at run time on about ``error_rate`` of standard-normal inputs.

    When ``input[0, 0]`` lies above the standard normal's ``1 - error_rate``
    quantile, a ``Gather`` reads past the end of a one-element tensor and
    onnxruntime raises; otherwise the output is the classifier's. A warm-up made
    from the declared shapes (zeros) always passes, so the model is accepted and
    deployed, then fails in service: a release that errors on some inputs.
    """
    if not 0 < error_rate < 1:
        raise ValueError("error_rate must be within (0, 1)")
    rng = np.random.default_rng(seed)
    threshold = statistics.NormalDist().inv_cdf(1 - error_rate)
    inits = [
        numpy_helper.from_array(np.array([0], dtype=np.int64), "first"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([threshold], dtype=np.float32), "threshold"),
        numpy_helper.from_array(np.array([1000], dtype=np.int64), "far"),
        numpy_helper.from_array(np.array([0.0], dtype=np.float32), "lone"),
    ]
    nodes = [
        # x = input[0, 0:1]: the first value of the first row
        helper.make_node("Slice", ["input", "first", "one", "first"], ["row"], name="row"),
        helper.make_node("Slice", ["row", "first", "one", "one"], ["x"], name="x"),
        helper.make_node("Greater", ["x", "threshold"], ["high"], name="high"),
        helper.make_node("Cast", ["high"], ["high_i"], name="cast", to=TensorProto.INT64),
        helper.make_node("Mul", ["high_i", "far"], ["index"], name="index"),
        helper.make_node("Reshape", ["index", "one"], ["index1"], name="index1"),
        # Out of bounds (index 1000 of 1 element) exactly when x is high: a run-time error.
        helper.make_node("Gather", ["lone", "index1"], ["zero"], name="gather", axis=0),
        helper.make_node("Add", ["input", "zero"], ["checked"], name="checked"),
    ]
    head_nodes, head_inits = _head(rng, "checked", n_in, n_classes)
    inputs, outputs = _io(n_in, n_classes, dynamic_batch=True)
    graph = helper.make_graph(nodes + head_nodes, "flaky", [inputs], [outputs], inits + head_inits)
    return _save(graph, path, doc=f"fails on about {error_rate:.0%} of standard-normal inputs")


def make_broken_model(path: Path | str, *, seed: int = 0) -> Path:
    """A classifier file cut in half: onnxruntime refuses to load it."""
    out = Path(path)
    make_classifier(out, seed=seed)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def make_failing_warmup_model(
    path: Path | str,
    *,
    n_in: int = 8,
    n_classes: int = 4,
    batch_multiple: int = 3,
    seed: int = 0,
) -> Path:
    """Loads, but runs only when ``N`` is a multiple of ``batch_multiple``.

    The input is reshaped to ``[batch_multiple, -1]`` and back before the
    classifier head. With ``n_in`` not divisible by ``batch_multiple``, a
    warm-up made from the declared shapes (``N`` = 1) fails at run time
    ("cannot reshape"), while a declared warm-up input with ``N`` =
    ``batch_multiple`` succeeds: the case of real models that cannot run on
    all-ones shapes.
    """
    if n_in % batch_multiple == 0:
        raise ValueError("n_in must not be a multiple of batch_multiple, or N=1 would run")
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([batch_multiple, -1], dtype=np.int64), "grouped")]
    nodes = [
        helper.make_node("Reshape", ["input", "grouped"], ["regrouped"], name="regroup"),
        helper.make_node("Shape", ["input"], ["input_shape"], name="input_shape"),
        helper.make_node("Reshape", ["regrouped", "input_shape"], ["restored"], name="restore"),
    ]
    head_nodes, head_inits = _head(rng, "restored", n_in, n_classes)
    inputs, outputs = _io(n_in, n_classes, dynamic_batch=True)
    graph = helper.make_graph(
        nodes + head_nodes, "failing_warmup", [inputs], [outputs], inits + head_inits
    )
    return _save(graph, path, doc=f"runs only for N % {batch_multiple} == 0")


def make_int64_model(
    path: Path | str,
    *,
    n_in: int = 8,
    n_classes: int = 4,
    seed: int = 0,
    reference_rate: int = 16000,
) -> Path:
    """Two inputs: float32 ``"input"`` ``[N, n_in]`` and int64 scalar ``"sample_rate"``.

    ``probs = Softmax((input @ W + b) * sample_rate / reference_rate)``. The rate
    is read as ``Range(0, sample_rate)[sample_rate - 1] + 1``, so the model fails
    at run time (index out of range) for ``sample_rate <= 0``: a warm-up that
    fills scalars with zeros fails, one that declares ``sample_rate`` (e.g.
    16000) or uses ones runs.
    """
    rng = np.random.default_rng(seed)
    consts: dict[str, np.ndarray] = {
        "zero": np.array(0, dtype=np.int64),
        "one": np.array(1, dtype=np.int64),
        "reference_rate": np.array(reference_rate, dtype=np.float32),
    }
    inits = [numpy_helper.from_array(value, name) for name, value in consts.items()]
    nodes = [
        helper.make_node("Range", ["zero", "sample_rate", "one"], ["ticks"], name="ticks"),
        helper.make_node("Sub", ["sample_rate", "one"], ["last_index"], name="last_index"),
        helper.make_node("Gather", ["ticks", "last_index"], ["last_tick"], name="last_tick"),
        helper.make_node("Add", ["last_tick", "one"], ["rate"], name="rate"),
        helper.make_node("Cast", ["rate"], ["rate_f"], name="rate_f", to=TensorProto.FLOAT),
        helper.make_node("Div", ["rate_f", "reference_rate"], ["gain"], name="gain"),
    ]
    weight = numpy_helper.from_array(_weights(rng, (n_in, n_classes), 1.0), "head_w")
    bias = numpy_helper.from_array(_weights(rng, (n_classes,), 0.1), "head_b")
    nodes += [
        helper.make_node("MatMul", ["input", "head_w"], ["logits_raw"], name="head_matmul"),
        helper.make_node("Add", ["logits_raw", "head_b"], ["logits"], name="head_add"),
        helper.make_node("Mul", ["logits", "gain"], ["scaled"], name="scale"),
        helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
    ]
    inputs = [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH_DIM, n_in]),
        helper.make_tensor_value_info("sample_rate", TensorProto.INT64, []),
    ]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [BATCH_DIM, n_classes])]
    graph = helper.make_graph(nodes, "int64_input", inputs, outputs, [*inits, weight, bias])
    return _save(graph, path, doc="float input plus int64 scalar sample_rate")


def matmul_flops(path: Path | str, *, batch: int = 1) -> int:
    """FLOPs of every MatMul whose right operand is an initializer, for ``batch`` rows.

    ``2 * batch * K * M`` per ``[batch, K] @ [K, M]``: a cost measure that does
    not depend on the machine, for comparing test models.
    """
    model = onnx.load(str(path))
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in shapes:
            k, m = shapes[node.input[1]]
            total += 2 * batch * k * m
    return total
