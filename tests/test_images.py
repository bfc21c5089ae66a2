"""Image folders as data: preprocessing numerics against Pillow + numpy by hand, labels, lazy batches, the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import cli, data, graph, images
from onnxopt.errors import DataError, UsageError
from tests import builders
from tests.conftest import SHARED

Image = pytest.importorskip("PIL.Image")

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _pixels(height: int, width: int, seed: int = 0, mode: str = "RGB") -> np.ndarray:
    """A smooth random image (a resize then has something to interpolate), uint8."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    coarse = rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, channels)).astype(np.float32)
    fine = np.kron(coarse, np.ones((4, 4, 1)))[:height, :width] + rng.normal(0, 8, (height, width, channels))
    out = np.clip(fine, 0, 255).astype(np.uint8)
    return out[..., 0] if mode == "L" else out


def _save(path, pixels: np.ndarray, mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path)
    return path


# --- parse_preprocess --------------------------------------------------------------------------------------------


def test_presets_hold_the_published_constants():
    assert images.parse_preprocess("imagenet") == images.Preprocess(
        resize=256, crop=224, scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    assert images.parse_preprocess("TF") == images.Preprocess(256, 224, 1.0, (127.0,) * 3, (128.0,) * 3)
    assert images.parse_preprocess("none") == images.Preprocess(None, None, 1 / 255)


def test_spec_items_override_the_preset_or_the_defaults():
    pre = images.parse_preprocess("imagenet,crop=192")
    assert (pre.resize, pre.crop, pre.mean) == (256, 192, (0.485, 0.456, 0.406))
    pre = images.parse_preprocess("resize=none,crop=none,scale=1/127.5,mean=1,std=0.5/0.25/2,bgr,nhwc,size=240x320")
    assert pre == images.Preprocess(None, None, 1 / 127.5, (1.0,) * 3, (0.5, 0.25, 2.0), True, "NHWC", (240, 320))
    assert images.parse_preprocess("crop=100") == images.Preprocess(crop=100)  # without a preset: the defaults


@pytest.mark.parametrize(
    "spec", ["imagenet", "tf", "none", "imagenet,crop=192,bgr", "none,mean=0.5,std=0.25,nhwc,size=12x34,scale=1/3"]
)
def test_describe_reads_back(spec):
    pre = images.parse_preprocess(spec)
    assert images.parse_preprocess(pre.describe()) == pre


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("imagenet,foo", "unknown item 'foo'"),
        ("crop=192,imagenet", "unknown item 'imagenet'"),  # a preset comes first
        ("imagenet,crop=abc", "cannot read 'crop=abc'"),
        ("imagenet,crop=0", "cannot read 'crop=0'"),
        ("imagenet,mean=1/2", "cannot read 'mean=1/2'"),
        ("scale=1/0", "cannot read 'scale=1/0'"),
        ("size=240", "cannot read 'size=240'"),
        ("layout=nhcw", "layout 'NHCW'"),
        ("std=0", "must not be 0"),
    ],
)
def test_bad_specs_are_one_line_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message) as info:
        images.parse_preprocess(spec)
    assert "\n" not in str(info.value)


# --- load_image numerics: a hand computation with Pillow and numpy ------------------------------------------------


