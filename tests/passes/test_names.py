"""simplify keeps the user's node names when it folds (issue 19 item 5): a Conv keeps its name under a folded BN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import graph
from onnxopt.passes.simplify import SimplifyConfig, SimplifyPass
from tests import builders

SHARED_RESNET = (
    Path(__file__).resolve().parents[3] / "shared" / "models" / "cifar10" / "cifar10_resnet20_akamaster_bn.onnx"
)


def _conv_bn(rng, x: str, prefix: str, cin: int, cout: int, k: int, stride: int = 1) -> tuple[list, list, str]:
    """PyTorch-exporter style names: ``/layer1/conv1/Conv`` then ``/layer1/bn1/BatchNormalization``."""
    inits = [
        numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32), f"{prefix}.w"),
        numpy_helper.from_array((1 + 0.2 * rng.random(cout)).astype(np.float32), f"{prefix}.s"),
        numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32), f"{prefix}.b"),
        numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32), f"{prefix}.m"),
        numpy_helper.from_array((1 + 0.1 * rng.random(cout)).astype(np.float32), f"{prefix}.v"),
    ]
    pad = [k // 2] * 4
    nodes = [
        helper.make_node("Conv", [x, f"{prefix}.w"], [f"{prefix}.c"], name=f"/{prefix}/Conv", kernel_shape=[k, k],
                         pads=pad, strides=[stride, stride]),
        helper.make_node("BatchNormalization", [f"{prefix}.c", f"{prefix}.s", f"{prefix}.b", f"{prefix}.m",
                         f"{prefix}.v"], [f"{prefix}.y"], name=f"/{prefix.replace('conv', 'bn')}/BatchNormalization"),
    ]  # fmt: skip
    return nodes, inits, f"{prefix}.y"


def _resnet_like(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """stem Conv+BN+Relu; block 1 (identity shortcut); block 2 (stride 2, 1×1 Conv+BN projection reading the same
    input as the block's first 3×3 Conv); GlobalAveragePool → Flatten → MatMul+Add (fused into a Gemm)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def add(parts):
        nodes.extend(parts[0])
        inits.extend(parts[1])
        return parts[2]

    h = add(_conv_bn(rng, "x", "conv1", 3, 8, 3))
    nodes.append(helper.make_node("Relu", [h], ["r0"], name="/Relu"))
    a = add(_conv_bn(rng, "r0", "layer1/conv1", 8, 8, 3))
    nodes.append(helper.make_node("Relu", [a], ["l1r"], name="/layer1/Relu"))
    b = add(_conv_bn(rng, "l1r", "layer1/conv2", 8, 8, 3))
    nodes.append(helper.make_node("Add", [b, "r0"], ["l1s"], name="/layer1/Add"))
    nodes.append(helper.make_node("Relu", ["l1s"], ["l1o"], name="/layer1/Relu_1"))
    c = add(_conv_bn(rng, "l1o", "layer2/conv1", 8, 16, 3, stride=2))
    nodes.append(helper.make_node("Relu", [c], ["l2r"], name="/layer2/Relu"))
    d = add(_conv_bn(rng, "l2r", "layer2/conv2", 16, 16, 3))
    short = add(_conv_bn(rng, "l1o", "layer2/downsample", 8, 16, 1, stride=2))
    nodes.append(helper.make_node("Add", [d, short], ["l2s"], name="/layer2/Add"))
    nodes.append(helper.make_node("Relu", ["l2s"], ["l2o"], name="/layer2/Relu_1"))
    nodes.append(helper.make_node("GlobalAveragePool", ["l2o"], ["gap"], name="/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="/Flatten"))
    inits.append(numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32), "fc.w"))
    inits.append(numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc.b"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc.w"], ["mm"], name="/fc/MatMul"))
    nodes.append(helper.make_node("Add", ["mm", "fc.b"], ["y"], name="/fc/Add"))
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
        inits,
        opset=opset,
    )


@pytest.mark.parametrize("opset", [11, 17])
def test_folded_batchnorms_keep_the_conv_names(opset):
    proto = _resnet_like(opset=opset)
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 6
    model = graph.from_proto(proto)
    result = SimplifyPass(SimplifyConfig())(model)
    assert result.modified
    ops = {n.op_type for n in model.graph}
    assert "BatchNormalization" not in ops and "MatMul" not in ops
    names = [n.name for n in model.graph]
    assert [n.name for n in model.graph if n.op_type == "Conv"] == convs  # same names, same order
    assert [n.name for n in model.graph if n.op_type == "Gemm"] == ["/fc/MatMul"]  # MatMul+Add -> Gemm
    assert len(set(names)) == len(names)
    assert not [n for n in names if n.startswith("node_")]
    out = graph.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)}
    np.testing.assert_allclose(builders.run(out, feeds)["y"], builders.run(proto, feeds)["y"], rtol=1e-4, atol=1e-4)


def test_ambiguous_replacements_keep_generated_names():
    """Two Conv+BN with equal weight shapes on the same input: which new Conv is which cannot be told apart by
    (input, op, weight shape), so neither takes an original name (a wrong name would be worse)."""
    rng = np.random.default_rng(0)
    n1, i1, y1 = _conv_bn(rng, "x", "left/conv", 3, 4, 3)
    n2, i2, y2 = _conv_bn(rng, "x", "right/conv", 3, 4, 3)
    proto = builders.make_model(
        [*n1, *n2, helper.make_node("Add", [y1, y2], ["y"], name="/Add")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [*i1, *i2],
    )
    model = graph.from_proto(proto)
    SimplifyPass(SimplifyConfig())(model)
    convs = [n.name for n in model.graph if n.op_type == "Conv"]
    assert len(convs) == 2 and "BatchNormalization" not in {n.op_type for n in model.graph}
    assert not {"/left/conv/Conv", "/right/conv/Conv"} & set(convs) and len(set(convs)) == 2
    feeds = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    out = graph.to_proto(model)
    np.testing.assert_allclose(builders.run(out, feeds)["y"], builders.run(proto, feeds)["y"], rtol=1e-4, atol=1e-4)


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_RESNET.exists(), reason="needs ../shared/models/cifar10")
def test_resnet20_keeps_every_node_name():
    model = graph.load(SHARED_RESNET)
    before = {n.name for n in model.graph}
    convs = [n.name for n in model.graph if n.op_type == "Conv"]
    SimplifyPass(SimplifyConfig())(model)
    assert "BatchNormalization" not in {n.op_type for n in model.graph}
    assert [n.name for n in model.graph if n.op_type == "Conv"] == convs
    assert {n.name for n in model.graph} <= before  # nothing renamed: only removed
