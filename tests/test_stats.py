"""Statistics collector against numpy on the same activations."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import data, stats
from onnxopt.errors import CalibrationError
from tests import builders


def _source(model, x, batch_size=7):
    return data.as_source({"x": x}, model, batch_size=batch_size)


def test_channel_stats_match_numpy_on_exposed_activations():
    proto = builders.mlp(sizes=(8, 16, 4), bias_shift=-0.3, seed=1)
    model = ir.from_proto(proto)
    x = np.random.default_rng(2).standard_normal((50, 8)).astype(np.float32)
    h1 = builders.run(builders.expose(proto, ["h1"]), {"x": x})["h1"]
    table = stats.collect_stats(model, _source(model, x), stats.StatsRequest(values=frozenset({"h1"})))
    s = table.channels["h1"]
    assert table.samples == 50 and s.samples == 50 and s.count == 50
    np.testing.assert_allclose(s.apoz, (h1 == 0).mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.pos_frac, (h1 > 0).mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.mean, h1.mean(axis=0, dtype=np.float64), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.abs_mean, np.abs(h1).mean(axis=0, dtype=np.float64), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.sq_mean, np.square(h1, dtype=np.float64).mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(s.min, h1.min(axis=0))
    np.testing.assert_array_equal(s.max, h1.max(axis=0))
    assert 0 < s.apoz.mean() < 1  # the bias shift makes some, not all, activations zero


def test_conv_channel_stats_reduce_over_batch_and_space():
    proto = builders.conv_net(seed=3)
    model = ir.from_proto(proto)
    x = np.random.default_rng(4).standard_normal((9, 3, 10, 10)).astype(np.float32)
    r1 = builders.run(builders.expose(proto, ["r1"]), {"x": x})["r1"]
    table = stats.collect_stats(model, _source(model, x, 4), stats.StatsRequest(values=frozenset({"r1"})))
    s = table.channels["r1"]
    assert s.count == 9 * 10 * 10 and s.channels == 8
    np.testing.assert_allclose(s.apoz, (r1 == 0).mean(axis=(0, 2, 3)), atol=1e-12)
    np.testing.assert_allclose(s.mean, r1.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6, atol=1e-7)


def test_gemm_gram_is_xtx_of_its_input():
    proto = builders.mlp(sizes=(8, 16, 4), seed=5)
    model = ir.from_proto(proto)
    x = np.random.default_rng(6).standard_normal((30, 8)).astype(np.float32)
    h1 = builders.run(builders.expose(proto, ["h1"]), {"x": x})["h1"].astype(np.float64)
    table = stats.collect_stats(model, _source(model, x), stats.StatsRequest(grams=frozenset({"fc1", "fc2"})))
    np.testing.assert_allclose(table.grams["fc1"].xtx, x.astype(np.float64).T @ x, rtol=1e-6)
    np.testing.assert_allclose(table.grams["fc2"].xtx, h1.T @ h1, rtol=1e-6, atol=1e-9)
    assert table.grams["fc2"].rows == 30


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"strides": [2, 2]},
        {"pads": [0, 1, 2, 0], "strides": [2, 1], "dilations": [1, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ],
)
def test_unfolded_conv_rows_reproduce_the_convolution(attrs):
    """rows @ W.reshape(M, -1).T equals onnxruntime's Conv output: the im2col layout is right."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], **attrs)
    proto = builders.make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, None, None])],
        [numpy_helper.from_array(w, "w")],
    )
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    y = builders.run(proto, {"x": x})["y"]
    rows = np.concatenate(list(stats.unfold_conv_input(x, (3, 3), attrs)))
    got = rows @ w.reshape(4, -1).T  # (N*Ho*Wo, M)
    expected = y.transpose(0, 2, 3, 1).reshape(-1, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_gram_matches_explicit_im2col():
    proto = builders.conv_net(seed=8, with_bn=False)
    model = ir.from_proto(proto)
    x = np.random.default_rng(9).standard_normal((5, 3, 10, 10)).astype(np.float32)
    table = stats.collect_stats(model, _source(model, x, 2), stats.StatsRequest(grams=frozenset({"conv1"})))
    rows = np.concatenate(list(stats.unfold_conv_input(x.astype(np.float64), (3, 3), {"pads": [1, 1, 1, 1]})))
    gram = table.grams["conv1"]
    assert gram.rows == 5 * 10 * 10 and gram.xtx.shape == (27, 27)
    np.testing.assert_allclose(gram.xtx, rows.T @ rows, rtol=1e-9)


def test_reducer_state_does_not_grow_with_samples():
    reducer = stats.ChannelReducer("v")
    gram = stats.GramReducer(ir.from_proto(builders.mlp()).graph.node(0))
    rng = np.random.default_rng(0)
    reducer.update(rng.standard_normal((4, 16)))
    gram.update(rng.standard_normal((4, 8)))
    sizes = (sum(a.nbytes for a in reducer._state.values()), gram._xtx.nbytes)
    for _ in range(50):
        reducer.update(rng.standard_normal((64, 16)))
        gram.update(rng.standard_normal((64, 8)))
    assert (sum(a.nbytes for a in reducer._state.values()), gram._xtx.nbytes) == sizes
    assert reducer.count == 4 + 50 * 64


def test_stats_errors_are_typed():
    model = ir.from_proto(builders.mlp())
    source = data.as_source({"x": np.zeros((4, 8), np.float32)}, model)
    with pytest.raises(CalibrationError, match="'nope' is not in the graph"):
        stats.collect_stats(model, source, stats.StatsRequest(values=frozenset({"nope"})))
    empty = data.DataSource(lambda: iter(()), "empty")
    with pytest.raises(CalibrationError, match="no calibration batch"):
        stats.collect_stats(model, empty, stats.StatsRequest(values=frozenset({"h1"})))


def test_attach_and_invalidate():
    model = ir.from_proto(builders.mlp())
    table = stats.StatsTable(samples=1, source="t")
    assert stats.get_stats(model) is None
    stats.attach_stats(model, table)
    assert stats.get_stats(model) is table
    model.meta.invalidate(stats.STATS_KEY)
    assert stats.get_stats(model) is None