def test_imagenet_preset_matches_resize_crop_normalize_by_hand(tmp_path):
    path = _save(tmp_path / "wide.png", _pixels(200, 300))  # height 200, width 300
    got = images.load_image(path, images.PRESETS["imagenet"])
    # shorter side 200 -> 256, longer 300 -> 256 * 300 / 200 = 384; centre 224: top (256-224)/2, left (384-224)/2
    resized = np.asarray(Image.open(path).convert("RGB").resize((384, 256), Image.Resampling.BILINEAR))
    crop = resized[16:240, 80:304].astype(np.float32)
    expected = ((crop / 255 - MEAN) / STD).transpose(2, 0, 1)
    assert got.dtype == np.float32 and got.shape == (3, 224, 224)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_longer_side_is_truncated_and_crop_offsets_round_half_to_even(tmp_path):
    # width 227, height 300 -> width 256, height int(256 * 300 / 227) = int(338.3) = 338 (torchvision truncates)
    path = _save(tmp_path / "tall.png", _pixels(300, 227, seed=1))
    got = images.load_image(path, images.parse_preprocess("none,resize=256"))
    expected = np.asarray(Image.open(path).resize((256, 338), Image.Resampling.BILINEAR)).astype(np.float32) / 255
    np.testing.assert_allclose(got, expected.transpose(2, 0, 1), rtol=0, atol=1e-6)
    # no resize, 227 x 229 cropped to 224: offsets round(1.5) = 2 and round(2.5) = 2, as torchvision's int(round(.))
    path = _save(tmp_path / "odd.png", _pixels(227, 229, seed=2))
    got = images.load_image(path, images.parse_preprocess("none,crop=224"))
    expected = np.asarray(Image.open(path)).astype(np.float32)[2:226, 2:226] / 255
    np.testing.assert_allclose(got, expected.transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_tf_preset_bgr_nhwc(tmp_path):
    path = _save(tmp_path / "square.png", _pixels(256, 256, seed=3))
    got = images.load_image(path, images.parse_preprocess("tf,bgr,nhwc"))
    crop = np.asarray(Image.open(path)).astype(np.float32)[16:240, 16:240]  # already 256: no resize
    expected = ((crop - 127) / 128)[..., ::-1]
    assert got.shape == (224, 224, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_exact_size_resize(tmp_path):
    path = _save(tmp_path / "x.png", _pixels(50, 70, seed=4))
    got = images.load_image(path, images.parse_preprocess("none,size=24x32"))
    expected = np.asarray(Image.open(path).resize((32, 24), Image.Resampling.BILINEAR)).astype(np.float32) / 255
    np.testing.assert_allclose(got, expected.transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_grey_and_rgba_images_become_rgb(tmp_path):
    grey = _pixels(20, 30, seed=5, mode="L")
    got = images.load_image(_save(tmp_path / "grey.png", grey, "L"), images.PRESETS["none"])
    np.testing.assert_allclose(got, np.stack([grey / 255] * 3), rtol=0, atol=1e-6)
    rgba = _pixels(20, 30, seed=6, mode="RGBA")
    got = images.load_image(_save(tmp_path / "rgba.png", rgba, "RGBA"), images.PRESETS["none"])
    np.testing.assert_allclose(got, rgba[..., :3].transpose(2, 0, 1) / 255, rtol=0, atol=1e-6)


def test_image_smaller_than_the_crop_is_padded_with_zero_pixels(tmp_path):
    pixels = _pixels(100, 100, seed=7)
    got = images.load_image(
        _save(tmp_path / "small.png", pixels), images.parse_preprocess("imagenet,resize=none,crop=120")
    )
    padded = np.zeros((120, 120, 3), np.float32)
    padded[10:110, 10:110] = pixels
    np.testing.assert_allclose(got, ((padded / 255 - MEAN) / STD).transpose(2, 0, 1), rtol=0, atol=1e-5)


def test_unreadable_images_name_the_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError, match="cannot read image .*notes.jpg"):
        images.load_image(tmp_path / "notes.jpg", images.PRESETS["none"])
    Image.fromarray(_pixels(64, 64)).save(tmp_path / "whole.jpg", quality=90)
    blob = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cannot read image .*cut.jpg"):
        images.load_image(tmp_path / "cut.jpg", images.PRESETS["none"])
    with pytest.raises(DataError, match="missing.png"):
        images.load_image(tmp_path / "missing.png", images.PRESETS["none"])


# --- list_images: labels.txt, class folders, loose images ----------------------------------------------------------


def test_labels_file(tmp_path):
    for name in ("b.png", "a.PNG", "c.JPEG"):
        _save(tmp_path / name, _pixels(8, 8))
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "labels.txt").write_text("a.PNG, 3\n\n# a comment\nb.png,0\nc.JPEG , 7\n")
    files, labels = images.list_images(tmp_path)
    assert [f.name for f in files] == ["a.PNG", "b.png", "c.JPEG"]
    assert labels == [3, 0, 7]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png, 1\n", r"no label for 1 images \(b.png"),
        ("a.png, 1\nb.png, 2\nz.png, 3\n", r"1 listed files are not images .*\(z.png"),
        ("a.png, 1\nb.png cat\n", "line 2: expected 'FILE, CLASS'"),
        ("a.png, 1\nb.png, cat\n", "line 2: expected 'FILE, CLASS' with an integer class"),
    ],
)
def test_bad_labels_file(tmp_path, text, message):
    for name in ("a.png", "b.png"):
        _save(tmp_path / name, _pixels(8, 8))
    (tmp_path / "labels.txt").write_text(text)
    with pytest.raises(DataError, match=message):
        images.list_images(tmp_path)


