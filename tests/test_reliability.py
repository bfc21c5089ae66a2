"""Reliability: runs are reproducible and fail cleanly; odd graphs are handled or skipped with a reason.

Random graphs through the exact and lossy settings are property-tested in tests/test_properties.py.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import cli, latency_cache, registry, stats
from onnxopt.pass_base import OptPass
from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
from tests import builders
from tests.passes.test_prune import _Net


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
            ["run", path, "--passes", passes, "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o.onnx"),
             "--allow-small-eval"]
        )  # fmt: skip
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


# --- interrupted and failing runs -------------------------------------------------------------------------------


class _Interrupt(OptPass):
    """A pass that is interrupted (Ctrl-C) halfway through its rewrite."""

    name = "interrupt"
    exact = False

    def call(self, model):
        model.graph.initializers["w1"].const_value = ir.tensor(np.zeros((16, 8), np.float32), name="w1")
        raise KeyboardInterrupt


def _isolated_tmp(tmp_path, monkeypatch):
    """Point onnxopt's own temporary files (sessions, staged saves) at a directory the test can watch."""
    import tempfile

    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    return systmp


@pytest.mark.parametrize("where", ["pass", "save"])
def test_an_interrupted_run_leaves_no_output_no_temp_files_and_the_input_untouched(
    where, tmp_path, capsys, monkeypatch
):
    systmp = _isolated_tmp(tmp_path, monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    model = builders.save(builders.conv_net(), work / "m.onnx")  # simplify changes it (BatchNorm): a real save
    before = open(model, "rb").read()
    passes = "simplify"
    if where == "pass":
        monkeypatch.setitem(registry.BUILTIN_PASSES, "interrupt", "tests.test_reliability:_Interrupt")
        passes = "interrupt"
    else:  # Ctrl-C while the output model is being written: the half-written file must not appear
        real_save, saved = ir.save, []

        def save_then_interrupt(model_, path, **kwargs):
            real_save(model_, path, **kwargs)
            if os.path.basename(path) == "out.onnx":  # the output itself, not a session's temporary copy
                saved.append(path)
                raise KeyboardInterrupt

        monkeypatch.setattr(ir, "save", save_then_interrupt)
    code = cli.main(["run", model, "--passes", passes, "-o", str(work / "out.onnx"), "--report", str(work / "r.json")])
    err = capsys.readouterr().err
    assert code == 130 and err.strip() == "onnxopt: interrupted; nothing was written"
    assert where == "pass" or saved  # the interrupt came after the output was complete, before the rename
    assert sorted(os.listdir(work)) == ["m.onnx"] and os.listdir(systmp) == []
    assert open(model, "rb").read() == before


def test_a_pass_exception_leaves_no_temp_files(tmp_path, capsys, monkeypatch):
    systmp = _isolated_tmp(tmp_path, monkeypatch)
    monkeypatch.setitem(registry.BUILTIN_PASSES, "boom", "tests.test_manager:_Boom")
    work = tmp_path / "work"
    work.mkdir()
    model = builders.save(builders.conv_net(), work / "m.onnx")
    np.savez(work / "d.npz", x=np.ones((4, 3, 10, 10), np.float32))
    before = {name: (work / name).read_bytes() for name in os.listdir(work)}
    code = cli.main(["run", model, "--passes", "prune,boom", "--prune-ratio", "0.25", "--data", str(work / "d.npz"),
                     "--allow-small-eval", "-o", str(work / "out.onnx"), "--report", str(work / "r.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3 and "pass 'boom' failed after ['simplify', 'prune']" in err and len(err.splitlines()) == 1
    assert {name: (work / name).read_bytes() for name in os.listdir(work)} == before and os.listdir(systmp) == []


DETERMINISM = {
    "simplify": [],
    "prune": ["--prune-ratio", "0.3"],
    "prune search": ["--passes", "prune"],
    "split": ["--split-rank", "2"],
    "split search": ["--passes", "split", "--min-cosine", "0.99"],
    "svd": ["--svd-rank", "4"],
    "share": ["--share-bits", "3", "--share-min-size", "16"],
    "share search": ["--passes", "share", "--share-min-size", "16"],
    "quant": ["--quant-objective", "size"],  # by speed the kept variant would depend on a timing
}


@pytest.mark.parametrize("case", sorted(DETERMINISM))
def test_same_inputs_and_seed_give_a_byte_identical_model_for_every_pass(case, tmp_path, capsys):
    proto = builders.conv_net(channels=(3, 16, 16), seed=2)
    model = builders.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((16, 3, 10, 10)).astype(np.float32))
    extra = DETERMINISM[case]
    passes = ["--passes", case.split()[0]] if "--passes" not in extra else []
    blobs = []
    for index in range(2):
        out = tmp_path / f"out{index}.onnx"
        code = cli.main(["run", model, *passes, *extra, "--data", str(tmp_path / "d.npz"), "--seed", "7", "--force",
                         "--allow-small-eval", "-o", str(out)])  # fmt: skip
        captured = capsys.readouterr()
        assert code in (0, 1), captured.out + captured.err
        blobs.append(out.read_bytes())
    assert blobs[0] == blobs[1]
    assert proto.graph.node[0].op_type in {n.op_type for n in onnx.load_from_string(blobs[0]).graph.node}


# --- odd but valid graphs: handled (outputs match onnxruntime on the original) or skipped with a reason ----------

EXACT_PASSES = [("prune", {"criterion": "dead"}), ("split", {"energy": 1.0}), ("svd", {"energy": 1.0})]


def _exact_run(proto, calib, test=None, passes=EXACT_PASSES, **manager_options):
    """Run exact settings of every structural pass through PassManager; outputs must match the original."""
    from onnxopt.manager import PassManager
    from onnxopt.validate import Budget

    made = [registry.make_pass(name, **options) for name, options in passes]
    report = PassManager(made, data=calib, budget=Budget(max_abs=1e-4), **manager_options).run(ir.from_proto(proto))
    out = ir.to_proto(report.model)
    onnx.checker.check_model(out, full_check=True)
    assert report.ok, report.validation.failures
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    for feeds in [calib] + ([test] if test is not None else []):
        expected, got = builders.run(proto, feeds), builders.run(out, feeds)
        for name, array in expected.items():
            np.testing.assert_allclose(got[name], array, rtol=1e-4, atol=1e-4, err_msg=name)
    return report, out


def _skips(report):
    return [s.reason for record in report.passes for s in record.skipped]


def test_dynamic_batch_and_spatial_dims(tmp_path):
    proto = builders.conv_net(seed=3)
    for dim, name in zip(proto.graph.input[0].type.tensor_type.shape.dim[2:], "HW", strict=True):
        dim.Clear()
        dim.dim_param = name
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((12, 3, 10, 10)).astype(np.float32)}
    report, out = _exact_run(proto, calib, {"x": rng.standard_normal((3, 3, 13, 7)).astype(np.float32)})
    assert "spatial shape unknown (give --input-shape)" in _skips(report)  # split needs H and W
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim] == ["N", "", "H", "W"]


def test_several_inputs_and_outputs_with_integer_and_boolean_inputs():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("table", rng.standard_normal((10, 24))), ("w1", rng.standard_normal((24, 24)) / 5),
        ("b1", rng.standard_normal(24) * 0.1), ("w2", np.outer(rng.standard_normal(24), rng.standard_normal(20))),
        ("w3", rng.standard_normal((20, 3))), ("zero", np.zeros(1)),
    ]]  # fmt: skip
    inits[1].CopyFrom(
        numpy_helper.from_array(np.where(np.arange(24) % 5 == 0, 0, numpy_helper.to_array(inits[1])), "w1")
    )
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Where", ["mask", "x", "zero"], ["xm"]),
        helper.make_node("Add", ["emb", "xm"], ["s"]),
        helper.make_node("MatMul", ["s", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["y"]),
    ]
    proto = builders.make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 24]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["N", 24])],
        inits,
    )  # fmt: skip

    def feeds(seed, n):
        r = np.random.default_rng(seed)
        return {"ids": r.integers(0, 10, n), "mask": r.random((n, 24)) > 0.5,
                "x": r.standard_normal((n, 24)).astype(np.float32)}  # fmt: skip

    report, out = _exact_run(proto, feeds(1, 32), feeds(2, 7))
    changes = {r.name: len(r.changes) for r in report.passes}
    assert changes["svd"] == 1  # the rank-1 w2; h1 is a graph output, so its dead neurons stay
    assert [(i.name, i.type.tensor_type.elem_type) for i in out.graph.input] == [
        ("ids", TensorProto.INT64), ("mask", TensorProto.BOOL), ("x", TensorProto.FLOAT)]  # fmt: skip


