"""split: exact on really separable kernels, per-axis strides/pads/dilations, never larger, skips."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.passes.split import ConvSplitPass, SplitConfig, split_depthwise, split_spatial
from tests import builders

RNG = np.random.default_rng(0)


def _conv(weight, *, bias=True, hw=(12, 10), **attrs):
    l_out, k_in, kh, kw = weight.shape
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(l_out).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", kernel_shape=[kh, kw], **attrs)
    proto = builders.make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k_in, *hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, l_out, None, None])],
        inits,
    )
    return onnx.shape_inference.infer_shapes(proto)


def _split(proto, **config):
    model = ir.from_proto(proto)
    result = ConvSplitPass(SplitConfig(**config))(model)
    out = ir.to_proto(model)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def _same(reference, candidate, tol=1e-5):
    x = RNG.standard_normal([d.dim_value for d in reference.graph.input[0].type.tensor_type.shape.dim])
    feeds = {"x": x.astype(np.float32)}
    np.testing.assert_allclose(
        builders.run(candidate, feeds)["y"], builders.run(reference, feeds)["y"], rtol=tol, atol=tol
    )


def _separable(l_out, k_in, kh, kw, rank):
    """A kernel whose (K·kh)×(L·kw) matrix has exactly ``rank``: sum of vertical ⊗ horizontal products."""
    w = np.zeros((l_out, k_in, kh, kw))
    for _ in range(rank):
        vertical = RNG.standard_normal((k_in, kh))
        horizontal = RNG.standard_normal((l_out, kw))
        w += np.einsum("ki,lj->lkij", vertical, horizontal)
    return w


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"pads": [0, 2, 1, 0], "strides": [2, 1]},
        {"pads": [1, 1, 1, 1], "strides": [1, 2], "dilations": [2, 1]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "VALID"},
    ],
)
def test_spatial_split_of_a_separable_kernel_is_exact(attrs):
    weight = _separable(16, 8, 3, 3, rank=2)
    proto = _conv(weight, **attrs)
    result, out = _split(proto, rank=2)
    assert result.modified
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    kernels = [next(a.ints for a in n.attribute if a.name == "kernel_shape") for n in convs]
    assert kernels == [[3, 1], [1, 3]]
    _same(proto, out)


def test_depthwise_split_of_an_exact_product_is_exact():
    k_in, l_out, mult = 6, 20, 2
    depth = RNG.standard_normal((k_in * mult, 1, 3, 3))
    point = RNG.standard_normal((l_out, k_in * mult))
    weight = np.einsum("lc,cij->lcij", point, depth[:, 0]).reshape(l_out, k_in, mult, 3, 3).sum(axis=2)
    proto = _conv(weight, pads=[1, 1, 1, 1], strides=[2, 2])
    result, out = _split(proto, mode="depthwise", rank=mult)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs] == [k_in, 1]
    _same(proto, out)


def test_full_rank_factors_reproduce_any_kernel():
    weight = RNG.standard_normal((5, 4, 3, 3))
    w1, w2, s = split_spatial(weight, min(4 * 3, 5 * 3))
    rebuilt = np.einsum("pki,lpj->lkij", w1[..., 0], w2[:, :, 0, :])
    np.testing.assert_allclose(rebuilt, weight, atol=1e-10)
    depth, point, _ = split_depthwise(weight, 9)
    rebuilt = np.einsum("lc,cij->lcij", point[:, :, 0, 0], depth[:, 0]).reshape(5, 4, 9, 3, 3).sum(axis=2)
    np.testing.assert_allclose(rebuilt, weight, atol=1e-10)


def test_a_layer_that_cannot_save_work_is_left_alone():
    proto = _conv(RNG.standard_normal((2, 1, 3, 3)))  # K=1, L=2: P < 3·1·2/3 = 2 -> only P = 1 could save
    result, out = _split(proto, rank=3)
    assert not result.modified and "at most rank 1" in result.skipped[0].reason
    proto = _conv(RNG.standard_normal((1, 1, 2, 2)))  # P < 2·1·1/2 = 1: no rank saves
    result, _ = _split(proto, rank=1)
    assert not result.modified and "cannot save work" in result.skipped[0].reason


def test_skips_grouped_convs_and_conv_transpose():
    proto = _conv(RNG.standard_normal((8, 2, 3, 3)), group=4, pads=[1] * 4)
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 8
    result, _ = _split(onnx.shape_inference.infer_shapes(proto), rank=1)
    assert not result.modified and "grouped" in result.skipped[0].reason


def test_energy_picks_the_exact_rank_of_a_separable_kernel():
    proto = _conv(_separable(16, 8, 3, 3, rank=3), pads=[1, 1, 1, 1])
    result, out = _split(proto, energy=0.999999)
    assert "rank 3" in result.changes[0].what
    _same(proto, out)


def test_search_starts_at_the_numerical_rank_of_a_low_rank_kernel():
    """A rank-3 kernel (max useful rank 24): the budget search tries no rank above 3 and keeps rank 3, exact."""
    proto = _conv(_separable(16, 8, 3, 3, rank=3), pads=[1, 1, 1, 1])
    x = RNG.standard_normal((2, 8, 12, 10)).astype(np.float32)
    want = builders.run(proto, {"x": x})["y"]
    tried = []

    class Context:  # the PassManager's check: here max abs error on one batch within 1e-4
        def check(self, candidate):
            got = builders.run(ir.to_proto(candidate), {"x": x})["y"]
            ranks = [n.inputs[1].const_value.shape[0] for n in candidate.graph if n.op_type == "Conv"]
            tried.append(ranks[0] if len(ranks) == 2 else None)
            return type("Verdict", (), {"ok": float(np.abs(got - want).max()) < 1e-4})()

    model = ir.from_proto(proto)
    split = ConvSplitPass(SplitConfig())
    split.context = Context()
    result = split(model)
    assert "rank 3" in result.changes[0].what
    assert tried and max(tried) == 3 and len(tried) <= 3
    _same(proto, ir.to_proto(model))


@pytest.mark.prune_latency_guard
@pytest.mark.parametrize("split_us", [130.0, 70.0])
def test_a_split_model_clearly_slower_than_its_input_is_reverted(split_us, tmp_path, monkeypatch):
    from onnxopt import latency
    from onnxopt.manager import PassManager
    from onnxopt.validate import Budget

    calls = []

    def compare(paths, feeds, **kwargs):  # the input at 100 us, the split model at split_us, every round +-2%
        calls.append(({k: v.shape for k, v in feeds.items()}, kwargs["purpose"]))
        return [(us, us * 0.98, us * 1.02) for us in (100.0, split_us)], False

    monkeypatch.setattr(latency, "compare", compare)
    proto = _conv(_separable(16, 8, 3, 3, rank=3), pads=[1, 1, 1, 1])
    path = builders.save(proto, tmp_path / "conv.onnx")
    x = RNG.standard_normal((6, 8, 12, 10)).astype(np.float32)
    report = PassManager(
        [ConvSplitPass(SplitConfig(energy=0.999999))], data={"x": x[:2]}, budget=Budget(min_cosine=0.999),
        simplify=False,
    ).run(path)  # fmt: skip
    record = report.passes[0]
    assert calls == [({"x": (2, 8, 12, 10)}, "split latency guard")]  # batch 2 is the model's: no one-sample timing
    assert record.details["split_latency"]["split_us"] == split_us
    if split_us > 100:
        assert not record.modified and record.skipped[0].reason.startswith(
            "reverted: the split model is slower than its input: median 130 us against 100 us (1.30x"
        )
        assert [n.op_type for n in ir.to_proto(report.model).graph.node] == ["Conv"]
    else:
        assert record.modified and "rank 3" in record.changes[0].what
        assert [n.op_type for n in ir.to_proto(report.model).graph.node] == ["Conv", "Conv"]


def test_split_latency_margin_is_checked():
    with pytest.raises(ValueError, match="latency_margin"):
        SplitConfig(latency_margin=1.0)
