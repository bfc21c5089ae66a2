"""prune: coupled channels, exactness of dead/constant removal, structure, criteria, search, refit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import data, stats
from onnxopt.manager import PassManager
from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
from onnxopt.validate import Budget
from tests import builders

RNG = np.random.default_rng(0)


class _Net:
    """A tiny graph builder: ``conv``/``gemm`` with chosen dead or constant output channels."""

    def __init__(self, inputs, opset=17, rng=None):
        self.nodes, self.inits, self.inputs, self.opset = [], [], inputs, opset
        self.rng = RNG if rng is None else rng
        self.count = 0

    def _name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def init(self, array, prefix="p"):
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, cin, cout, k=3, dead=(), const=(), bias=True, group=1, pad=1, **attrs):
        w = self.rng.standard_normal((cout, cin // group, k, k)) * 0.3
        b = self.rng.standard_normal(cout) * 0.1
        for c in dead:  # a zero filter with a negative bias: ReLU output is 0 for every input
            w[c], b[c] = 0, -1.0
        for c in const:  # a zero filter with a positive bias: ReLU output is the constant b
            w[c], b[c] = 0, 0.7
        inputs = [x, self.init(w, "w")] + ([self.init(b, "b")] if bias else [])
        return self.node("Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, group=group, **attrs)

    def gemm(self, x, cin, cout, dead=(), const=()):
        w = self.rng.standard_normal((cout, cin)) / np.sqrt(cin)
        b = self.rng.standard_normal(cout) * 0.1
        for c in dead:
            w[c], b[c] = 0, -1.0
        for c in const:
            w[c], b[c] = 0, 0.7
        return self.node("Gemm", [x, self.init(w, "w"), self.init(b, "b")], transB=1)

    def model(self, output, out_shape):
        proto = builders.make_model(
            self.nodes,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in self.inputs],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
            self.inits,
            opset=self.opset,
        )
        proto.graph.output[0].name = output
        return proto


def _feeds(proto, n=24, seed=1):
    name = proto.graph.input[0].name
    dims = [d.dim_value or n for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {name: np.random.default_rng(seed).standard_normal(dims).astype(np.float32)}


def _prune(proto, config, feeds=None):
    """Run the pass on ``proto`` with statistics from ``feeds``; returns (result, pruned proto)."""
    model = ir.from_proto(proto)
    feeds = feeds or _feeds(proto)
    source = data.as_source(feeds, model, batch_size=8)
    pass_ = ChannelPrunePass(config)
    request = pass_.stats_request(model)
    stats.attach_stats(model, stats.collect_stats(model, source, request))
    result = pass_(model)
    from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

    RemoveUnusedNodesPass()(model)
    ShapeInferencePass(strict_mode=False)(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def _assert_exact(reference, candidate, feeds, tol=1e-5):
    ref, got = builders.run(reference, feeds), builders.run(candidate, feeds)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=tol, atol=tol)


def _weights(proto, op):
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return [inits[n.input[1]] for n in proto.graph.node if n.op_type == op]


DEAD = PruneConfig(criterion="dead")


def test_dead_neurons_are_removed_exactly_from_an_mlp():
    net = _Net([("x", ["N", 8])])
    h = net.node("Relu", [net.gemm("x", 8, 16, dead=(2, 5, 11))])
    y = net.gemm(net.node("Relu", [net.gemm(h, 16, 12, dead=(0,))]), 12, 4)
    proto = net.model(y, ["N", 4])
    result, out = _prune(proto, DEAD)
    assert result.modified and [c.what.split(" (")[0] for c in result.changes] == [
        "16 -> 13 channels",
        "12 -> 11 channels",
    ]
    w = _weights(out, "Gemm")
    assert [a.shape for a in w] == [(13, 8), (11, 13), (4, 11)]
    _assert_exact(proto, out, _feeds(proto, seed=7))  # dead by construction: exact on any input


def test_pruned_model_equals_original_with_consumer_inputs_zeroed():
    """The oracle: pruning equals zeroing the removed channels' columns in the next layer (with ReLU 0 inputs)."""
    net = _Net([("x", ["N", 8])])
    h = net.node("Relu", [net.gemm("x", 8, 10, dead=(1, 4))])
    proto = net.model(net.gemm(h, 10, 3), ["N", 3])
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(proto)
    second = zeroed.graph.node[-1].input[1]
    init = next(i for i in zeroed.graph.initializer if i.name == second)
    w = numpy_helper.to_array(init).copy()
    w[:, [1, 4]] = 0
    init.CopyFrom(numpy_helper.from_array(w, second))
    _, out = _prune(proto, DEAD)
    _assert_exact(zeroed, out, _feeds(proto, seed=3), tol=1e-6)


