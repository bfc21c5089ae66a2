"""Tiny ONNX models for tests, built with onnx.helper from seeded weights. IR version pinned (onnx writes 14)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8


def make_model(nodes, inputs, outputs, inits, *, opset: int = 17, ir_version: int = IR_VERSION) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def mlp(*, sizes=(8, 16, 4), batch="N", seed: int = 0, opset: int = 17, bias_shift: float = 0.0) -> onnx.ModelProto:
    """Gemm → Relu → ... → Gemm. Hidden activations are named ``h1``, ``h2``...; output ``y``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i, (cin, cout) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        w = numpy_helper.from_array((rng.standard_normal((cout, cin)) / np.sqrt(cin)).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array((rng.standard_normal(cout) * 0.5 + bias_shift).astype(np.float32), f"b{i}")
        inits += [w, b]
        last = i == len(sizes) - 1
        out = "y" if last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, sizes[-1]])],
        inits,
        opset=opset,
    )


def conv_net(
    *, channels=(3, 8, 6), size: int = 10, batch="N", seed: int = 0, opset: int = 17, with_bn: bool = True
) -> onnx.ModelProto:
    """Conv(3×3, pad 1) → [BatchNorm] → Relu → Conv(3×3, stride 2) → Relu → GlobalAveragePool → Flatten → Gemm."""
    rng = np.random.default_rng(seed)
    c0, c1, c2 = channels
    inits = [
        numpy_helper.from_array(rng.standard_normal((c1, c0, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(c1).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((c2, c1, 3, 3)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.standard_normal((5, c2)).astype(np.float32), "wf"),
        numpy_helper.from_array(np.zeros(5, np.float32), "bf"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4)]
    act_in = "c1"
    if with_bn:
        inits += [
            numpy_helper.from_array((1 + 0.2 * rng.random(c1)).astype(np.float32), "bn_s"),
            numpy_helper.from_array((0.1 * rng.standard_normal(c1)).astype(np.float32), "bn_b"),
            numpy_helper.from_array((0.1 * rng.standard_normal(c1)).astype(np.float32), "bn_m"),
            numpy_helper.from_array((1 + 0.1 * rng.random(c1)).astype(np.float32), "bn_v"),
        ]
        nodes.append(
            helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn1"], name="bn1")
        )
        act_in = "bn1"
    nodes += [
        helper.make_node("Relu", [act_in], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c0, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        inits,
        opset=opset,
    )


def expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with intermediate values ``names`` added as float outputs (a test oracle)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in names:
        copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, optimize: bool = False) -> dict[str, np.ndarray]:
    """Outputs of ``model`` under onnxruntime: no graph optimizations unless ``optimize`` (all of them, as deployed;
    a QDQ model then runs integer kernels instead of its float simulation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)