def _as_constant_nodes(proto):
    from onnx import helper

    nodes = [helper.make_node("Constant", [], [i.name], value=i) for i in proto.graph.initializer]
    rest = list(proto.graph.node)
    del proto.graph.initializer[:]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes + rest)
    return proto


def _as_graph_inputs(proto):
    from onnx import helper

    for init in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return proto


@pytest.mark.parametrize("storage", ["constant nodes", "graph inputs", "graph inputs kept"])
def test_weights_as_constant_nodes_and_as_graph_inputs(storage):
    proto = builders.conv_net(channels=(3, 8, 16), seed=5)
    proto = _as_constant_nodes(proto) if storage == "constant nodes" else _as_graph_inputs(proto)
    onnx.checker.check_model(proto)
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((12, 3, 10, 10)).astype(np.float32)}
    if storage == "graph inputs kept":  # the user keeps weights overridable: passes must not rewrite them
        passes = [("simplify", {"keep_initializer_inputs": True}), *EXACT_PASSES]
        report, out = _exact_run(proto, calib, passes=passes)
        assert not any(r.modified for r in report.passes if r.name != "simplify")
        assert {i.name for i in proto.graph.initializer} <= {i.name for i in out.graph.input}
        return
    report, out = _exact_run(proto, calib, {"x": rng.standard_normal((2, 3, 10, 10)).astype(np.float32)})
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}  # folded: the weights were readable