def test_constant_channels_fold_into_the_next_bias():
    net = _Net([("x", ["N", 8])])
    h = net.node("Sigmoid", [net.gemm("x", 8, 10, const=(3, 7))])  # sigmoid(0.7): constant, not zero
    proto = net.model(net.gemm(h, 10, 3), ["N", 3])
    result, out = _prune(proto, PruneConfig(criterion="constant", threshold=1e-6))
    assert [a.shape for a in _weights(out, "Gemm")] == [(8, 8), (3, 8)]
    _assert_exact(proto, out, _feeds(proto, seed=5))


def test_conv_batchnorm_chain_and_flatten_into_gemm():
    net = _Net([("x", ["N", 3, 6, 6])])
    c = net.conv("x", 3, 8, dead=(0, 6))
    bn = net.node(
        "BatchNormalization", [c] + [net.init(v) for v in (np.ones(8) * 1.5, np.zeros(8), np.zeros(8), np.ones(8))]
    )
    r = net.node("Relu", [bn])
    r2 = net.node("Relu", [net.conv(r, 8, 5, dead=(2,), pad=0)])
    flat = net.node("Flatten", [r2])
    proto = net.model(net.gemm(flat, 5 * 16, 4), ["N", 4])
    result, out = _prune(proto, DEAD)
    conv_w = _weights(out, "Conv")
    assert [w.shape for w in conv_w] == [(6, 3, 3, 3), (4, 6, 3, 3)]
    assert _weights(out, "Gemm")[0].shape == (4, 4 * 16)  # channel 2 owned 16 flat columns
    bn_node = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    assert all(numpy_helper.to_array(i).shape == (6,) for i in out.graph.initializer if i.name in bn_node.input[1:])
    _assert_exact(proto, out, _feeds(proto, seed=2))


def test_residual_add_removes_the_same_channels_on_both_sides():
    net = _Net([("x", ["N", 3, 6, 6])])
    a = net.node("Relu", [net.conv("x", 3, 6)])
    branch = net.conv(a, 6, 8, dead=(1, 5))
    shortcut = net.conv("x", 3, 8, dead=(1, 5))
    s = net.node("Relu", [net.node("Add", [branch, shortcut])])
    proto = net.model(net.conv(s, 8, 2), ["N", 2, 6, 6])
    result, out = _prune(proto, DEAD)
    shapes = [w.shape for w in _weights(out, "Conv")]
    assert shapes == [(6, 3, 3, 3), (6, 6, 3, 3), (6, 3, 3, 3), (2, 6, 3, 3)]
    _assert_exact(proto, out, _feeds(proto, seed=4))


def test_residual_channel_dead_on_one_side_only_is_kept():
    net = _Net([("x", ["N", 3, 6, 6])])
    branch = net.conv("x", 3, 4, dead=(1,))
    shortcut = net.conv("x", 3, 4)
    s = net.node("Relu", [net.node("Add", [branch, shortcut])])
    proto = net.model(net.conv(s, 4, 2), ["N", 2, 6, 6])
    result, _ = _prune(proto, DEAD)
    assert not result.modified


def test_concat_offsets():
    net = _Net([("x", ["N", 3, 6, 6])])
    left = net.node("Relu", [net.conv("x", 3, 4, dead=(3,))])
    right = net.node("Relu", [net.conv("x", 3, 5, dead=(0, 2))])
    cat = net.node("Concat", [left, right], axis=1)
    proto = net.model(net.conv(cat, 9, 2), ["N", 2, 6, 6])
    result, out = _prune(proto, DEAD)
    assert [w.shape for w in _weights(out, "Conv")] == [(3, 3, 3, 3), (3, 3, 3, 3), (2, 6, 3, 3)]
    _assert_exact(proto, out, _feeds(proto, seed=6))


