"""Reliability: random graphs through the exact passes stay exact; runs are reproducible and fail cleanly."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxopt import cli, data, registry, stats
from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
from onnxopt.passes.simplify import SimplifyPass
from tests import builders
from tests.passes.test_prune import _Net


@st.composite
def conv_graphs(draw):
    """Conv chains with BatchNorm, residual Add, Concat, depthwise convs and Flatten→Gemm; some channels dead."""
    opset = draw(st.sampled_from([13, 15, 17]))
    size = draw(st.integers(5, 8))
    c0 = draw(st.integers(1, 3))
    net = _Net([("x", ["N", c0, size, size])], opset=opset)
    x, channels = "x", c0
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "bn", "residual", "concat", "depthwise"]))
        width = draw(st.integers(2, 6))
        dead = draw(st.sets(st.integers(0, width - 1), max_size=width - 1))
        if kind == "conv":
            x, channels = net.node("Relu", [net.conv(x, channels, width, dead=dead)]), width
        elif kind == "bn":
            c = net.conv(x, channels, width, dead=dead)
            params = [net.init(v) for v in (np.ones(width) * 1.3, np.zeros(width), np.zeros(width), np.ones(width))]
            x, channels = net.node("Relu", [net.node("BatchNormalization", [c, *params])]), width
        elif kind == "residual":
            a = net.conv(x, channels, width, dead=dead)
            b = net.conv(x, channels, width, dead=dead)
            x, channels = net.node("Relu", [net.node("Add", [a, b])]), width
        elif kind == "concat":
            a = net.node("Relu", [net.conv(x, channels, width, dead=dead)])
            b = net.node("Relu", [net.conv(x, channels, 2)])
            x, channels = net.node("Concat", [a, b], axis=1), width + 2
        else:
            a = net.node("Relu", [net.conv(x, channels, width, dead=dead)])
            x, channels = net.node("Relu", [net.conv(a, width, width, group=width, bias=False)]), width
    flat = net.node("Flatten", [x])
    return net.model(net.gemm(flat, channels * size * size, 3), ["N", 3]), (c0, size)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_graphs(), st.integers(0, 2**16))
def test_dead_pruning_and_simplify_are_exact_on_random_graphs(case, seed):
    proto, (c0, size) = case
    model = ir.from_proto(proto)
    x = np.random.default_rng(seed).standard_normal((8, c0, size, size)).astype(np.float32)
    source = data.as_source({"x": x}, model, batch_size=4)
    SimplifyPass()(model)
    prune = ChannelPrunePass(PruneConfig(criterion="dead"))
    stats.attach_stats(model, stats.collect_stats(model, source, prune.stats_request(model)))
    prune(model)
    from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

    RemoveUnusedNodesPass()(model)
    ShapeInferencePass(strict_mode=False)(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    assert [(i.name, i.type) for i in out.graph.input] == [(i.name, i.type) for i in proto.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    test = np.random.default_rng(seed + 1).standard_normal((5, c0, size, size)).astype(np.float32)
    name = proto.graph.output[0].name
    expected = builders.run(proto, {"x": test})[name]
    np.testing.assert_allclose(builders.run(out, {"x": test})[name], expected, rtol=1e-4, atol=1e-4)


def test_same_inputs_give_a_byte_identical_model(tmp_path, capsys):
    root = os.path.join(os.path.dirname(__file__), "..", "models", "tiny_mlp")
    outputs = []
    for index in range(2):
        out = tmp_path / f"out{index}.onnx"
        code = cli.main([
            "run", os.path.join(root, "tiny_mlp.onnx"), "--passes", "prune,svd", "--prune-ratio", "0.3",
            "--svd-rank", "32", "--data", os.path.join(root, "calib.npz"), "--force", "-o", str(out),
        ])  # fmt: skip
        capsys.readouterr()
        assert code in (0, 1)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_a_pass_that_raises_leaves_no_output_and_the_input_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(registry.BUILTIN_PASSES, "boom", "tests.test_manager:_Boom")
    model = builders.save(builders.mlp(), tmp_path / "m.onnx")
    before = open(model, "rb").read()
    code = cli.main(["run", model, "--passes", "boom", "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 3 and "pass 'boom' failed after ['simplify']: kaput" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"] and open(model, "rb").read() == before


@pytest.mark.parametrize("op_domain", ["com.example"])
def test_custom_ops_are_skipped_with_a_reason(op_domain):
    from onnx import helper

    net = _Net([("x", ["N", 8])])
    h = net.node("Relu", [net.gemm("x", 8, 6, dead=(1,))])
    net.nodes.append(helper.make_node("Mystery", [h], ["m"], domain=op_domain, name="mystery"))
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            net.nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 8])],
            [helper.make_tensor_value_info("m", 1, ["N", 6])], net.inits,
        ),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(op_domain, 1)], ir_version=8,
    )  # fmt: skip
    model = ir.from_proto(proto)
    model.graph.node(0).outputs[0].shape = ir.Shape(["N", 6])
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(strict_mode=False)(model)
    result = ChannelPrunePass(PruneConfig(criterion="dead"))
    stats.attach_stats(model, stats.StatsTable(samples=1, source="none"))
    out = result(model)
    assert not out.modified and any("custom op com.example::Mystery" in s.reason for s in out.skipped)


def test_fp16_models_run_through_the_passes(tmp_path, capsys):
    proto = builders.conv_net(seed=0)
    for init in proto.graph.initializer:
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    path = builders.save(proto, tmp_path / "fp16.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((16, 3, 10, 10)).astype(np.float16))
    for passes in ("simplify", "prune", "svd"):
        code = cli.main(
            ["run", path, "--passes", passes, "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o.onnx")]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert onnx.load(tmp_path / "o.onnx").graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_several_inputs_of_different_dtypes(tmp_path, capsys):
    from onnx import helper, numpy_helper

    table = numpy_helper.from_array(np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32), "table")
    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Add", ["emb", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["h"]),
        helper.make_node("Gemm", ["h", "w"], ["y"], transB=1),
    ]
    proto = builders.make_model(
        nodes,
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [table, w],
    )  # fmt: skip
    path = builders.save(proto, tmp_path / "two.onnx")
    code = cli.main(
        ["run", path, "--passes", "simplify,prune", "--prune-ratio", "0.25", "-o", str(tmp_path / "o.onnx")]
    )
    out = capsys.readouterr().out
    assert code in (0, 1) and "validation on" in out  # random int64 ids and float x are made for validation
