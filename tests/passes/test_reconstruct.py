"""Layer-wise least-squares reconstruction after pruning (passes/_reconstruct.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import data
from onnxopt.manager import PassManager
from onnxopt.passes._reconstruct import _Layer, downstream, reconstruct
from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
from onnxopt.validate import Budget
from tests import builders

RNG = np.random.default_rng(0)

# (op, attributes, input spatial size): strides, explicit/auto pads, output_padding, output_shape, 1-D and 2-D
LAYERS = [
    ("Conv", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (9, 9)),
    ("Conv", {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [0, 1, 1, 0], "dilations": [1, 2]}, (9, 8)),
    ("Conv", {"kernel_shape": [5, 5], "auto_pad": "SAME_UPPER", "strides": [2, 2]}, (10, 10)),
    ("ConvTranspose", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (5, 5)),
    ("ConvTranspose", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 0, 0], "output_padding": [1, 1]},
     (5, 4)),
    ("ConvTranspose", {"kernel_shape": [4, 3], "strides": [2, 3], "pads": [0, 2, 3, 0]}, (4, 5)),
    ("ConvTranspose", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, (7, 7)),
    ("ConvTranspose", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}, (6, 7)),
    ("ConvTranspose", {"kernel_shape": [3, 3], "strides": [2, 2], "output_shape": [12, 13]}, (6, 6)),
    ("ConvTranspose", {"kernel_shape": [5], "strides": [3], "pads": [1, 2]}, (7,)),
]  # fmt: skip


def _single(op, attrs, spatial, cin=3, cout=4):
    shape = (cout, cin) if op == "Conv" else (cin, cout)
    w = RNG.standard_normal(shape + tuple(attrs["kernel_shape"])).astype(np.float32)
    b = RNG.standard_normal(cout).astype(np.float32)
    node = helper.make_node(op, ["x", "w", "b"], ["y"], name="layer", **attrs)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, *spatial])
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph([node], "layer", [x_info], [helper.make_empty_tensor_value_info("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=builders.IR_VERSION)
    proto = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return proto, w, b


@pytest.mark.parametrize(("op", "attrs", "spatial"), LAYERS, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(LAYERS)])
def test_rows_times_parameters_reproduce_the_layer(op, attrs, spatial):
    """features · [W b] equals onnxruntime's output at every position: padding and upsampling are right."""
    proto, w, b = _single(op, attrs, spatial)
    x = RNG.standard_normal((2, 3, *spatial)).astype(np.float32)
    y = builders.run(proto, {"x": x})["y"]
    node = next(iter(ir.from_proto(proto).graph))
    layer = _Layer(node, w.shape)
    features, target = layer.rows(x, y, None, per_sample=10**9, rng=np.random.default_rng(0))
    rows = layer.to_rows(w, b)
    predicted = np.concatenate([features, np.ones((len(features), 1))], axis=1) @ rows
    np.testing.assert_allclose(predicted, target, rtol=1e-4, atol=1e-4)
    # and to_params inverts to_rows
    back_w, back_b = layer.to_params(rows, w.dtype, b)
    np.testing.assert_array_equal(back_w, w)
    np.testing.assert_array_equal(back_b, b)


