"""Image augmentation for distillation (onnxopt/augment.py): which inputs count as images, and what a view is."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
from onnxopt.augment import Augment, augment_feeds, image_inputs, image_layout  # noqa: E402


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((2, 3, 32, 32), "NCHW"),
        ((2, 1, 28, 28), "NCHW"),
        ((2, 224, 224, 3), "NHWC"),
        ((2, 3, 8, 8), None),  # too small to be an image
        ((2, 3, 4, 3), None),  # channels on both ends: cannot tell
        ((2, 16, 32, 32), None),  # a feature map, not an image
        ((2, 3, 224), None),
        ((16, 24), None),
    ],
)
def test_image_layout(shape, layout):
    assert image_layout(shape) == layout


def test_only_float_image_inputs_count():
    feeds = {"x": np.zeros((2, 3, 32, 32), np.float32), "ids": np.zeros((2, 3, 32, 32), np.int64)}
    assert image_inputs(feeds) == {"x": "NCHW"}


def _images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_a_full_crop_with_a_flip_is_the_mirror_image_in_either_layout():
    nchw = _images((4, 3, 20, 24))
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    always = Augment(flip=1.0, area=(1.0, 1.0), aspect=1.0)
    out = augment_feeds({"a": nchw, "b": nhwc}, np.random.default_rng(0), always)
    np.testing.assert_array_equal(out["a"], nchw[..., ::-1])
    np.testing.assert_array_equal(out["b"], nhwc[:, :, ::-1, :])


def test_views_keep_shape_and_dtype_repeat_with_the_seed_and_change_with_another():
    x = _images((8, 3, 32, 32))
    tokens = np.arange(8, dtype=np.int64)[:, None]
    out = augment_feeds({"x": x, "t": tokens}, np.random.default_rng(1))
    again = augment_feeds({"x": x, "t": tokens}, np.random.default_rng(1))
    other = augment_feeds({"x": x, "t": tokens}, np.random.default_rng(2))
    assert out["x"].shape == x.shape and out["x"].dtype == x.dtype
    assert out["t"] is tokens  # not an image: as given
    np.testing.assert_array_equal(out["x"], again["x"])
    assert not np.array_equal(out["x"], other["x"])
    assert not np.allclose(out["x"], x)
    # a crop's values lie within the image's range (bilinear interpolation does not extrapolate)
    assert out["x"].min() >= x.min() - 1e-5 and out["x"].max() <= x.max() + 1e-5


def test_two_image_inputs_of_a_sample_get_the_same_view():
    x = _images((6, 3, 32, 32))
    out = augment_feeds({"left": x, "right": x.copy()}, np.random.default_rng(3))
    np.testing.assert_array_equal(out["left"], out["right"])


def test_no_image_input_leaves_the_feeds_as_given():
    feeds = {"x": _images((4, 12))}
    out = augment_feeds(feeds, np.random.default_rng(0))
    assert out["x"] is feeds["x"]