def test_depthwise_conv_couples_its_input_and_output():
    net = _Net([("x", ["N", 3, 6, 6])])
    a = net.node("Relu", [net.conv("x", 3, 6, dead=(2, 4))])
    dw = net.node("Relu", [net.conv(a, 6, 6, group=6, bias=False)])
    proto = net.model(net.conv(dw, 6, 2, k=1, pad=0), ["N", 2, 6, 6])
    result, out = _prune(proto, DEAD)
    dw_node = next(
        n for n in out.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    )
    assert next(a.i for a in dw_node.attribute if a.name == "group") == 4
    assert [w.shape for w in _weights(out, "Conv")] == [(4, 3, 3, 3), (4, 1, 3, 3), (2, 4, 1, 1)]
    _assert_exact(proto, out, _feeds(proto, seed=8))


def test_nhwc_transpose_flatten_matmul_as_tf2onnx_writes_it():
    net = _Net([("x", ["N", 3, 4, 4])])
    r = net.node("Relu", [net.conv("x", 3, 5, dead=(1, 3))])
    t = net.node("Transpose", [r], perm=[0, 2, 3, 1])
    flat = net.node("Flatten", [t])
    w = net.init(RNG.standard_normal((80, 3)))
    proto = net.model(net.node("MatMul", [flat, w]), ["N", 3])
    result, out = _prune(proto, DEAD)
    assert _weights(out, "MatMul")[0].shape == (48, 3)
    _assert_exact(proto, out, _feeds(proto, seed=9))


def test_channel_padding_shortcut_like_cifar_resnets():
    """Option-A shortcut: x[:, :, ::2, ::2] padded with zero channels, added to the conv branch."""
    net = _Net([("x", ["N", 4, 8, 8])])
    x = net.node("Relu", [net.conv("x", 4, 4)])
    branch = net.conv(x, 4, 8, dead=(0, 7), strides=[2, 2])
    starts, ends, axes, steps = (net.init(np.array(v), "i") for v in ([0, 0], [8, 8], [2, 3], [2, 2]))
    for name in (starts, ends, axes, steps):
        init = next(i for i in net.inits if i.name == name)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.int64), name))
    sliced = net.node("Slice", [x, starts, ends, axes, steps])
    pads = net.init(np.array([0, 2, 0, 0, 0, 2, 0, 0]), "pads")
    pads_init = next(i for i in net.inits if i.name == pads)
    pads_init.CopyFrom(numpy_helper.from_array(np.array([0, 2, 0, 0, 0, 2, 0, 0], np.int64), pads))
    padded = net.node("Pad", [sliced, pads])
    s = net.node("Relu", [net.node("Add", [branch, padded])])
    proto = net.model(net.conv(s, 8, 2), ["N", 2, 4, 4])
    result, out = _prune(proto, DEAD)
    pad_node = next(n for n in out.graph.node if n.op_type == "Pad")
    new_pads = next(numpy_helper.to_array(i) for i in out.graph.initializer if i.name == pad_node.input[1])
    assert new_pads.tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    _assert_exact(proto, out, _feeds(proto, seed=10))


def test_blocked_groups_are_reported_and_left_alone():
    net = _Net([("x", ["N", 8])])
    h = net.gemm("x", 8, 6, dead=(1,))
    proto = net.model(net.node("Relu", [h]), ["N", 6])  # the layer feeds the graph output
    result, out = _prune(proto, DEAD)
    assert not result.modified and any("graph output" in s.reason for s in result.skipped)

    net = _Net([("x", ["N", 8])])
    h = net.node("Relu", [net.gemm("x", 8, 6, dead=(1,))])
    proto = net.model(net.node("Softmax", [h], axis=1), ["N", 6])
    result, _ = _prune(proto, DEAD)
    assert not result.modified and any("normalizes over channels" in s.reason for s in result.skipped)


def test_shared_weight_blocks_its_layers():
    net = _Net([("x", ["N", 8])])
    a = net.gemm("x", 8, 8, dead=(2,))
    shared = net.nodes[-1].input[1]
    b = net.node("Gemm", [net.node("Relu", [a]), shared], transB=1)
    proto = net.model(net.gemm(net.node("Relu", [b]), 8, 2), ["N", 2])
    result, _ = _prune(proto, DEAD)
    assert not any("-> 7" in c.what for c in result.changes if c.site == net.nodes[0].name)
    assert any("shared" in s.reason for s in result.skipped)


def test_every_channel_dead_keeps_min_channels():
    net = _Net([("x", ["N", 8])])
    h = net.node("Relu", [net.gemm("x", 8, 5, dead=range(5))])
    proto = net.model(net.gemm(h, 5, 2), ["N", 2])
    _, out = _prune(proto, DEAD)
    assert _weights(out, "Gemm")[0].shape == (1, 8)
    _, out = _prune(proto, PruneConfig(criterion="dead", min_channels=3))
    assert _weights(out, "Gemm")[0].shape == (3, 8)


