"""Data sources: npz, arrays, feed dicts, callables, random inputs; batching and checks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import data
from onnxopt.errors import DataError
from tests import builders


@pytest.fixture()
def dynamic():
    return ir.from_proto(builders.mlp(sizes=(8, 16, 4)))


@pytest.fixture()
def fixed():
    return ir.from_proto(builders.mlp(sizes=(8, 16, 4), batch=10))


def test_npz_with_labels_and_reference_style_keys(tmp_path, dynamic):
    x = np.random.default_rng(0).standard_normal((35, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input__x=x, output__y=np.zeros((35, 4)), labels=np.arange(35) % 4)
    source = data.as_source(tmp_path / "d.npz", dynamic, batch_size=16)
    batches = list(source)
    assert [b.size for b in batches] == [16, 16, 3] and source.samples == 35
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), np.arange(35) % 4)
    assert source.has_labels
    assert [b.size for b in source] == [16, 16, 3]  # iterable again


def test_labels_naming_an_input_make_it_the_target(tmp_path, dynamic):
    """An autoencoder's targets are its inputs: ``labels="x"`` instead of a second copy of the images."""
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=np.array("x"))
    batches = list(data.as_source(tmp_path / "d.npz", dynamic, batch_size=16))
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), x)
    np.savez(tmp_path / "bad.npz", x=x, labels=np.array("image"))
    with pytest.raises(DataError, match="'labels' names 'image'"):
        data.as_source(tmp_path / "bad.npz", dynamic)


def test_fixed_batch_models_get_their_batch_size(fixed, caplog):
    x = np.zeros((25, 8), np.float32)
    source = data.as_source({"x": x}, fixed, batch_size=16)
    assert [b.size for b in source] == [10, 10] and source.samples == 20
    assert "5 samples left over" in caplog.text
    with pytest.raises(DataError, match="fixed batch size is 10"):
        data.as_source({"x": x[:3]}, fixed)


def test_feed_dicts_and_callables(dynamic):
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32), "labels": np.arange(4)} for _ in range(3)]
    listed = data.as_source(feeds, dynamic)
    assert listed.samples == 12 and len(list(listed)) == 3 and listed.has_labels
    calls = []

    def fresh():
        calls.append(1)
        return iter(feeds)

    called = data.as_source(fresh, dynamic)
    assert len(list(called)) == 3 and len(list(called)) == 3 and len(calls) == 2
    with pytest.raises(DataError, match="cannot be read again"):
        data.as_source(iter(feeds), dynamic)
    with pytest.raises(DataError, match="no array for input 'x'"):
        list(data.as_source(lambda: iter([{"z": feeds[0]["x"]}]), dynamic))


def test_dtype_casts_only_within_kind(dynamic):
    source = data.as_source({"x": np.zeros((2, 8), np.float64)}, dynamic)
    assert next(iter(source)).feeds["x"].dtype == np.float32
    int_model = ir.from_proto(_int_model())
    assert next(iter(data.as_source({"x": np.zeros((2, 8), np.int64)}, int_model))).feeds["x"].dtype == np.int32
    with pytest.raises(DataError, match="has dtype float32, the model expects int32"):
        data.as_source({"x": np.zeros((2, 8), np.float32)}, int_model)


def _int_model():
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    return builders.make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.INT32, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["N", 8])],
        [],
    )


def test_random_inputs_follow_the_model(dynamic):
    source = data.random_source(dynamic, samples=8, seed=3)
    batches = list(source)
    assert len(batches) == 8 and batches[0].feeds["x"].shape == (1, 8)
    again = list(data.random_source(dynamic, samples=8, seed=3))
    np.testing.assert_array_equal(batches[5].feeds["x"], again[5].feeds["x"])
    shaped = list(data.random_source(dynamic, samples=8, shapes={"x": [4, 8]}))
    assert len(shaped) == 2 and shaped[0].feeds["x"].shape == (4, 8)
    assert data.parse_shape_overrides(["x=1,3,224,224", "y=2x5"]) == {"x": [1, 3, 224, 224], "y": [2, 5]}


def test_latency_feeds_read_the_inputs_of_pair_labelled_data(tmp_path):
    """Timing needs no labels: data with one label per pair of samples (--metric spearman), which the sample-count
    check of ordinary labels refuses, gives its first batch for timing (`run --latency`, `run --target`)."""
    from onnxopt.runtime import latency_feeds

    model = builders.mlp()
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    pairs = {"x": x, "labels": np.linspace(0, 5, 5).astype(np.float32)}
    path = tmp_path / "pairs.npz"
    np.savez(path, **pairs)
    with pytest.raises(DataError, match="'labels' has 5 entries, expected 10"):
        data.as_source(str(path), ir.from_proto(model), what="evaluation data")
    for given in (str(path), pairs):
        timing = latency_feeds(ir.from_proto(model), given, batch_size=4, what="evaluation data")
        assert list(timing.feeds) == ["x"]
        np.testing.assert_array_equal(timing.feeds["x"], x[:4])
    assert set(np.load(path).files) == {"x", "labels"}  # the user's file is untouched