def test_shared_initializers_are_skipped_or_handled_exactly():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    w = rng.standard_normal((24, 1)) @ rng.standard_normal((1, 24))  # rank 1: svd would apply if not shared
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(np.zeros(24, np.float32), "b")]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g1"], name="fc1"),
        helper.make_node("Relu", ["g1"], ["h"]),
        helper.make_node("Gemm", ["h", "w", "b"], ["y"], name="fc2"),
    ]
    proto = builders.make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])], inits,
    )  # fmt: skip
    feeds = {"x": rng.standard_normal((16, 24)).astype(np.float32)}
    passes = [*EXACT_PASSES, ("share", {"bits": 8, "min_size": 16})]
    from onnxopt.manager import PassManager
    from onnxopt.validate import Budget

    report, _ = _exact_run(proto, feeds, {"x": rng.standard_normal((4, 24)).astype(np.float32)})
    assert "weight is shared or a graph input" in _skips(report)
    made = [registry.make_pass(name, **options) for name, options in passes]
    shared = PassManager(made, data=feeds, budget=Budget(min_cosine=0.99)).run(ir.from_proto(proto))
    assert "weight is shared or a graph input" in _skips(shared)


def _control_flow_model():
    """Gemm → Relu → If(flag) {Gemm | Neg} → Loop(3×: Add) → local function (Relu, Mul 2) → y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    f = TensorProto.FLOAT
    w_then = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w_then")
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "w_then"], ["t"], name="then_mm")], "then", [],
                               [helper.make_tensor_value_info("t", f, ["N", 16])], [w_then])  # fmt: skip
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("e", f, ["N", 16])])  # fmt: skip
    b = TensorProto.BOOL
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_id"),
         helper.make_node("Add", ["acc_in", "one"], ["acc_out"], name="body_add")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", b, []),
         helper.make_tensor_value_info("acc_in", f, None)],
        [helper.make_tensor_value_info("cond_out", b, []), helper.make_tensor_value_info("acc_out", f, None)],
    )  # fmt: skip
    function = helper.make_function(
        "local", "ReluTwice", ["a"], ["b"],
        [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Constant", [], ["two"], value_float=2.0),
         helper.make_node("Mul", ["r", "two"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    dead = rng.standard_normal((16, 8)).astype(np.float32)
    dead[:4] = 0
    bias = np.where(np.arange(16) < 4, -1.0, 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(dead, "w1"), numpy_helper.from_array(bias, "b1"),
             numpy_helper.from_array(np.ones(1, np.float32), "one"), numpy_helper.from_array(np.array(3), "trips"),
             numpy_helper.from_array(np.array(True), "go"),
             numpy_helper.from_array(np.array(0.0, np.float32), "z")]  # fmt: skip
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["g"], name="fc1", transB=1),
        helper.make_node("Relu", ["g"], ["h"]),
        helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),  # a data-dependent branch condition
        helper.make_node("Greater", ["mx", "z"], ["flag"]),
        helper.make_node("If", ["flag"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "go", "branch"], ["looped"], body=body),
        helper.make_node("ReluTwice", ["looped"], ["y"], domain="local"),
    ]
    graph = helper.make_graph(
        nodes, "cf",
        [helper.make_tensor_value_info("x", f, ["N", 8])],
        [helper.make_tensor_value_info("y", f, ["N", 16])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, functions=[function], ir_version=builders.IR_VERSION,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])  # fmt: skip
    onnx.checker.check_model(model, full_check=True)
    return model


def _semantics(graph_or_function):
    """Nodes (op, inputs, outputs, attributes) and initializer values: what a rewrite could change."""
    nodes = [(n.op_type, n.domain, list(n.input), list(n.output), sorted(a.name for a in n.attribute))
             for n in graph_or_function.node]  # fmt: skip
    inits = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in getattr(graph_or_function, "initializer", [])}
    return nodes, inits


@pytest.mark.parametrize("passes", ["simplify", "prune", "split", "svd", "share", "quant"])
def test_if_loop_subgraphs_and_local_functions_are_left_untouched(passes, tmp_path, capsys):
    proto = _control_flow_model()
    path = builders.save(proto, tmp_path / "cf.onnx")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    extra = {"prune": ["--prune-criterion", "dead"], "svd": ["--svd-energy", "1"], "split": ["--split-energy", "1"],
             "share": ["--share-min-size", "16", "--min-cosine", "0.99"],
             "quant": ["--quant-force", "--min-cosine", "0.99"]}  # fmt: skip
    code = cli.main(["run", path, "--passes", passes, *extra.get(passes, []), "--data", str(tmp_path / "d.npz"),
                     "--allow-small-eval", "-o", str(tmp_path / "o.onnx"),
                     "--report", str(tmp_path / "r.json")])  # fmt: skip
    out_text = capsys.readouterr().out
    assert code == 0, out_text
    out = onnx.load(tmp_path / "o.onnx")
    subgraphs = {n.op_type: [_semantics(a.g) for a in n.attribute if a.g.node] for n in out.graph.node}
    original = {n.op_type: [_semantics(a.g) for a in n.attribute if a.g.node] for n in proto.graph.node}
    assert subgraphs["If"] == original["If"] and subgraphs["Loop"] == original["Loop"]
    # the local function stays as it is, or simplify (onnxscript's optimizer) inlines it: never half-rewritten
    if out.functions:
        assert [_semantics(f) for f in out.functions] == [_semantics(f) for f in proto.functions]
        assert "ReluTwice" in {n.op_type for n in out.graph.node}
    else:
        assert "ReluTwice" not in {n.op_type for n in out.graph.node}
    for sign in (1, -1):  # both branches: max(x) > 0, and max(-|x|) < 0
        feeds = {"x": sign * np.abs(x[:5])}
        got, expected = builders.run(out, feeds)["y"], builders.run(proto, feeds)["y"]
        if passes in ("simplify", "prune", "split", "svd"):  # exact settings
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        else:  # lossy (validated on the then-branch data only): the same outputs up to a small relative error
            assert np.linalg.norm(got - expected) <= 0.2 * np.linalg.norm(expected)
    if passes == "prune":  # the 4 dead neurons of fc1 feed the If: the pass declines and says why
        assert "If has subgraphs" in out_text or "subgraph" in out_text, out_text


def test_custom_domain_ops_are_skipped_and_reported(tmp_path, capsys):
    """A com.microsoft op (onnxruntime runs it, onnxopt's passes don't know it): exit 0, skipped with a reason."""
    import json

    from onnx import TensorProto, helper

    proto = builders.mlp(sizes=(8, 16, 16, 4), seed=1)
    relu = next(n for n in proto.graph.node if n.name == "relu1")
    relu.CopyFrom(helper.make_node("Gelu", ["g1"], ["h1"], name="gelu1", domain="com.microsoft"))
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(proto)
    path = builders.save(proto, tmp_path / "ms.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    code = cli.main(["run", path, "--passes", "prune", "--prune-ratio", "0.5", "--data", str(tmp_path / "d.npz"),
                     "--force", "--allow-small-eval", "-o", str(tmp_path / "o.onnx"),
                     "--report", str(tmp_path / "r.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert code in (0, 1), out
    report = json.loads((tmp_path / "r.json").read_text())
    prune = next(p for p in report["passes"] if p["name"] == "prune")
    assert any("custom op com.microsoft::Gelu" in s["reason"] for s in prune["skipped"]), prune
    optimized = onnx.load(tmp_path / "o.onnx")
    assert "Gelu" in {n.op_type for n in optimized.graph.node} and TensorProto.FLOAT
    assert [i.dims for i in optimized.graph.initializer if i.name == "w1"] == [[16, 8]]  # g1 feeds the custom op


@pytest.mark.slow
@pytest.mark.parametrize("passes", ["simplify", "quant"])
def test_a_model_over_2gb_is_saved_with_external_data_and_matches(passes, tmp_path, capsys):
    """One 2.1 GB MatMul weight (16384 x 32768 float32) whose output feeds a tiny head; `simplify` round-trips it,
    `quant` writes it as int8 (0.5 GB, one file), both validated against the original."""
    import shutil

    from onnx import TensorProto, helper, numpy_helper

    if shutil.disk_usage(tmp_path).free < 10e9:
        pytest.skip("needs 10 GB of free disk")
    k, m = 16384, 32768
    weight = np.zeros((k, m), np.float32)
    weight[:, ::1024] = np.random.default_rng(0).standard_normal((k, m // 1024)).astype(np.float32) / 128
    weight.tofile(tmp_path / "big.onnx.data")  # protobuf cannot hold it: the tensor points at this file
    del weight
    big = onnx.TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[k, m], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(k * m * 4))):
        big.external_data.add(key=key, value=value)
    inits = [big, numpy_helper.from_array(np.ones((m, 2), np.float32), "head")]
    nodes = [helper.make_node("MatMul", ["x", "big"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "head"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=builders.IR_VERSION)
    onnx.save(proto, tmp_path / "big.onnx")
    del proto, inits, graph
    x = np.random.default_rng(1).standard_normal((2, k)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    # one recipe, timed once: each int8 recipe re-quantizes the 2 GB weight (dynamic: no calibration)
    quant = ["--allow-small-eval", "--quant-force", "--quant-objective", "size", "--quant-recipes", "dyn-s8-pt",
             "--quant-rounds", "1"]  # fmt: skip
    extra = quant if passes == "quant" else []
    code = cli.main(["run", str(tmp_path / "big.onnx"), "--passes", passes, *extra, "--data", str(tmp_path / "d.npz"),
                     "--eval", str(tmp_path / "d.npz"), "-o", str(tmp_path / "out.onnx")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "validation on 2 samples" in captured.out and ": ok" in captured.out, captured.out
    if passes == "simplify":
        assert (tmp_path / "out.onnx.data").stat().st_size > 2**31 and (tmp_path / "out.onnx").stat().st_size < 2**20
    else:
        assert not (tmp_path / "out.onnx.data").exists() and (tmp_path / "out.onnx").stat().st_size < 2**30
    import onnxruntime as ort

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    got, expected = run(tmp_path / "out.onnx"), run(tmp_path / "big.onnx")
    if passes == "simplify":
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert float((got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected)) > 0.999


# --- external data: inputs and outputs with a .onnx.data file -----------------------------------------------------


def _external_conv_net(folder):
    """builders.conv_net saved with every weight in ``m.onnx.data`` (as exporters do for big models)."""
    folder.mkdir(exist_ok=True)
    proto = builders.conv_net(seed=0)
    external = onnx.ModelProto()
    external.CopyFrom(proto)  # onnx.save moves the weights of the proto it saves out of it
    onnx.save(external, folder / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert not any(i.raw_data for i in onnx.load(folder / "m.onnx", load_external_data=False).graph.initializer)
    np.savez(folder / "d.npz", x=np.random.default_rng(0).standard_normal((16, 3, 10, 10)).astype(np.float32))
    return proto, folder / "m.onnx", folder / "d.npz"


@pytest.mark.parametrize(
    "args", [["--passes", "simplify"], ["--passes", "prune,svd,quant"], ["--passes", "simplify", "--no-validate"]]
)
def test_a_model_with_external_data_is_optimized_and_written_loadable(args, tmp_path, capsys):
    import onnxruntime as ort

    proto, model, data = _external_conv_net(tmp_path / "in")
    weights = (tmp_path / "in" / "m.onnx.data").read_bytes()
    (tmp_path / "out").mkdir()  # elsewhere: a copied relative reference to m.onnx.data would not resolve there
    out = tmp_path / "out" / "o.onnx"
    code = cli.main(["run", str(model), *args, "--data", str(data), "--allow-small-eval", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert os.listdir(tmp_path / "out") == ["o.onnx"]  # a small model: weights inside the file
    x = np.load(data)["x"]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = builders.run(proto, {"x": x})["y"]
    tol = 1e-4 if "quant" not in args[1] else 0.2 * np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=tol)
    assert (tmp_path / "in" / "m.onnx.data").read_bytes() == weights


# --- outputs never overwrite inputs or each other -------------------------------------------------------------------

COLLISIONS = {  # name: (extra arguments with {in} for the input folder, the path named in the error)
    "-o is --data": (["-o", "{in}/d.npz"], "--data"),
    "-o is --eval through ..": (["--eval", "{in}/e.npz", "-o", "{in}/sub/../e.npz"], "--eval"),
    "-o is a symlink to --data": (["-o", "{in}/link.npz"], "--data"),
    "-o is a hard link to --data": (["-o", "{in}/hard.npz"], "--data"),
    "-o is the input's external data": (["-o", "{in}/m.onnx.data"], "the input model's external data"),
    "-o's external data is the input's": (["-o", "{in}/o.onnx"], "the input model's external data"),
    "--report is -o": (["-o", "{in}/o.onnx", "--report", "{in}/o.onnx"], "-o"),
    "--html is -o": (["-o", "{in}/o.onnx", "--html", "{in}/sub/../o.onnx"], "-o"),
    "--report is --data": (["-o", "{in}/o.onnx", "--report", "{in}/d.npz"], "--data"),
}


@pytest.mark.parametrize("case", sorted(COLLISIONS))
def test_an_output_that_is_an_input_or_another_output_is_refused_before_anything_is_written(case, tmp_path, capsys):
    _, model, data = _external_conv_net(tmp_path / "in")
    folder = tmp_path / "in"
    (folder / "sub").mkdir()
    np.savez(folder / "e.npz", x=np.load(data)["x"][:4])
    (folder / "link.npz").symlink_to(data)
    os.link(data, folder / "hard.npz")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    extra, named = COLLISIONS[case]
    if case == "-o's external data is the input's":  # the input's weights live in o.onnx.data: -o o.onnx
        proto = onnx.load(model, load_external_data=False)
        for tensor in proto.graph.initializer:
            next(e for e in tensor.external_data if e.key == "location").value = "o.onnx.data"
        os.replace(folder / "m.onnx.data", folder / "o.onnx.data")
        onnx.save(proto, model)
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    args = [a.format(**{"in": folder}) for a in extra]
    code = cli.main(["run", str(model), "--passes", "simplify", "--data", str(data), *args])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert len(captured.err.strip().splitlines()) == 1 and f"would overwrite {named} (" in captured.err, captured.err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


# --- bad models and data are exit 2 with one line naming the op, input or tensor ---------------------------------


def _unknown_op(folder):
    from onnx import helper

    proto = builders.mlp(sizes=(8, 16, 4), seed=1)
    relu = next(n for n in proto.graph.node if n.name == "relu1")
    relu.CopyFrom(helper.make_node("Mystery", ["g1"], ["h1"], name="mystery1", domain="com.example"))
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    return builders.save(proto, folder / "m.onnx")


def _batch_zero(folder):
    return builders.save(builders.mlp(sizes=(8, 16, 4), batch=0), folder / "m.onnx")


def _nan_weight(folder):
    proto = builders.mlp(sizes=(8, 16, 4), seed=1)
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.full((16, 8), np.nan, np.float32), "w1"))
    return builders.save(proto, folder / "m.onnx")


def _huge_dims(folder):
    from onnx import TensorProto, helper

    dims = [1, 1 << 20, 1 << 20, 1 << 10]  # 4 PiB of float32 per sample
    proto = builders.make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)], [],
    )  # fmt: skip
    return builders.save(proto, folder / "m.onnx")


BAD_MODELS = {  # name: (builder, passes, the fragment naming what is wrong)
    "unknown custom op": (_unknown_op, "simplify", "op com.example::Mystery is not one onnxruntime knows"),
    "unknown custom op, quant": (_unknown_op, "quant", "op com.example::Mystery is not one onnxruntime knows"),
    "batch-0 input": (_batch_zero, "simplify", "input 'x' has shape 0x8"),
    "all-NaN weight": (_nan_weight, "quant", "weight 'w1' is all NaN"),
    "huge dims": (_huge_dims, "simplify", "input 'x': one random input of shape 1x1048576x1048576x1024"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_model_onnxopt_cannot_use_is_exit_2_with_one_line_naming_why(case, tmp_path, capsys):
    build, passes, fragment = BAD_MODELS[case]
    model = build(tmp_path)
    args = ["run", model, "--passes", passes, "-o", str(tmp_path / "o.onnx")]
    if case != "huge dims":  # without data: random inputs
        rng = np.random.default_rng(0)
        for name in ("d", "e"):
            np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((32, 8)).astype(np.float32))
        args += ["--data", str(tmp_path / "d.npz"), "--eval", str(tmp_path / "e.npz")]
    code = cli.main(args)
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert len(captured.err.strip().splitlines()) == 1 and fragment in captured.err, captured.err
    assert not (tmp_path / "o.onnx").exists()


def test_running_out_of_memory_is_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    from onnxopt import manager

    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 8.00 PiB for an array with shape (1, 1048576, 1048576, 1024)")

    monkeypatch.setattr(manager.PassManager, "run", exhausted)
    model = builders.save(builders.mlp(), tmp_path / "m.onnx")
    code = cli.main(["run", model, "--passes", "simplify", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "out of memory (Unable to allocate 8.00 PiB" in err


# --- inputs without a shared batch axis: stacked feeds and folders of .npz feeds ----------------------------------


def _keyword_spotter():
    """A streaming keyword model: x (1, 400) float32, state h (1, 1, 64) float32, rate () int64 →
    logits (1, 10), h_out (1, 1, 64). No input has a batch axis the others share."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w_in", (rng.standard_normal((400, 64)) / 20).astype(np.float32)),
        ("w_rec", (rng.standard_normal((64, 64)) / 8).astype(np.float32)),
        ("w_out", rng.standard_normal((64, 10)).astype(np.float32)),
        ("flat", np.array([1, 64], np.int64)), ("state", np.array([1, 1, 64], np.int64)),
        ("hz", np.array(16000.0, np.float32)),
    ]]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["xw"]),
        helper.make_node("Reshape", ["h", "flat"], ["hf"]),
        helper.make_node("MatMul", ["hf", "w_rec"], ["hw"]),
        helper.make_node("Add", ["xw", "hw"], ["s"]),
        helper.make_node("Tanh", ["s"], ["hn"]),
        helper.make_node("Reshape", ["hn", "state"], ["h_out"]),
        helper.make_node("Cast", ["rate"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["rf", "hz"], ["scale"]),
        helper.make_node("MatMul", ["hn", "w_out"], ["lo"]),
        helper.make_node("Mul", ["lo", "scale"], ["logits"]),
    ]
    f = TensorProto.FLOAT
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", f, [1, 400]), helper.make_tensor_value_info("h", f, [1, 1, 64]),
         helper.make_tensor_value_info("rate", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("logits", f, [1, 10]), helper.make_tensor_value_info("h_out", f, [1, 1, 64])],
        inits,
    )  # fmt: skip