def test_ratio_and_alignment():
    proto = builders.mlp(sizes=(8, 32, 4), seed=3)
    _, out = _prune(proto, PruneConfig(criterion="ratio", ratio=0.25, align=1))
    assert _weights(out, "Gemm")[0].shape == (24, 8)
    _, out = _prune(proto, PruneConfig(criterion="ratio", ratio=0.3, align=8))
    assert _weights(out, "Gemm")[0].shape[0] == 24  # 22 rounded up to a multiple of 8: fewer removed, not more
    # the default, 16: 32 channels keep a multiple of 16 (0.25 would leave 24: nothing goes); 0.5 leaves 16
    _, out = _prune(proto, PruneConfig(criterion="ratio", ratio=0.25))
    assert _weights(out, "Gemm")[0].shape == (32, 8)
    _, out = _prune(proto, PruneConfig(criterion="ratio", ratio=0.5))
    assert _weights(out, "Gemm")[0].shape == (16, 8)


@pytest.mark.parametrize(("hidden", "ratio", "kept"), [(24, 0.3, 24), (24, 0.4, 16), (12, 0.2, 12), (12, 0.4, 8),
                                                       (6, 0.4, 4)])  # fmt: skip
def test_small_groups_align_to_8_or_4(hidden, ratio, kept):
    # fewer than 2x16 channels: a multiple of 8; fewer than 16: of 4; fewer than 8: any count
    proto = builders.mlp(sizes=(8, hidden, 4), seed=3)
    _, out = _prune(proto, PruneConfig(criterion="ratio", ratio=ratio))
    assert _weights(out, "Gemm")[0].shape == (kept, 8)


def test_apoz_threshold_matches_statistics():
    proto = builders.mlp(sizes=(8, 32, 4), seed=4, bias_shift=-0.8)
    model = ir.from_proto(proto)
    feeds = _feeds(proto, n=64)
    h1 = builders.run(builders.expose(proto, ["h1"]), feeds)["h1"]
    apoz = (h1 == 0).mean(axis=0)
    _, out = _prune(proto, PruneConfig(criterion="apoz", threshold=0.7), feeds)
    assert _weights(out, "Gemm")[0].shape[0] == 32 - int((apoz >= 0.7).sum())
    assert model is not None


def test_search_finds_the_strongest_ratio_within_the_budget(tmp_path):
    proto = builders.mlp(sizes=(8, 64, 4), seed=5)
    path = builders.save(proto, tmp_path / "m.onnx")
    feeds = _feeds(proto, n=64)
    search = ChannelPrunePass(PruneConfig(align=1))
    report = PassManager([search], data=feeds, budget=Budget(min_cosine=0.99), simplify=False).run(path)
    assert report.ok and report.passes[0].modified
    kept = report.after.params / report.before.params
    assert kept < 0.95
    # one notch stronger than the found ratio misses the budget (the search is not timid)
    found = float(report.passes[0].changes[0].what.split("ratio ")[1].rstrip(")"))
    stronger = PassManager(
        [ChannelPrunePass(PruneConfig(ratio=min(found + 0.1, 0.9), align=1))],
        data=feeds,
        budget=Budget(min_cosine=0.99),
        simplify=False,
    ).run(path)  # fmt: skip
    assert not stronger.ok


def test_refit_lowers_the_output_error_at_the_same_ratio():
    """On the trained MNIST MLP in models/: least-squares re-fit of the next layer vs plain removal."""
    root = Path(__file__).resolve().parents[2] / "models" / "tiny_mlp"
    errors, accuracy = {}, {}
    for refit in (False, True):
        config = PruneConfig(ratio=0.5, refit=refit)
        report = PassManager(
            [ChannelPrunePass(config)], data=root / "calib.npz", eval_data=root / "eval.npz", budget=Budget(),
            simplify=False,
        ).run(root / "tiny_mlp.onnx")  # fmt: skip
        errors[refit] = report.validation.outputs["logits"].rel_l2
        accuracy[refit] = report.validation.accuracy["after"]
    assert errors[True] < 0.7 * errors[False]
    assert accuracy[True] > accuracy[False]


def test_ratio_without_a_budget_or_ratio_is_a_clear_error():
    proto = builders.mlp()
    with pytest.raises(ir.passes.PreconditionError, match="--prune-ratio"):
        _prune(proto, PruneConfig(criterion="ratio"))