def _autoencoder(cin=1, hidden=(6, 8, 6), seed=1):
    """Conv s2 → Relu → Conv s2 → Relu → ConvT s2 → Relu → ConvT s2 (1 channel), like the thesis's autoencoder."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def param(name, shape, scale):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    c1, c2, c3 = hidden
    x = "x"
    specs = [
        ("Conv", (c1, cin, 3, 3), c1, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("Conv", (c2, c1, 3, 3), c2, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("ConvTranspose", (c2, c3, 3, 3), c3, {"strides": [2, 2], "pads": [1, 1, 0, 0], "output_padding": [0, 0]}),
        ("ConvTranspose", (c3, 1, 3, 3), 1, {"strides": [2, 2], "pads": [1, 1, 0, 0]}),
    ]
    for i, (op, shape, cout, attrs) in enumerate(specs):
        fan_in = int(np.prod(shape[1:])) if op == "Conv" else shape[0] * 9 // 4
        w = param(f"w{i}", shape, 1.0 / np.sqrt(fan_in))
        b = param(f"b{i}", (cout,), 0.1)
        out = f"l{i}"
        nodes.append(helper.make_node(op, [x, w, b], [out], name=out, kernel_shape=[3, 3], **attrs))
        x = out
        if i < 3:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"r{i}"))
            x = f"r{i}"
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 12, 12])
    y_info = helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 1, 23, 23])
    return builders.make_model(nodes, [x_info], [y_info], inits)


def test_downstream_lists_the_linear_layers_after_a_change_in_order():
    model = ir.from_proto(_autoencoder())
    nodes = {node.name: node for node in model.graph}
    assert [n.name for n in downstream(model, [nodes["l0"]])] == ["l1", "l2", "l3"]
    assert [n.name for n in downstream(model, [nodes["l2"]])] == ["l3"]


def test_reconstruct_without_pruning_keeps_the_weights():
    """With nothing removed, the least-squares optimum is the layer itself."""
    proto = _autoencoder()
    model = ir.from_proto(proto)
    x = RNG.random((64, 1, 12, 12)).astype(np.float32)
    source = data.as_source({"x": x}, model, batch_size=16)
    pruned = model.clone()
    done = reconstruct(model, pruned, ["l1", "l2", "l3"], {}, source).done
    assert done == ["l1", "l2", "l3"]
    before = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    for value in pruned.graph.initializers.values():
        np.testing.assert_allclose(value.const_value.numpy(), before[value.name], rtol=1e-3, atol=1e-4)


def test_refit_repairs_pruning_in_front_of_a_conv_transpose():
    """Removing half of the channels that feed ConvTransposes: the re-fit model is closer to the original."""
    proto = _autoencoder(hidden=(8, 8, 8))
    x = RNG.random((256, 1, 12, 12)).astype(np.float32)
    errors = {}
    for refit in (False, True):
        config = PruneConfig(ratio=0.5, align=1, refit=refit, score="mean")
        report = PassManager(
            [ChannelPrunePass(config)], data={"x": x[:192]}, eval_data={"x": x[192:]}, budget=Budget(), simplify=False
        ).run(ir.from_proto(proto))
        nodes = {node.name: node for node in report.model.graph}
        assert nodes["l2"].inputs[1].const_value.numpy().shape[0] == 4  # ConvTranspose lost half its input channels
        errors[refit] = report.validation.outputs[report.model.graph.outputs[0].name].rel_l2
    assert errors[True] < 0.85 * errors[False]


def _depthwise_net(channels=8, seed=2):
    """Conv 3→C → Relu → depthwise Conv (group C, 3×3) → Relu → Conv 1×1 C→4: the PP-OCR classifier's block."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32), "w0"),
        numpy_helper.from_array((rng.standard_normal(channels) * 0.1).astype(np.float32), "b0"),
        numpy_helper.from_array((rng.standard_normal((channels, 1, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(channels) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((4, channels, 1, 1)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="c0", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="r0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="dw", kernel_shape=[3, 3], pads=[1] * 4,
                         group=channels),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="pw", kernel_shape=[1, 1]),
    ]  # fmt: skip
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])
    return builders.make_model(nodes, [x_info], [y_info], inits)


def test_a_depthwise_conv_pruned_to_one_channel_is_declined_not_refitted():
    """Pruned to one channel a depthwise Conv has group 1 and a (1, 1, 3, 3) weight, yet its original is grouped
    (8 outputs from 8 groups; the PP-OCR classifier crashed here reshaping 72 values to (1, 1, 3, 3)): it is
    declined with its reason and keeps its weights (its output is the original's kept channel), the 1×1 Conv
    after it is re-fitted, and on the calibration data the re-fit model is no further from the original."""
    proto = _depthwise_net()
    x = RNG.standard_normal((96, 3, 6, 6)).astype(np.float32)
    calib = x[:64]
    original = builders.run(builders.expose(proto, ["c1"]), {"x": calib})
    errors = {}
    for refit in (False, True):
        config = PruneConfig(ratio=0.9, align=1, refit=refit, score="mean", latency_guard=False)
        report = PassManager(
            [ChannelPrunePass(config)], data={"x": calib}, eval_data={"x": x[64:]}, budget=Budget(), simplify=False
        ).run(ir.from_proto(proto))
        nodes = {node.name: node for node in report.model.graph}
        result = next(p for p in report.passes if p.name == "prune")
        weight = nodes["dw"].inputs[1].const_value.numpy()
        assert weight.shape == (1, 1, 3, 3), result.skipped
        assert nodes["dw"].attributes["group"].value == 1
        pruned = builders.run(builders.expose(ir.to_proto(report.model), ["c1"]), {"x": calib})
        if refit:
            assert [s.site for s in result.skipped if "grouped" in s.reason] == ["dw"], result.skipped
            assert ("1 layer", "re-fitted to the original outputs (least squares)") in [
                (c.site, c.what) for c in result.changes
            ], result.changes
            w1 = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w1"))
            kept = [k for k in range(8) if np.array_equal(weight[0], w1[k])]
            assert len(kept) == 1  # the declined layer's weights are the original's, and so is its output
            np.testing.assert_allclose(pruned["c1"][:, 0], original["c1"][:, kept[0]], rtol=1e-5, atol=1e-5)
        errors[refit] = float(np.linalg.norm(pruned["y"] - original["y"]) / np.linalg.norm(original["y"]))
    assert errors[True] <= errors[False] * (1 + 1e-4), errors