def _keyword_feeds(count, seed):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((count, 1, 400)).astype(np.float32),
            "h": np.tanh(rng.standard_normal((count, 1, 1, 64))).astype(np.float32),
            "rate": rng.choice([8000, 16000, 22050], count).astype(np.int64)}  # fmt: skip


@pytest.mark.parametrize("layout", ["stacked npz", "folder of npz"])
@pytest.mark.parametrize("passes", ["simplify", "prune,svd,quant"])
def test_inputs_without_a_shared_batch_axis_are_read_as_stacked_feeds(layout, passes, tmp_path, capsys):
    proto = _keyword_spotter()
    model = builders.save(proto, tmp_path / "kws.onnx")
    paths = []
    for name, seed in (("d", 0), ("e", 1)):
        feeds = _keyword_feeds(40, seed)
        if layout == "stacked npz":
            np.savez(tmp_path / f"{name}.npz", **feeds)
            paths.append(str(tmp_path / f"{name}.npz"))
        else:
            (tmp_path / name).mkdir()
            for index in range(40):
                np.savez(tmp_path / name / f"{index:03d}.npz", **{k: v[index, ...] for k, v in feeds.items()})
            paths.append(str(tmp_path / name))
    out = tmp_path / "o.onnx"
    code = cli.main(["run", model, "--passes", passes, "--data", paths[0], "--eval", paths[1], "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "validation on 40 samples" in captured.out, captured.out
    test = _keyword_feeds(5, 2)
    written = onnx.load(out)
    for index in range(5):
        feeds = {k: v[index, ...] for k, v in test.items()}
        expected, got = builders.run(proto, feeds), builders.run(written, feeds)
        for name, array in expected.items():
            tol = 1e-5 if passes == "simplify" else 0.1 * np.abs(array).max()
            np.testing.assert_allclose(got[name], array, rtol=1e-4, atol=tol, err_msg=name)


def test_data_that_mixes_the_two_layouts_is_exit_2_with_one_line(tmp_path, capsys):
    model = builders.save(_keyword_spotter(), tmp_path / "kws.onnx")
    feeds = _keyword_feeds(4, 0)
    feeds["x"] = feeds["x"][:, 0]  # (4, 400): samples on x's batch axis, while h and rate are stacked
    np.savez(tmp_path / "d.npz", **feeds)
    code = cli.main(["run", model, "--passes", "simplify", "--data", str(tmp_path / "d.npz"), "-o",
                     str(tmp_path / "o.onnx")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'h', 'rate' have one axis more than the input (stacked feeds) but 'x' have the input's own rank" in err


# --- signals during the save, and what a killed run leaves behind ---------------------------------------------------

_SLOW_SAVE = """
import os, shutil, sys, time
import onnx_ir as ir
from onnxopt import cli

real_save, real_rmtree = ir.save, shutil.rmtree

def slow_save(model, path, **kwargs):  # the output is complete in its temporary folder, not yet renamed
    real_save(model, path, **kwargs)
    if os.path.basename(path) == "out.onnx":
        print("saved", flush=True)
        time.sleep(60)

def slow_rmtree(path, *args, **kwargs):  # the cleanup of that folder takes a moment
    if ".out.onnx." in str(path):
        print("cleaning", flush=True)
        time.sleep(1)
    real_rmtree(path, *args, **kwargs)

ir.save, shutil.rmtree = slow_save, slow_rmtree
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGINT", "SIGINT"], ["SIGTERM", "SIGINT"]])
def test_a_signal_during_the_save_leaves_no_partial_output(signals, tmp_path):
    import signal
    import subprocess
    import sys

    work = tmp_path / "work"
    work.mkdir()
    model = builders.save(builders.conv_net(), work / "m.onnx")  # simplify changes it (BatchNorm): a real save
    env = dict(os.environ, TMPDIR=str(tmp_path))
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVE, "run", model, "--passes", "simplify", "-o", str(work / "out.onnx")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        lines = iter(child.stdout.readline, "")
        assert any(line.strip() == "saved" for line in lines)
        child.send_signal(getattr(signal, signals[0]))
        if len(signals) > 1:  # a second signal while the temporary folder is being removed
            assert any(line.strip() == "cleaning" for line in lines)
            child.send_signal(getattr(signal, signals[1]))
        code = child.wait(timeout=60)
    finally:
        child.kill()
    err = child.stderr.read()
    expected = (143, "onnxopt: terminated; nothing was written") if signals[0] == "SIGTERM" else (
        130, "onnxopt: interrupted; nothing was written")  # fmt: skip
    assert (code, err.strip()) == expected, err
    assert sorted(os.listdir(work)) == ["m.onnx"]


def test_temporary_folders_of_a_killed_run_are_removed_by_the_next_run(tmp_path, capsys, monkeypatch):
    import subprocess

    systmp = _isolated_tmp(tmp_path, monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    model = builders.save(builders.conv_net(), work / "m.onnx")  # simplify changes it (BatchNorm): a real save
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs: the run SIGKILLed mid-save
    stale = [work / f".out.onnx.{gone.pid}-k1ll3d.tmp", systmp / f"onnxopt-session-{gone.pid}-k1ll3d"]
    live = [work / f".out.onnx.{os.getppid()}-running.tmp"]  # another run, still going: left alone
    for folder in stale + live:
        folder.mkdir()
        (folder / "out.onnx").write_bytes(b"partial")
    code = cli.main(["run", model, "--passes", "simplify", "-o", str(work / "out.onnx")])
    capsys.readouterr()
    assert code == 0
    assert sorted(os.listdir(work)) == sorted(["m.onnx", "out.onnx", live[0].name])
    assert not stale[1].exists()
    onnx.checker.check_model(onnx.load(work / "out.onnx"))


# --- stderr carries onnxopt's one-line errors only ----------------------------------------------------------------


def test_library_warnings_stay_off_stderr_unless_verbose(tmp_path, capfd, monkeypatch):
    from onnxopt import cost
    from tests.test_backend_corpus import backend_case

    real_estimate = cost.estimate

    def noisy_estimate(*args, **kwargs):
        np.log(np.zeros(1))  # numpy: RuntimeWarning: divide by zero encountered in log
        return real_estimate(*args, **kwargs)

    monkeypatch.setattr(cost, "estimate", noisy_estimate)
    # onnxruntime's quantizer leaves an unused initializer that onnxruntime then warns about, in colour, on fd 2
    path, feeds, _ = backend_case("pytorch-operator/test_operator_sqrt")
    np.savez(tmp_path / "d.npz", **{k: np.abs(np.concatenate([v] * 11)) for k, v in feeds.items()})
    args = ["run", str(path), "--passes", "quant", "--data", str(tmp_path / "d.npz"), "--eval",
            str(tmp_path / "d.npz"), "-o", str(tmp_path / "o.onnx")]  # fmt: skip
    import warnings

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        code = cli.main(args)
    captured = capfd.readouterr()
    assert code == 0 and captured.err == "" and not shown, captured.err + str([str(w.message) for w in shown])
    with pytest.warns(RuntimeWarning, match="divide by zero encountered in log"):
        code = cli.main(["--verbose", *args[:-1], str(tmp_path / "o2.onnx")])
    assert code == 0


# --- the same command on the same data writes the same bytes, also when quant's latency decision is close -------


def test_quant_by_speed_writes_the_same_bytes_when_its_latency_decision_is_close(tmp_path, capsys):
    model = builders.save(builders.mlp(sizes=(128, 128, 10), seed=0), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    for name in ("d", "e"):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((64, 128)).astype(np.float32))
    blobs = []
    for index in range(3):
        out = tmp_path / f"o{index}.onnx"
        code = cli.main(["run", model, "--passes", "quant", "--data", str(tmp_path / "d.npz"), "--eval",
                         str(tmp_path / "e.npz"), "-o", str(out)])  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured.out + captured.err
        blobs.append(out.read_bytes())
    # int8 is within noise of float here (0.91x-1.04x between runs): the first run's timing is recorded
    # (onnxopt/latency_cache.py) and the later runs reuse it, so the choice and the bytes cannot flip
    assert blobs[0] == blobs[1] == blobs[2]
    assert latency_cache.cache_file().is_file()
