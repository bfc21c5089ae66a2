"""svd: exact at full rank, the σ_{r+1}·‖x‖ bound, data-aware beats plain SVD, structure, skips."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import data, stats
from onnxopt.passes.svd import GemmSvdPass, SvdConfig, factorize
from tests import builders


def _gemm(w, *, trans_b=0, alpha=1.0, beta=1.0, bias=True, matmul=False, k=None):
    k = k or (w.shape[1] if trans_b else w.shape[0])
    m = w.shape[0] if trans_b else w.shape[1]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    if matmul:
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")
    else:
        inputs = ["x", "w"]
        if bias:
            inits.append(numpy_helper.from_array(np.linspace(-1, 1, m).astype(np.float32), "b"))
            inputs.append("b")
        node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    return builders.make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m])],
        inits,
    )


def _run_pass(proto, config, x=None):
    model = ir.from_proto(proto)
    if x is not None:
        source = data.as_source({"x": x}, model, batch_size=64)
        pass_ = GemmSvdPass(config)
        stats.attach_stats(model, stats.collect_stats(model, source, pass_.stats_request(model)))
    else:
        pass_ = GemmSvdPass(config)
    result = pass_(model)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def _x(n, k, seed=1, correlated=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k))
    if correlated:  # inputs near one fixed low-dimensional subspace, as real activations are
        basis = np.random.default_rng(99).standard_normal((6, k))
        x = x[:, :6] @ basis + 0.05 * x
    return x.astype(np.float32)


@pytest.mark.parametrize("kwargs", [{}, {"trans_b": 1}, {"alpha": 0.5, "beta": 2.0}, {"bias": False}, {"matmul": True}])
def test_full_rank_is_exact(kwargs):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 24))
    left, right = factorize(w, min(w.shape))  # full rank of a full-rank matrix: the factors multiply back
    np.testing.assert_allclose(left @ right, w, atol=1e-10)
    low = rng.standard_normal((64, 10)) @ rng.standard_normal((10, 64))  # rank 10: 10·128 < 64·64
    proto = _gemm(low.T if kwargs.get("trans_b") else low, **kwargs)
    result, out = _run_pass(proto, SvdConfig(rank=10, data_aware=False))
    assert result.modified and [n.op_type for n in out.graph.node][0] == "MatMul"
    x = _x(16, 64)
    ref, got = builders.run(proto, {"x": x})["y"], builders.run(out, {"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_truncation_obeys_the_singular_value_bound():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, 32))
    rank = 6
    proto = _gemm(w, bias=False)
    _, out = _run_pass(proto, SvdConfig(rank=rank, data_aware=False))
    sigma = np.linalg.svd(w, compute_uv=False)
    x = _x(200, 48, seed=3)
    err = np.linalg.norm(builders.run(out, {"x": x})["y"] - builders.run(proto, {"x": x})["y"], axis=1)
    assert np.all(err <= sigma[rank] * np.linalg.norm(x, axis=1) * (1 + 1e-4) + 1e-4)


def test_structure_and_savings_condition():
    w = np.random.default_rng(4).standard_normal((64, 32))
    result, out = _run_pass(_gemm(w), SvdConfig(rank=5, data_aware=False))
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["MatMul", "Gemm"] and out.graph.output[0].name == "y"
    inits = {i.name: numpy_helper.to_array(i).shape for i in out.graph.initializer}
    assert sorted(inits.values()) == [(5, 32), (32,), (64, 5)]
    assert "rank 5" in result.changes[0].what
    # a rank that would not save work leaves the layer alone: at most 64·32/(64+32) -> 21 saves
    proto = _gemm(w)
    result, out = _run_pass(proto, SvdConfig(rank=22, data_aware=False))
    assert not result.modified and "at most rank 21" in result.skipped[0].reason
    assert [n.op_type for n in out.graph.node] == ["Gemm"]


def test_never_larger_512_by_1000_at_rank_400():
    w = np.random.default_rng(9).standard_normal((512, 1000))
    proto = _gemm(w, bias=False)
    result, out = _run_pass(proto, SvdConfig(rank=400, data_aware=False))
    assert not result.modified and onnx.load_from_string(proto.SerializeToString()).graph == proto.graph
    assert [n.op_type for n in out.graph.node] == ["Gemm"]


def test_data_aware_beats_plain_svd_on_correlated_inputs():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 48))
    proto = _gemm(w, bias=False)
    x = _x(512, 64, seed=6, correlated=True)
    errors = {}
    for aware in (False, True):
        _, out = _run_pass(proto, SvdConfig(rank=6, data_aware=aware), x=x if aware else None)
        test = _x(256, 64, seed=7, correlated=True)
        ref = builders.run(proto, {"x": test})["y"]
        errors[aware] = np.linalg.norm(builders.run(out, {"x": test})["y"] - ref) / np.linalg.norm(ref)
    assert errors[True] < 0.2 * errors[False]


def test_skips_shared_weights_and_trans_a():
    w = numpy_helper.from_array(np.random.default_rng(8).standard_normal((32, 32)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="b"),
    ]
    proto = builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", 1, ["N", 32])],
        [helper.make_tensor_value_info("y", 1, ["N", 32])],
        [w],
    )
    result, _ = _run_pass(proto, SvdConfig(rank=4, data_aware=False))
    assert not result.modified and all("shared" in s.reason for s in result.skipped)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="t", transA=1)
    proto = builders.make_model(
        [node],
        [helper.make_tensor_value_info("x", 1, [32, 8])],
        [helper.make_tensor_value_info("y", 1, [8, 32])],
        [w],
    )
    result, _ = _run_pass(proto, SvdConfig(rank=4, data_aware=False))
    assert not result.modified and result.skipped[0].reason == "Gemm with transA"


def test_without_rank_or_budget_it_asks_for_one():
    with pytest.raises(ir.passes.PreconditionError, match="--svd-rank"):
        _run_pass(_gemm(np.ones((32, 32))), SvdConfig(data_aware=False))