def test_class_folders_in_sorted_order(tmp_path):
    for cls, names in {"dog": ["2.png", "1.png"], "ant": ["9.jpg"], "cat": ["5.png"], "empty": []}.items():
        (tmp_path / cls).mkdir()
        for name in names:
            _save(tmp_path / cls / name, _pixels(8, 8))
    files, labels = images.list_images(tmp_path)
    assert [f"{f.parent.name}/{f.name}" for f in files] == ["ant/9.jpg", "cat/5.png", "dog/1.png", "dog/2.png"]
    assert labels == [0, 1, 2, 2]  # 'empty' holds no images and is no class


def test_loose_images_have_no_labels_and_bad_folders_are_errors(tmp_path):
    for name in ("b.jpg", "a.png"):
        _save(tmp_path / name, _pixels(8, 8))
    files, labels = images.list_images(tmp_path)
    assert [f.name for f in files] == ["a.png", "b.jpg"] and labels is None
    _save(tmp_path / "cls" / "c.png", _pixels(8, 8))
    with pytest.raises(DataError, match="both class sub-folders"):
        images.list_images(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        images.list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="not a folder"):
        images.list_images(tmp_path / "a.png")


# --- image_source: lazy batches for the model's single image input -------------------------------------------------

PRE10 = images.parse_preprocess("none,crop=10")  # the conv_net builder takes N x 3 x 10 x 10


def _classes(root, counts=(3, 4), size=(12, 14)):
    seed = 0
    for cls, count in zip(("cat", "dog"), counts, strict=False):
        for i in range(count):
            seed += 1
            _save(root / cls / f"{i}.png", _pixels(*size, seed=seed))
    return root


def test_image_source_batches_equal_the_eager_load(tmp_path):
    folder = _classes(tmp_path / "imgs")
    model = graph.load(builders.save(builders.conv_net(), tmp_path / "net.onnx"))
    source = images.image_source(folder, PRE10, model, batch_size=3)
    batches = list(source)
    assert [b.size for b in batches] == [3, 3, 1] and source.samples == 7
    x, labels = images.load_images(folder, PRE10)
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1] and source.labels.tolist() == labels.tolist()
    x2, labels2 = images.load_images(folder, PRE10, limit=2, offset=3)
    np.testing.assert_array_equal(x2, x[3:5])
    assert labels2.tolist() == [1, 1]


def test_image_source_reads_in_another_order_for_the_checks(tmp_path):
    folder = _classes(tmp_path / "imgs")
    model = graph.load(builders.save(builders.conv_net(), tmp_path / "net.onnx"))
    source = images.image_source(folder, PRE10, model, batch_size=3)
    order = np.array([6, 0, 5, 1, 4, 2, 3])
    taken = data.reordered(source, order)
    x, labels = images.load_images(folder, PRE10)
    batches = list(taken)
    assert [b.size for b in batches] == [3, 3, 1] and taken.batch_sizes == source.batch_sizes
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in batches]), x[order])
    assert np.concatenate([b.labels for b in batches]).tolist() == labels[order].tolist() == taken.labels.tolist()
    assert taken.order is order and source.order is None and data.reordered(source, order[:3]) is None


def test_image_source_reads_lazily_and_again_on_each_iteration(tmp_path, monkeypatch):
    folder = _classes(tmp_path / "imgs")
    model = graph.load(builders.save(builders.conv_net(), tmp_path / "net.onnx"))
    reads = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda path, pre: reads.append(path.name) or real(path, pre))
    source = images.image_source(folder, PRE10, model, batch_size=2)
    assert len(reads) == 1  # the first image, to check its shape
    iterator = iter(source)
    next(iterator)
    assert len(reads) == 3
    first = [b.feeds["x"] for b in source]
    second = [b.feeds["x"] for b in source]
    assert len(reads) == 3 + 2 * 7  # the first batch plus two whole passes: nothing cached
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fixed_batch_drops_the_remainder(tmp_path):
    folder = _classes(tmp_path / "imgs")
    model = graph.load(builders.save(builders.conv_net(batch=2), tmp_path / "net.onnx"))
    source = images.image_source(folder, PRE10, model, batch_size=16)
    assert [b.size for b in source] == [2, 2, 2] and source.samples == 6