def test_bad_config_values():
    with pytest.raises(ValueError, match="criterion"):
        PruneConfig(criterion="random")
    with pytest.raises(ValueError, match="score"):
        PruneConfig(score="magic")


def _dead_on_calibration_only(tmp_path):
    """builders.mlp with hidden neuron 3 = Relu(3·x0) and a heavy weight into y: dead on calibration data whose x0
    is never positive, alive (and important) on evaluation data. Returns the model path, calibration and eval."""
    proto = builders.mlp(sizes=(8, 16, 4), seed=3)
    inits = {i.name: i for i in proto.graph.initializer}
    w1, b1, w2 = (numpy_helper.to_array(inits[n]).copy() for n in ("w1", "b1", "w2"))
    w1[3], b1[3], w2[:, 3] = 0.0, 0.0, 2.0
    w1[3, 0] = 3.0
    for name, array in (("w1", w1), ("b1", b1), ("w2", w2)):
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
    rng = np.random.default_rng(11)
    calib = rng.standard_normal((64, 8)).astype(np.float32)
    calib[:, 0] = -np.abs(calib[:, 0])  # neuron 3 never fires here
    evaluation = rng.standard_normal((64, 8)).astype(np.float32)
    return builders.save(proto, tmp_path / "m.onnx"), {"x": calib}, {"x": evaluation}


def test_search_backs_off_when_even_dead_channels_break_the_budget(tmp_path):
    path, calib, evaluation = _dead_on_calibration_only(tmp_path)
    proto = onnx.load(path)
    h1 = builders.run(builders.expose(proto, ["h1"]), calib)["h1"]
    assert (h1[:, 3] == 0).all() and (h1 != 0).any(axis=0).sum() == 15  # only neuron 3 is dead on calibration
    report = PassManager(
        [ChannelPrunePass(PruneConfig(align=1))], data=calib, eval_data=evaluation, budget=Budget(min_cosine=0.999),
        simplify=False,
    ).run(path)  # fmt: skip
    record = report.passes[0]
    assert not record.modified and record.changes == [] and record.reverted is None  # prune itself backed off
    reason = record.skipped[0].reason
    assert record.skipped[0].site == "model"
    assert reason.startswith("backed off: its weakest setting (ratio 0: dead channels only) misses the budget: ")
    assert "cosine" in reason
    assert report.ok and report.validation.outputs["y"].max_abs == 0  # the input, unchanged
    # judged on data where the neuron is dead too, the same weakest setting holds and is kept (exactly)
    held = PassManager(
        [ChannelPrunePass(PruneConfig(align=1, max_ratio=0.0, latency_guard=False))], data=calib, eval_data=calib,
        budget=Budget(min_cosine=0.999), simplify=False,
    ).run(path)  # fmt: skip
    assert held.ok and held.passes[0].modified and held.validation.outputs["y"].max_abs < 1e-5
    assert [c.what.split(" (")[0] for c in held.passes[0].changes] == ["16 -> 15 channels"]


def _stub_timing(monkeypatch, input_us, pruned_us, spread=0.02, one=None):
    """latency.compare answers (input_us, pruned_us) at the data's batch and ``one`` (default the same) on one
    sample; returns the calls (paths, feed shapes, keyword arguments)."""
    from onnxopt import latency

    calls = []

    def compare(paths, feeds, **kwargs):
        calls.append((paths, {k: v.shape for k, v in feeds.items()}, kwargs))
        single = all(v.shape[0] == 1 for v in feeds.values())
        pair = one if single and one is not None else (input_us, pruned_us)
        return [(us, us * (1 - spread), us * (1 + spread)) for us in pair], False

    monkeypatch.setattr(latency, "compare", compare)
    return calls


