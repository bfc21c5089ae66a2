"""onnxopt convert: Keras functional and Sequential, SavedModel, TFLite, torch; errors. Needs the tf/torch extras."""

from __future__ import annotations

import builtins
import os

import numpy as np
import pytest

from onnxopt import cli, convert
from onnxopt.runtime import Session

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory):
    pytest.importorskip("tf2onnx")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    d = tmp_path_factory.mktemp("keras")
    seq = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(5),
        ]
    )
    seq.save(d / "seq.keras")
    inp = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(6, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    functional = keras.Model(inp, keras.layers.Dense(3)(x))
    bn = functional.layers[2]
    rng = np.random.default_rng(0)
    bn.set_weights([1 + rng.random(6), rng.standard_normal(6), rng.standard_normal(6) * 0.1, 1 + rng.random(6)])
    functional.save(d / "fn.keras")
    functional.export(str(d / "saved"), verbose=False)
    import tensorflow as tf

    (d / "m.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(functional).convert())
    return d, seq, functional


def _x(n=5, nchw=False):
    x = np.random.default_rng(1).standard_normal((n, 8, 8, 3)).astype(np.float32)
    return np.moveaxis(x, -1, 1) if nchw else x


@pytest.mark.parametrize("name", ["seq.keras", "fn.keras", "saved", "m.tflite"])
def test_cli_converts_and_matches_keras(name, keras_models, tmp_path, capsys):
    d, seq, functional = keras_models
    source_model = seq if name == "seq.keras" else functional
    code = cli.main(["convert", str(d / name), "-o", str(tmp_path / "out.onnx")])
    out = capsys.readouterr().out
    assert code == 0 and "max error" in out
    session = Session(tmp_path / "out.onnx")
    x = _x()
    got = session.run({session.input_names[0]: x})[session.output_names[0]]
    np.testing.assert_allclose(got, np.asarray(source_model(x, training=False)), rtol=1e-4, atol=1e-4)


def test_nchw_inputs(keras_models):
    _, _, functional = keras_models
    result = convert.from_keras(functional, nchw=True)
    session = Session(result.model)
    got = session.run({session.input_names[0]: _x(nchw=True)})[session.output_names[0]]
    np.testing.assert_allclose(got, np.asarray(functional(_x(), training=False)), rtol=1e-4, atol=1e-4)
    assert result.max_error <= 1e-4


def test_from_torch_matches_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4),
    ).eval()  # fmt: skip
    result = convert.from_torch(module, (torch.randn(2, 3, 8, 8),))
    x = torch.randn(6, 3, 8, 8)
    got = Session(result.model).run({"input": x.numpy()})["output"]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-5, atol=1e-5)


def test_bad_sources_get_one_line_errors(tmp_path, capsys):
    (tmp_path / "bad.tflite").write_bytes(b"not a flatbuffer")
    (tmp_path / "notes.txt").write_text("hello")
    cases = {
        tmp_path / "missing.keras": "no such file",
        tmp_path / "notes.txt": "unsupported format",
        tmp_path / "bad.tflite": "tflite",
    }
    for source, fragment in cases.items():
        code = cli.main(["convert", str(source), "-o", str(tmp_path / "o.onnx")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err.lower(), err
        assert not (tmp_path / "o.onnx").exists()


def test_missing_extra_says_which_to_install(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_tf(name, *args, **kwargs):
        if name.split(".")[0] in ("tensorflow", "tf2onnx"):
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tf)
    (tmp_path / "m.keras").write_bytes(b"zip")
    code = cli.main(["convert", str(tmp_path / "m.keras"), "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "onnxopt[tf]"' in err and len(err.strip().splitlines()) == 1