def test_dynamic_spatial_dims_take_the_images_as_preprocessed(tmp_path):
    folder = _classes(tmp_path / "imgs", size=(12, 14))
    model = graph.load(_single(tmp_path, TensorProto.FLOAT, ["N", 3, "H", "W"]))
    batches = list(images.image_source(folder, images.PRESETS["none"], model, batch_size=4))
    assert [b.feeds["x"].shape for b in batches] == [(4, 3, 12, 14), (3, 3, 12, 14)]


def _two_inputs(tmp_path):
    shape = ["N", 3, 10, 10]
    model = builders.make_model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [],
    )
    return builders.save(model, tmp_path / "two.onnx")


def _single(tmp_path, dtype, shape, name="nhwc.onnx"):
    model = builders.make_model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, shape)],
        [],
    )
    return builders.save(model, tmp_path / name)


@pytest.mark.parametrize(
    ("make", "pre", "message"),
    [
        (_two_inputs, PRE10, "one image input; this model has 2"),
        (lambda d: _single(d, TensorProto.INT64, ["N", 3, 10, 10]), PRE10, "not a float tensor"),
        (lambda d: _single(d, TensorProto.FLOAT, ["N", 10, 10, 3]), PRE10, "the model looks NHWC: add ',nhwc'"),
        (
            lambda d: _single(d, TensorProto.FLOAT, ["N", 3, 8, 8]),
            PRE10,
            "3x10x10 .NCHW., the model's input takes 3x8x8",
        ),
        (lambda d: _single(d, TensorProto.FLOAT, ["N", 3 * 10 * 10]), PRE10, "not a 4-d image batch"),
    ],
)
def test_image_source_rejects_models_it_cannot_feed(tmp_path, make, pre, message):
    folder = _classes(tmp_path / "imgs")
    model = graph.load(make(tmp_path))
    with pytest.raises(DataError, match=message):
        images.image_source(folder, pre, model)


def test_automatic_batch_size_caps_the_input_bytes_of_a_batch(tmp_path):
    folder = _classes(tmp_path / "imgs", counts=(7, 6))
    model = graph.load(builders.save(builders.conv_net(), tmp_path / "net.onnx"))
    one = 3 * 10 * 10 * 4  # bytes of one preprocessed image
    capped = data.as_source(images.ImageFolder(folder, PRE10, max_batch_bytes=3 * one + 1), model, batch_size=16)
    assert [b.size for b in capped] == [3, 3, 3, 3, 1]
    assert [b.size for b in data.as_source(images.ImageFolder(folder, PRE10), model, batch_size=8)] == [8, 5]
    given = data.as_source(images.ImageFolder(folder, PRE10, batch_size=5, max_batch_bytes=one), model, batch_size=8)
    assert [b.size for b in given] == [5, 5, 3]  # a batch size given for the folder wins over the cap


def test_as_source_takes_image_folders_and_refuses_a_bare_folder(tmp_path):
    folder = _classes(tmp_path / "imgs")
    model = graph.load(builders.save(builders.conv_net(), tmp_path / "net.onnx"))
    source = data.as_source(images.ImageFolder(folder, PRE10), model, batch_size=4, what="eval")
    assert [b.size for b in source] == [4, 3]
    with pytest.raises(UsageError, match="is a folder: to read it as images"):
        data.as_source(folder, model)


# --- the command line ----------------------------------------------------------------------------------------------


def _cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _accuracy(model_path, folder, pre) -> float:
    x, labels = images.load_images(folder, pre)
    logits = builders.run(onnx.load(model_path), {"x": x})["y"]
    return 100.0 * float((logits.argmax(1) == labels).mean())


