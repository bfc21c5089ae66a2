"""simplify: structure of the cleaned graph and exactness against onnxruntime on the unmodified model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.passes.simplify import SimplifyConfig, SimplifyPass
from tests import builders

DATA = Path(__file__).resolve().parents[1] / "data"


def _simplify(proto, **config):
    model = ir.from_proto(proto)
    result = SimplifyPass(SimplifyConfig(**config))(model)
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def _assert_same(reference, candidate, feeds, tol=1e-5):
    ref, got = builders.run(reference, feeds), builders.run(candidate, feeds)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=tol, atol=tol)


def _affine_model(scale_shape=(4, 1, 1), offset_shape=(1, 4, 1, 1), shared=False, output_is_conv=False):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal(scale_shape).astype(np.float32), "s"),
        numpy_helper.from_array(rng.standard_normal(offset_shape).astype(np.float32), "t"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 4, name="conv"),
        helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["t", "m"], ["y"], name="add"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])]
    if shared:  # a second conv reads the same weight
        nodes.append(helper.make_node("Conv", ["x", "w"], ["z"], pads=[1] * 4, name="conv_shared"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 6, 6]))
    if output_is_conv:
        outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 4, 6, 6]))
    return builders.make_model(nodes, [helper.make_tensor_value_info("x", 1, ["N", 3, 6, 6])], outputs, inits)


def _x(shape=(2, 3, 6, 6), seed=1):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def test_batchnorm_folds_into_conv():
    proto = builders.conv_net(seed=2)
    result, out = _simplify(proto)
    assert result.modified and "BatchNormalization" not in _ops(out)
    assert any(c.site == "BatchNormalization" for c in result.changes)
    _assert_same(proto, out, _x((3, 3, 10, 10)))


def test_per_channel_mul_add_folds_into_conv_and_keeps_the_output_name():
    proto = _affine_model()
    result, out = _simplify(proto)
    assert _ops(out) == ["Conv"] and out.graph.output[0].name == "y"
    assert any("Mul/Add folded" in c.what for c in result.changes)
    _assert_same(proto, out, _x())


def test_mul_that_is_not_per_channel_is_left_alone():
    proto = _affine_model(scale_shape=(1, 1, 6))  # varies along W, not along channels
    _, out = _simplify(proto)
    assert _ops(out) == ["Conv", "Mul", "Add"]  # the Add follows the Mul, not the Conv: nothing to fold
    _assert_same(proto, out, _x())


def test_shared_weight_is_not_changed_for_its_other_reader():
    proto = _affine_model(shared=True)
    result, out = _simplify(proto)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and _ops(out).count("Mul") == 0
    names = {n.name: n.input[1] for n in convs}
    assert names["conv_shared"] == "w" and names["conv"] != "w"
    _assert_same(proto, out, _x())


def test_conv_output_that_is_a_graph_output_is_not_folded():
    proto = _affine_model(output_is_conv=True)
    _, out = _simplify(proto)
    assert _ops(out) == ["Conv", "Mul", "Add"]
    _assert_same(proto, out, _x())


def test_tf2onnx_batchnorm_mul_add_disappears():
    """A Keras CNN converted by tf2onnx (models/keras_bn_fixture.py): BN as Mul+Add after ConvTranspose and MatMul."""
    proto = onnx.load(DATA / "keras_bn_tf2onnx.onnx")
    assert _ops(proto).count("Mul") == 2 and _ops(proto).count("Add") == 2
    result, out = _simplify(proto)
    assert "Mul" not in _ops(out) and "Add" not in _ops(out)
    assert "Gemm" in _ops(out)  # MatMul + folded bias Add became one Gemm
    feeds = {"image": np.random.default_rng(3).standard_normal((4, 16, 16, 3)).astype(np.float32)}
    _assert_same(proto, out, feeds)


def _placeholder_convs(second_input: str):
    """Two Convs on equal ConstantOfShape placeholder weights; the second reads ``second_input``."""
    shape = numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "wshape")
    fill = numpy_helper.from_array(np.array([0.01], np.float32), "fill")
    nodes = [
        helper.make_node("ConstantOfShape", ["wshape"], ["w1"], value=fill),
        helper.make_node("ConstantOfShape", ["wshape"], ["w2"], value=fill),
        helper.make_node("Relu", ["x"], ["rx"]),
        helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1] * 4),
        helper.make_node("Conv", [second_input, "w2"], ["d"], pads=[1] * 4),
        helper.make_node("Add", ["c", "d"], ["y"]),
    ]
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", 1, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", 1, ["N", 4, 6, 6])],
        [shape],
    )


def test_constant_of_shape_weights_become_separate_initializers():
    proto = _placeholder_convs("rx")  # another input: no CSE merge
    result, out = _simplify(proto)
    assert "ConstantOfShape" not in _ops(out)
    weights = [n.input[1] for n in out.graph.node if n.op_type == "Conv"]
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert len(set(weights)) == 2 and all(w in inits for w in weights)  # equal values, still two tensors
    assert inits[weights[0]].shape == (4, 3, 3, 3)
    _assert_same(proto, out, _x())
    small, _ = _simplify(proto, fold_limit=10)
    assert not any("ConstantOfShape folded" in c.what for c in small.changes)


def test_identical_nodes_on_placeholder_weights_merge():
    """Equal folded weights on the same input: one Conv remains (as onnxruntime's CSE would make it)."""
    proto = _placeholder_convs("x")
    _, out = _simplify(proto)
    assert _ops(out) == ["Conv", "Add"]  # the Relu on x is unused once both Convs read x
    _assert_same(proto, out, _x())


@pytest.mark.parametrize("keep", [False, True])
def test_initializers_listed_as_inputs(keep):
    proto = builders.mlp(sizes=(4, 5, 3))
    proto.ir_version = 3
    proto.opset_import[0].version = 9
    for init in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    result, out = _simplify(proto, keep_initializer_inputs=keep)
    assert [i.name for i in out.graph.input] == (["x", "w1", "b1", "w2", "b2"] if keep else ["x"])
    assert out.ir_version >= (3 if keep else 4)
    _assert_same(proto, out, {"x": np.ones((2, 4), np.float32)})


def test_declines_on_a_clean_graph():
    proto = builders.mlp()
    before = proto.SerializeToString()
    result, out = _simplify(proto)
    assert not result.modified and not result.changes
    assert onnx.load_from_string(before) == proto


def test_output_converts_to_ort_format_for_onnxruntime_mobile(tmp_path):
    """The simplified model must still go through onnxruntime's ORT-format converter and load from the .ort file."""
    import subprocess
    import sys

    import onnxruntime as ort

    proto = onnx.load(DATA / "keras_bn_tf2onnx.onnx")
    _, out = _simplify(proto)
    onnx.save(out, tmp_path / "model.onnx")
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "required_operators.config").exists()
    session = ort.InferenceSession(str(tmp_path / "model.ort"), providers=["CPUExecutionProvider"])
    feeds = {"image": np.random.default_rng(4).standard_normal((2, 16, 16, 3)).astype(np.float32)}
    got = session.run(None, feeds)[0]
    np.testing.assert_allclose(got, builders.run(proto, feeds)[session.get_outputs()[0].name], rtol=1e-5, atol=1e-5)