def _refit_chain(monkeypatch, segment_bytes):
    from onnxopt.passes import _reconstruct

    monkeypatch.setattr(_reconstruct, "_SEGMENT_BYTES", segment_bytes)
    from tests.passes.test_prune import _Net

    net = _Net([("x", ["N", 3, 8, 8])], rng=np.random.default_rng(5))
    h = "x"
    for cin, cout in ((3, 16), (16, 16), (16, 16)):
        h = net.node("Relu", [net.conv(h, cin, cout)])
    h = net.node("Flatten", [net.node("GlobalAveragePool", [h])])
    return _prune_refit(net.model(net.gemm(h, 16, 4), ["N", 4]))


def _prune_refit(proto):
    """``proto`` pruned at ratio 0.5 with refit on 40 seeded samples (batches of 8): the pass's result and the
    pruned model's weights."""
    from onnxopt import stats

    feeds = {"x": np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)}
    model = ir.from_proto(proto)
    pass_ = ChannelPrunePass(PruneConfig(ratio=0.5, refit=True, latency_guard=False))
    source = data.as_source(feeds, model, batch_size=8)
    stats.attach_stats(model, stats.collect_stats(model, source, pass_.stats_request(model)))
    pass_.context = type("Context", (), {"data": source, "seed": 0, "check": None})()
    result = pass_(model)
    return result, {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}


def test_refit_run_a_segment_at_a_time_fits_what_whole_model_runs_fit(monkeypatch):
    """The pruned model cut into segments (each node run once per batch) gives the layers the inputs the whole model
    gives them: the same re-fitted weights."""
    from onnxopt.passes import _reconstruct

    whole_runs = []
    original_init = _reconstruct._Unsegmented.__init__
    monkeypatch.setattr(
        _reconstruct._Unsegmented, "__init__", lambda self, *a: whole_runs.append(1) or original_init(self, *a)
    )
    segmented, weights = _refit_chain(monkeypatch, 512 << 20)
    assert not whole_runs  # a chain: the segments ran
    whole, expected = _refit_chain(monkeypatch, 0)  # nothing may be kept between segments: the whole model runs
    assert whole_runs
    assert segmented.changes[-1].site == whole.changes[-1].site and "layers" in segmented.changes[-1].site
    assert weights.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(weights[name], expected[name], rtol=1e-5, atol=1e-6)


def test_refit_runs_the_original_by_segments_when_its_outputs_are_too_big_to_keep(monkeypatch):
    from onnxopt.passes import _reconstruct

    _, expected = _refit_chain(monkeypatch, 512 << 20)
    segment_runs = []
    original_init = _reconstruct._Segments.__init__
    monkeypatch.setattr(
        _reconstruct._Segments, "__init__", lambda self, *a: segment_runs.append(1) or original_init(self, *a)
    )
    monkeypatch.setattr(_reconstruct, "_CACHE_BYTES", 0)  # the original's layer outputs cannot be kept
    _, weights = _refit_chain(monkeypatch, 512 << 20)
    assert len(segment_runs) == 2  # the pruned model and the original, both a segment at a time
    for name in expected:
        np.testing.assert_allclose(weights[name], expected[name], rtol=1e-5, atol=1e-6)


