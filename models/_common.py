"""Shared pieces of the model-building scripts in models/: data loading, seeding, conversion, artifacts.

Every script trains with Keras (the thesis used TensorFlow), converts through ``onnxopt.convert`` (validated
against Keras) and writes into ``models/<name>/``: ``<name>.onnx``, ``calib.npz`` (training samples, for
statistics and calibration) and ``eval.npz`` (held-out test samples), each keyed by the ONNX input name with
``labels`` where there are classes, plus ``result.json`` with the measured figures for models/README.md.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

ROOT = Path(__file__).resolve().parent
MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


def fail(message: str) -> None:
    """One-line error, exit 2."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def load_mnist(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four MNIST IDX files as float32 images in [0, 1] (N, 28, 28) and int64 labels."""
    directory = Path(directory)
    missing = [name for name in MNIST_FILES.values() if not (directory / name).is_file()]
    if missing:
        fail(f"missing MNIST file(s) in {directory}: {', '.join(missing)}")

    def read(name: str, offset: int) -> np.ndarray:
        with gzip.open(directory / name, "rb") as handle:
            return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)

    train_x = read(MNIST_FILES["train_x"], 16).reshape(-1, 28, 28).astype(np.float32) / 255.0
    test_x = read(MNIST_FILES["test_x"], 16).reshape(-1, 28, 28).astype(np.float32) / 255.0
    train_y = read(MNIST_FILES["train_y"], 8).astype(np.int64)
    test_y = read(MNIST_FILES["test_y"], 8).astype(np.int64)
    return train_x, train_y, test_x, test_y


def mnist_script_args(name: str, epochs: int, quick_samples: int, description: str, argv=None):
    """The command line the MNIST training scripts share; returns (args, the command as run, for result.json)."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, help="dir with the four MNIST IDX .gz files")
    parser.add_argument("--out", default=f"models/{name}", help=f"output dir (default: models/{name})")
    parser.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default: {epochs})")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {quick_samples} samples, 1 epoch")
    args = parser.parse_args(argv)
    command = shlex.join(["python", f"models/{name}.py", *(sys.argv[1:] if argv is None else argv)])
    return args, command


def seed_everything(seed: int = 0) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def convert_and_save(model, name: str, out_dir: Path, *, nchw: bool = False):
    """Convert ``model`` with onnxopt (validated against Keras) and save ``out_dir/<name>.onnx``."""
    from onnxopt import convert, graph

    out_dir.mkdir(parents=True, exist_ok=True)
    result = convert.from_keras(model, nchw=nchw)
    path = out_dir / f"{name}.onnx"
    graph.save(result.model, path)
    return path, result


def onnx_input_name(path: Path) -> str:
    from onnxopt import graph

    return graph.data_inputs(graph.load(path))[0].name


def save_slices(out_dir: Path, input_name: str, calib: tuple, evaluation: tuple) -> None:
    """``calib.npz`` and ``eval.npz``: (inputs, labels or None) each, compressed.

    Labels given as a string name an input whose values are the targets (an autoencoder reconstructs its input):
    they are stored as a 0-d string array, ``labels=np.array("input")``, which onnxopt's data loader resolves.
    """
    for file, (x, y) in (("calib.npz", calib), ("eval.npz", evaluation)):
        arrays = {input_name: np.ascontiguousarray(x, dtype=np.float32)}
        if isinstance(y, str):
            arrays["labels"] = np.array(y)
        elif y is not None:
            arrays["labels"] = np.asarray(y)
        np.savez_compressed(out_dir / file, **arrays)


def _onnx_batches(path: Path, x: np.ndarray, batch: int):
    """(start, first output) of the ONNX model under onnxruntime, over ``x`` in batches."""
    from onnxopt.runtime import Session

    session = Session(path)
    name = session.input_names[0]
    for start in range(0, len(x), batch):
        yield start, session.run({name: x[start : start + batch]})[session.output_names[0]]


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    """Top-1 accuracy (%) of the ONNX model under onnxruntime."""
    correct = sum(int((out.argmax(axis=1) == y[s : s + batch]).sum()) for s, out in _onnx_batches(path, x, batch))
    return 100.0 * correct / len(x)


def onnx_mse(path: Path, x: np.ndarray, target: np.ndarray, batch: int = 500) -> float:
    """Mean squared error of the ONNX model's output against ``target``."""
    total = 0.0
    for start, out in _onnx_batches(path, x, batch):
        total += float(np.square(out.astype(np.float64) - target[start : start + batch].reshape(out.shape)).sum())
    return total / target.size


def finish_mnist_classifier(model, name: str, architecture: str, out_dir: Path, mnist: tuple, **figures) -> None:
    """Convert an MNIST classifier (NHWC Keras input) to NCHW ONNX, save its slices and its measured result.

    ``mnist`` is ``load_mnist``'s (train_x, train_y, test_x, test_y); ``figures`` go into result.json too.
    """
    train_x, train_y, test_x, test_y = mnist
    path, converted = convert_and_save(model, name, out_dir, nchw=True)
    print(f"wrote {path} (max error vs Keras {converted.max_error:.2g})")
    test_nchw = test_x[:, None]
    save_slices(
        out_dir,
        onnx_input_name(path),
        calib=(train_x[:1000, None], train_y[:1000]),
        evaluation=(test_nchw[:2000], test_y[:2000]),
    )
    write_result(
        out_dir,
        name=name,
        architecture=architecture,
        params=int(model.count_params()),
        accuracy_test=round(onnx_accuracy(path, test_nchw, test_y), 2),
        accuracy_eval_slice=round(onnx_accuracy(path, test_nchw[:2000], test_y[:2000]), 2),
        **figures,
    )


def write_result(out_dir: Path, **figures) -> None:
    """``result.json`` with the measured figures (read by models/README.md and the tests)."""
    figures["date"] = time.strftime("%Y-%m-%d")
    (out_dir / "result.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))