def test_run_calibrates_and_validates_on_image_folders(tmp_path, capsys):
    calib = _classes(tmp_path / "calib", counts=(2, 3))
    held = _classes(tmp_path / "eval", counts=(16, 17), size=(16, 11))  # lossy passes are judged on >= 32
    model = builders.save(builders.conv_net(), tmp_path / "net.onnx")
    code, out, err = _cli(
        capsys, "run", model, "--passes", "quant", "--data", calib, "--eval", held, "--preprocess", "none,crop=10",
        "--max-accuracy-drop", "100", "-o", tmp_path / "q.onnx", "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    validation = report["validation"]
    assert validation["samples"] == 33
    assert validation["accuracy"]["before"] == pytest.approx(_accuracy(model, held, PRE10))
    assert validation["accuracy"]["after"] == pytest.approx(_accuracy(tmp_path / "q.onnx", held, PRE10))


def test_validate_and_bench_read_image_folders(tmp_path, capsys):
    held = _classes(tmp_path / "eval", counts=(4, 5))
    model = builders.save(builders.conv_net(), tmp_path / "net.onnx")
    other = builders.save(builders.conv_net(seed=1), tmp_path / "other.onnx")
    code, out, err = _cli(capsys, "validate", model, other, "--data", held, "--preprocess", "none,crop=10", "--json")
    assert code in (0, 1), err
    assert json.loads(out)["samples"] == 9
    code, out, err = _cli(
        capsys, "bench", model, other, "--data", held, "--preprocess", "none,crop=10", "--rounds", "2",
        "--threads", "1", "--json",
    )  # fmt: skip
    assert code == 0, err
    accuracy = [r["accuracy"] for r in json.loads(out)]
    assert accuracy == pytest.approx([_accuracy(model, held, PRE10), _accuracy(other, held, PRE10)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (lambda d, m: ["run", m, "--passes", "quant", "--data", d / "imgs", "-o", d / "o.onnx"],
         "--data .*imgs is a folder of images: pass --preprocess"),
        (lambda d, m: ["run", m, "--passes", "quant", "--data", d / "c.npz", "--eval", d / "imgs", "-o", d / "o.onnx"],
         "--eval .*imgs is a folder of images: pass --preprocess"),
        (lambda d, m: ["validate", m, m, "--data", d / "imgs"], "pass --preprocess"),
        (lambda d, m: ["bench", m, "--data", d / "imgs"], "pass --preprocess"),
        (lambda d, m: ["run", m, "--passes", "quant", "--data", d / "c.npz", "--preprocess", "imagenet",
                       "-o", d / "o.onnx"], "--preprocess applies to image folders"),
        (lambda d, m: ["run", m, "--passes", "quant", "--data", d / "imgs", "--preprocess", "imagenet,zoom=2",
                       "-o", d / "o.onnx"], "unknown item 'zoom=2'"),
        (lambda d, m: ["run", m, "--passes", "quant", "--data", d / "imgs", "--preprocess", "imagenet",
                       "-o", d / "o.onnx"], "3x224x224 .NCHW., the model's input takes 3x10x10"),
        (lambda d, m: ["run", m, "--passes", "quant", "--data", d / "broken", "--preprocess", "none,crop=10",
                       "-o", d / "o.onnx"], "cannot read image .*broken/cat/2.png"),
        (lambda d, m: ["run", _two_inputs(d), "--passes", "quant", "--data", d / "imgs", "--preprocess",
                       "none,crop=10", "-o", d / "o.onnx"], "this model has 2"),
    ],
)  # fmt: skip
def test_cli_image_folder_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    _classes(tmp_path / "imgs")
    _classes(tmp_path / "broken")
    (tmp_path / "broken" / "cat" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 10, 10), np.float32))
    model = builders.save(builders.conv_net(), tmp_path / "net.onnx")
    code, out, err = _cli(capsys, *argv(tmp_path, model))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("onnxopt: error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "o.onnx").exists()


# --- ../shared data: the folders' layouts ---------------------------------------------------------------------------

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.shared
def test_cifar10_folders_sort_into_cifar_class_order():
    folder = SHARED / "data" / "cifar10" / "test2000"
    if not folder.is_dir():
        pytest.skip("../shared/data/cifar10/test2000 is absent")
    files, labels = images.list_images(folder)
    assert len(files) == 2000 and np.bincount(labels).tolist() == [200] * 10
    # class k of the folder order is CIFAR-10's class k (torchvision.datasets.CIFAR10.classes)
    assert [files[labels.index(k)].parent.name for k in range(10)] == CIFAR10_CLASSES


@pytest.mark.shared
def test_imagenet_val1300_labels_file():
    folder = SHARED / "data" / "imagenet" / "val1300"
    if not folder.is_dir():
        pytest.skip("../shared/data/imagenet/val1300 is absent")
    files, labels = images.list_images(folder)
    assert len(files) == 1300 and len(labels) == 1300
    assert min(labels) >= 0 and max(labels) <= 999
    first = (folder / "labels.txt").read_text().splitlines()[0].split(",")
    index = [f.name for f in files].index(first[0].strip())
    assert labels[index] == int(first[1])