def test_normal_equations_from_float32_rows_match_float64():
    """The products are float32 over centred rows and summed in float64: on activations whose mean (20) is 40
    times their spread, A = Σ [x 1]ᵀ[x 1], B = Σ [x 1]ᵀ t and the ridge solution match a float64 computation
    (uncentred float32 products are off by about 1e-3 in the solution here)."""
    from onnxopt.passes._reconstruct import _Normal

    rng = np.random.default_rng(0)
    x = (np.maximum(rng.standard_normal((6000, 40)), 0) * 0.5 + 20).astype(np.float32)
    t = (x @ rng.standard_normal((40, 5)) + 3).astype(np.float32)
    normal = _Normal()
    for start in range(0, len(x), 1000):
        normal.add(x[start : start + 1000], t[start : start + 1000])
    a, b = normal.normal()
    rows = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
    expected_a, expected_b = rows.T @ rows, rows.T @ t.astype(np.float64)
    np.testing.assert_allclose(a, expected_a, rtol=1e-7)
    np.testing.assert_allclose(b, expected_b, rtol=1e-7, atol=1e-7 * np.abs(expected_b).max())

    def solve(m, n):
        m = m + 1e-3 * np.trace(m) / len(m) * np.eye(len(m))
        return np.linalg.solve(m, n)

    expected = solve(expected_a, expected_b)
    np.testing.assert_allclose(solve(a, b), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def _conv_gemm(hidden=16, seed=5):
    """Conv 3→hidden (3×3) → Relu → GlobalAveragePool → Flatten → Gemm hidden→4, shapes inferred."""
    from tests.passes.test_prune import _Net

    net = _Net([("x", ["N", 3, 8, 8])], rng=np.random.default_rng(seed))
    h = net.node("Relu", [net.conv("x", 3, hidden)])
    h = net.node("Flatten", [net.node("GlobalAveragePool", [h])])
    return onnx.shape_inference.infer_shapes(net.model(net.gemm(h, hidden, 4), ["N", 4]), strict_mode=True)


@pytest.mark.parametrize("samples", [6, 40])
def test_a_layer_with_fewer_rows_than_unknowns_is_declined(samples):
    """The Gemm has 17 unknowns per output (16 inputs and a bias) and gets a row per sample: with 6 samples it is
    declined, with the reason, and keeps its weights; with 40 it is fitted. The Conv before it (28 unknowns, 64
    rows per sample) is fitted either way, and with nothing pruned the refit model still matches the original."""
    proto = _conv_gemm()
    model = ir.from_proto(proto)
    names = [node.name for node in model.graph if node.op_type in ("Conv", "Gemm")]
    x = np.random.default_rng(1).standard_normal((samples, 3, 8, 8)).astype(np.float32)
    pruned = model.clone()
    refit = reconstruct(model, pruned, names, {}, data.as_source({"x": x}, model, batch_size=8))
    gemm = names[-1]
    if samples == 6:
        assert refit.done == names[:1]
        assert refit.declined == {gemm: "not re-fitted: 6 rows for 17 unknowns per output (underdetermined)"}
        weight = next(n for n in pruned.graph if n.name == gemm).inputs[1]
        np.testing.assert_array_equal(
            weight.const_value.numpy(), model.graph.initializers[weight.name].const_value.numpy()
        )
    else:
        assert refit.done == names and not refit.declined
    feeds = {"x": np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    expected = builders.run(proto, feeds)
    got = builders.run(ir.to_proto(pruned), feeds)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-3, atol=1e-3)


def test_the_fit_runs_numpy_blas_on_one_thread(monkeypatch):
    """Two BLAS threads fighting another process for the second core made a refit 5x slower: the fit limits BLAS
    to one thread while it runs (with threadpoolctl installed) and gives the limit back afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from onnxopt.passes import _reconstruct

    seen = []
    add = _reconstruct._Normal.add

    def record(self, x, t):
        seen.extend(info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas")
        add(self, x, t)

    monkeypatch.setattr(_reconstruct._Normal, "add", record)
    model = ir.from_proto(_conv_gemm())
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        reconstruct(model, model.clone(), [n.name for n in model.graph if n.op_type == "Conv"], {},
                    data.as_source({"x": x}, model, batch_size=8))  # fmt: skip
        after = [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    assert seen and set(seen) == {1}
    assert set(after) == {2}


def test_the_original_runs_by_segments_when_both_models_together_keep_at_most_twice_the_limit(monkeypatch):
    """The original keeps more between its segments than the pruned model (it has all its channels): it still runs
    a segment at a time when the two together keep at most twice the limit (instead of a whole run per layer), and
    the weights are those of a run with room to spare."""
    from onnxopt.passes import _reconstruct

    kept = []
    original_init = _reconstruct._Segments.__init__

    def init(self, *args):
        original_init(self, *args)  # raises ValueError when its values exceed its limit: the test fails
        kept.append(self.kept_bytes)

    monkeypatch.setattr(_reconstruct._Segments, "__init__", init)
    monkeypatch.setattr(_reconstruct, "_CACHE_BYTES", 0)
    _, expected = _refit_chain(monkeypatch, 512 << 20)
    pruned_bytes, original_bytes = kept
    assert original_bytes > pruned_bytes
    kept.clear()
    whole = []
    monkeypatch.setattr(_reconstruct._Unsegmented, "__init__", lambda self, *a: whole.append(1))
    _, weights = _refit_chain(monkeypatch, (pruned_bytes + original_bytes) // 2)  # the original alone exceeds it
    assert kept == [pruned_bytes, original_bytes] and not whole
    for name in expected:
        np.testing.assert_allclose(weights[name], expected[name], rtol=1e-5, atol=1e-6)


def _refit_branches(monkeypatch, segment_bytes):
    """A CSP-like block: two branches read ``c1``; the first branch's second Conv comes between them in graph order,
    so its input is computed after the second branch's (the layers' inputs are not in graph order)."""
    from onnxopt.passes import _reconstruct
    from tests.passes.test_prune import _Net

    monkeypatch.setattr(_reconstruct, "_SEGMENT_BYTES", segment_bytes)
    net = _Net([("x", ["N", 3, 8, 8])], rng=np.random.default_rng(7))
    c1 = net.node("Relu", [net.conv("x", 3, 16)])
    a = net.node("Relu", [net.conv(c1, 16, 16)])
    a2 = net.node("Relu", [net.conv(a, 16, 16)])
    b = net.node("Relu", [net.conv(c1, 16, 16)])
    cat = net.node("Concat", [a2, b], axis=1)
    h = net.node("Flatten", [net.node("GlobalAveragePool", [net.node("Relu", [net.conv(cat, 32, 16)])])])
    result, weights = _prune_refit(net.model(net.gemm(h, 16, 4), ["N", 4]))
    return [c1, a, cat, h], result, weights


def test_refit_runs_a_branching_graph_by_segments_with_the_fits_of_whole_model_runs(monkeypatch):
    """Layers fitted upstream first, in the order their inputs are computed: a branching graph runs a segment at a
    time (each node once per batch) and gets the weights whole-model runs give."""
    from onnxopt.passes import _reconstruct

    whole_runs, segment_reads = [], []
    unsegmented_init, segments_init = _reconstruct._Unsegmented.__init__, _reconstruct._Segments.__init__

    def segments(self, model, reads, *args):
        segment_reads.append(list(reads))
        segments_init(self, model, reads, *args)

    monkeypatch.setattr(
        _reconstruct._Unsegmented, "__init__", lambda self, *a: whole_runs.append(1) or unsegmented_init(self, *a)
    )
    monkeypatch.setattr(_reconstruct._Segments, "__init__", segments)
    reads, segmented, weights = _refit_branches(monkeypatch, 512 << 20)
    assert not whole_runs, segment_reads  # before, the inputs' order (c1, a, c1, concat) sent it to whole-model runs
    assert segment_reads[0] == reads  # c1's two readers fitted together, then a's, the Concat's, the Gemm's
    _, whole, expected = _refit_branches(monkeypatch, 0)  # nothing may be kept between segments
    assert whole_runs
    assert segmented.changes[-1].site == whole.changes[-1].site and "layers" in segmented.changes[-1].site
    for name in expected:  # float32 sessions with the weights as constants or as inputs: rounding, amplified by
        np.testing.assert_allclose(weights[name], expected[name], rtol=1e-4, atol=1e-5)  # the least squares