@pytest.mark.prune_latency_guard
@pytest.mark.parametrize("pruned_us", [130.0, 103.0, 70.0])
def test_latency_guard_keeps_the_input_only_when_the_pruned_model_is_clearly_slower(pruned_us, tmp_path, monkeypatch):
    proto = builders.mlp(sizes=(8, 64, 4), seed=5)
    path = builders.save(proto, tmp_path / "m.onnx")
    calls = _stub_timing(monkeypatch, 100.0, pruned_us)
    feeds = _feeds(proto, n=48)
    report = PassManager(
        [ChannelPrunePass(PruneConfig(ratio=0.25, align=1))], data=feeds, budget=Budget(min_cosine=0.9),
        simplify=False, batch_size=16,
    ).run(path)  # fmt: skip
    record = report.passes[0]
    assert [c[1] for c in calls] == [{"x": (16, 8)}, {"x": (1, 8)}]  # the data's batch, then one sample
    assert all(c[2]["purpose"] == "prune latency guard" for c in calls)
    assert not any(Path(p).exists() for p in calls[0][0])  # timed from a temporary folder, removed since
    assert record.details["prune_latency"]["input_us"] == 100.0
    assert record.details["prune_latency"]["pruned_us"] == pruned_us
    if pruned_us == 130.0:  # 30% slower, every round: the input stands
        assert not record.modified and record.changes == []
        assert record.skipped[0].reason.startswith("reverted: the pruned model is slower than its input: median 130 us")
        assert report.validation.outputs["y"].max_abs == 0
    else:  # within the margin (3%) or faster: the smaller model stands
        assert record.modified and record.changes[0].what.startswith("64 -> 48 channels")
        assert report.after.params < report.before.params


@pytest.mark.prune_latency_guard
def test_latency_guard_keeps_the_input_when_the_pruned_model_is_slower_on_one_sample(tmp_path, monkeypatch):
    proto = builders.mlp(sizes=(8, 64, 4), seed=5)
    path = builders.save(proto, tmp_path / "m.onnx")
    _stub_timing(monkeypatch, 100.0, 70.0, one=(10.0, 13.0))  # faster at batch 16, 30% slower on one sample
    report = PassManager(
        [ChannelPrunePass(PruneConfig(ratio=0.25, align=1))], data=_feeds(proto, n=48), budget=Budget(min_cosine=0.9),
        simplify=False, batch_size=16,
    ).run(path)  # fmt: skip
    record = report.passes[0]
    assert not record.modified and record.details["prune_latency"]["one_sample"]["ratio"] == pytest.approx(1.3)
    assert record.skipped[0].reason.startswith(
        "reverted: the pruned model is slower than its input on one sample: median 13 us against 10 us (1.30x"
    )


@pytest.mark.prune_latency_guard
def test_latency_guard_can_be_turned_off_and_needs_a_run_context(tmp_path, monkeypatch):
    calls = _stub_timing(monkeypatch, 100.0, 500.0)
    proto = builders.mlp(sizes=(8, 64, 4), seed=5)
    path = builders.save(proto, tmp_path / "m.onnx")
    report = PassManager(
        [ChannelPrunePass(PruneConfig(ratio=0.25, align=1, latency_guard=False))], data=_feeds(proto, n=48),
        budget=Budget(min_cosine=0.9), simplify=False,
    ).run(path)  # fmt: skip
    assert report.passes[0].modified and "prune_latency" not in report.passes[0].details
    result, _ = _prune(proto, PruneConfig(ratio=0.25, align=1))  # called on its own: nothing to time it on
    assert result.modified and calls == []
    with pytest.raises(ValueError, match="latency_margin"):
        PruneConfig(latency_margin=1.5)


@pytest.mark.shared
def test_ocr_direction_classifier_prune_backs_off_instead_of_failing_the_run(shared_dir, tmp_path, capsys):
    """The PP-OCR classifier calibrated on its one reference image: 83 channels never fire on it, yet matter on 12
    photographs; before, prune removed them unchecked at ratio 0 and the run failed (cosine 0.59, exit 1)."""
    pytest.importorskip("PIL")
    import json

    from onnxopt import cli

    model = shared_dir / "models" / "ocr" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli.main([
        "run", str(model), "--passes", "prune", "--data", str(model).replace(".onnx", ".ref.npz"),
        "--eval", str(shared_dir / "data" / "images"),
        "--preprocess", "none,size=48x192,mean=0.5/0.5/0.5,std=0.5/0.5/0.5",
        "--allow-small-eval", "-q", "-o", str(out), "--report", str(report_path),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and out.exists(), captured.out + captured.err
    report = json.loads(report_path.read_text())
    prune = next(p for p in report["passes"] if p["name"] == "prune")
    assert prune["modified"] is False and "reverted" not in prune
    assert prune["skipped"][0]["reason"].startswith("backed off: its weakest setting (ratio 0: dead channels only)")
    assert report["validation"]["ok"] and report["validation"]["samples"] == 12
    assert all(o["cosine"] >= 0.999 for o in report["validation"]["outputs"].values())
