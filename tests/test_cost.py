"""Cost model: MAC formulas per op and the thesis's Table 2.3 (ResNet-34 3.6e9, ResNet-50 3.8e9 multiply-adds)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import cost, graph
from tests import builders

MODELS = Path(__file__).resolve().parents[1] / "models"


def _resnet_module():
    spec = importlib.util.spec_from_file_location("resnet", MODELS / "resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _single(node, x_shape, w_shape, y_shape=None, opset=17):
    w = np.zeros(w_shape, np.float32)
    proto = builders.make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape or [None] * len(x_shape))],
        [numpy_helper.from_array(w, "w")],
        opset=opset,
    )
    return cost.estimate(ir.from_proto(proto))


@pytest.mark.parametrize(
    ("attrs", "w_shape", "y_hw", "cin_per_group"),
    [
        ({"pads": [1, 1, 1, 1]}, (16, 8, 3, 3), (20, 20), 8),
        ({"strides": [2, 2]}, (16, 8, 3, 3), (9, 9), 8),
        ({"group": 8, "pads": [1, 1, 1, 1]}, (8, 1, 3, 3), (20, 20), 1),  # depthwise
        ({"group": 2, "dilations": [2, 2]}, (16, 4, 3, 3), (16, 16), 4),
    ],
)
def test_conv_macs(attrs, w_shape, y_hw, cin_per_group):
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], **attrs)
    result = _single(node, [2, 8, 20, 20], w_shape)
    expected = 2 * w_shape[0] * y_hw[0] * y_hw[1] * cin_per_group * 9
    assert result.macs == expected and result.params == int(np.prod(w_shape))


def test_conv_transpose_gemm_matmul_macs():
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    assert _single(node, [1, 8, 5, 5], (8, 4, 2, 2)).macs == 8 * 25 * 4 * 4
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    assert _single(gemm, [3, 7], (5, 7)).macs == 3 * 5 * 7
    gemm_t = helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)
    assert _single(gemm_t, [7, 3], (7, 5)).macs == 3 * 5 * 7
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    assert _single(matmul, [2, 4, 7], (7, 5)).macs == 2 * 4 * 5 * 7


@pytest.mark.parametrize(("arch", "table"), [("resnet34", 3.6e9), ("resnet50", 3.8e9)])
def test_resnets_match_table_2_3(arch, table):
    model = ir.from_proto(_resnet_module().build(arch))
    result = cost.estimate(model)
    assert abs(result.macs / table - 1) < 0.03, result.macs
    expected_params = {"resnet34": 21.8e6, "resnet50": 25.6e6}[arch]  # the paper's parameter counts
    assert abs(result.params / expected_params - 1) < 0.01


def test_light_resnet50_from_the_onnx_wheel():
    """The onnx wheel's light_resnet50 puts the stride on the 3x3 conv (ResNet "v1.5"): 4.09 GMACs, not 3.86."""
    path = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    if not path.exists():
        pytest.skip("this onnx wheel has no light models")
    result = cost.estimate(graph.load(path))
    assert result.macs == 4_089_184_256 and result.params == 25_610_152


def test_dynamic_dims_use_overrides():
    proto = builders.conv_net(size=10)
    model = ir.from_proto(proto)
    small = cost.estimate(model)
    big = cost.estimate(model, input_shapes={"x": [4, 3, 20, 20]})
    conv1 = next(n for n in big.nodes if n.name == "conv1")
    assert conv1.macs == 4 * 8 * 400 * 27 and conv1.output_shape == (4, 8, 20, 20)
    assert big.macs > 4 * small.macs - 1


def test_runtime_computed_shapes_are_measured(tmp_path):
    """Pads computed at run time defeat static inference; the cost model measures those shapes once."""
    shared = Path(os.environ.get("ONNXOPT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    path = shared / "models/cifar10/cifar10_resnet20_akamaster_bn.onnx"
    if not path.exists():
        pytest.skip("../shared is absent")
    result = cost.estimate(graph.load(path))
    assert all(n.output_shape is not None for n in result.nodes)
    assert abs(result.macs / 40.55e6 - 1) < 0.01  # ResNet-20's well-known 40.55 M MACs
