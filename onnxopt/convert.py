"""Conversion into ONNX: Keras/TensorFlow/TFLite through tf2onnx, PyTorch through torch.onnx; always validated.

    from onnxopt import convert
    result = convert.from_keras(keras_model)          # a Converted: .model (ir.Model), .max_error, .tolerance
    result.save("model.onnx")
    convert.from_saved_model("saved_model_dir"); convert.from_tflite("model.tflite")
    convert.from_torch(module, (example_input,))
    convert.convert_file("model.keras", "model.onnx")   # what `onnxopt convert` runs

Routes that work with tf2onnx 1.17 and Keras 3 (see ../shared/FINDINGS.md): every Keras model, Sequential
included, goes through ``tf2onnx.convert.from_function`` on a ``tf.function`` of the model (``from_keras``
fails on Keras 3 Sequential models); a SavedModel goes through tf2onnx's command line; a TFLite file through
``from_tflite``. Opset 17 by default: 18 turns GlobalAveragePool into Transpose+ReduceMean.

Every conversion runs the source framework and onnxruntime on the same sample inputs (seeded random
normal, or ``data``) and compares: ``max_error`` is ``max|y_onnx − y_src| / max(1, max|y_src|)`` over all
outputs, and a result above ``tolerance`` raises :class:`ConversionError`. TensorFlow and torch are optional
extras, imported only here and only when used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt.errors import OnnxoptError, first_line
from onnxopt.runtime import Session

__all__ = [
    "DEFAULT_OPSET",
    "Converted",
    "ConversionError",
    "from_keras",
    "from_saved_model",
    "from_tflite",
    "from_torch",
    "from_torchscript",
    "convert_file",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")


class ConversionError(OnnxoptError):
    """A conversion that failed, or whose output does not match the source framework."""


@dataclasses.dataclass
class Converted:
    """A converted model and how closely it reproduces the source framework on the sample inputs."""

    model: ir.Model
    max_error: float
    tolerance: float
    samples: int

    def save(self, path: str | os.PathLike) -> Path:
        return graph_io.save(self.model, path)


def _require_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
        import tf2onnx  # noqa: F401
    except ImportError as e:
        raise ConversionError(
            f"converting TensorFlow/Keras models needs the 'tf' extra: pip install \"onnxopt[tf]\" ({e.name} missing)"
        ) from None
    tf.get_logger().setLevel("ERROR")
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    return tf


def from_keras(
    model: Any,
    *,
    opset: int = DEFAULT_OPSET,
    nchw: bool = False,
    data: Mapping[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
) -> Converted:
    """Convert a Keras 3 model (functional or Sequential) through a ``tf.function`` of it."""
    tf = _require_tf()
    import tf2onnx

    shapes = _keras_input_shapes(model)
    names = [f"input_{i}" if len(shapes) > 1 else "input" for i in range(len(shapes))]
    names = [getattr(t, "name", None) or n for t, n in zip(_keras_inputs(model), names, strict=True)]
    names = [n.split(":")[0].replace("/", "_") for n in names]
    signature = [tf.TensorSpec(shape, tf.float32, name=name) for shape, name in zip(shapes, names, strict=True)]

    @tf.function(input_signature=signature)
    def forward(*args):
        return model(args[0] if len(args) == 1 else list(args), training=False)

    with _quiet():
        proto, _ = tf2onnx.convert.from_function(
            forward, input_signature=signature, opset=opset, inputs_as_nchw=names if nchw else None
        )
    converted = ir.from_proto(proto)
    feeds = _sample_feeds(converted, data)
    batch = [_to_nhwc(feeds[name], nchw) for name in names]
    outputs = model(batch[0] if len(batch) == 1 else batch, training=False)
    return _check(converted, feeds, [np.asarray(y) for y in _as_list(outputs)], tolerance)


def from_saved_model(
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    nchw: bool = False,
    data: Mapping[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
) -> Converted:
    """Convert a TensorFlow SavedModel directory (its serving signature) with tf2onnx's command line."""
    tf = _require_tf()
    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise ConversionError(f"{path}: not a SavedModel directory (no saved_model.pb)")
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    keys = list(signature.structured_input_signature[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(path), "--output", str(out)]
        cmd += ["--opset", str(opset)]
        if nchw:
            cmd += ["--inputs-as-nchw", ",".join(f"{k}:0" for k in keys)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"})
        if proc.returncode != 0 or not out.exists():
            last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["unknown error"]
            raise ConversionError(f"{path}: tf2onnx failed: {last[0][:300]}")
        converted = graph_io.load(out)
        converted = ir.from_proto(ir.to_proto(converted))  # detach from the temporary file
    feeds = _sample_feeds(converted, data)
    args = {k: tf.constant(_to_nhwc(feeds[_match(k, feeds)], nchw)) for k in keys}
    outputs = signature(**args)
    source = [np.asarray(outputs[k]) for k in _ordered_keys(outputs, converted)]
    return _check(converted, feeds, source, tolerance)


def from_tflite(
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    nchw: bool = False,
    data: Mapping[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
) -> Converted:
    """Convert a TFLite flatbuffer, validated against ``tf.lite.Interpreter``."""
    tf = _require_tf()
    import tf2onnx

    path = Path(path)
    try:
        with _quiet():
            interpreter = tf.lite.Interpreter(model_path=str(path))
            interpreter.allocate_tensors()
    except Exception as e:
        raise ConversionError(f"{path}: not a readable TFLite model ({first_line(e)})") from e
    details = interpreter.get_input_details()
    names = [d["name"] for d in details]
    with _quiet():
        proto, _ = tf2onnx.convert.from_tflite(str(path), opset=opset, inputs_as_nchw=names if nchw else None)
    converted = ir.from_proto(proto)
    feeds = _sample_feeds(converted, data)
    onnx_names = [v.name for v in graph_io.data_inputs(converted)]
    for detail, name in zip(details, onnx_names, strict=True):
        batch = _to_nhwc(feeds[name], nchw)
        interpreter.resize_tensor_input(detail["index"], batch.shape)
    interpreter.allocate_tensors()
    for detail, name in zip(interpreter.get_input_details(), onnx_names, strict=True):
        interpreter.set_tensor(detail["index"], _to_nhwc(feeds[name], nchw).astype(detail["dtype"]))
    interpreter.invoke()
    source = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
    return _check(converted, feeds, source, tolerance)


def from_torch(
    module: Any,
    example_inputs: Sequence[Any],
    *,
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    tolerance: float = 1e-5,
) -> Converted:
    """Export a torch module with ``torch.onnx.export`` (weights inline), validated against torch."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "converting PyTorch models needs the 'torch' extra: pip install \"onnxopt[torch]\""
        ) from None
    module = module.eval()
    example_inputs = tuple(example_inputs)
    names = list(
        input_names or ([f"input_{i}" for i in range(len(example_inputs))] if len(example_inputs) > 1 else ["input"])
    )
    with torch.no_grad():
        reference = module(*example_inputs)
    refs = reference if isinstance(reference, list | tuple) else (reference,)
    output_names = [f"output_{i}" for i in range(len(refs))] if len(refs) > 1 else ["output"]
    axes = {n: {0: "N"} for n in names + output_names} if dynamic_batch else None
    buffer = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            module, example_inputs, buffer, input_names=names, output_names=output_names, opset_version=opset,
            dynamic_axes=axes, dynamo=False, do_constant_folding=True,
        )  # fmt: skip
    import onnx

    converted = ir.from_proto(onnx.load_from_string(buffer.getvalue()))
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, example_inputs, strict=True)}
    return _check(converted, feeds, [r.detach().cpu().numpy() for r in refs], tolerance)


def from_torchscript(
    path: str | os.PathLike,
    input_shapes: Mapping[str, Sequence[int]],
    *,
    opset: int = DEFAULT_OPSET,
    data: Mapping[str, np.ndarray] | None = None,
    tolerance: float = 1e-5,
) -> Converted:
    """A TorchScript file (``torch.jit.save``) through :func:`from_torch`.

    TorchScript keeps no input shapes: ``input_shapes`` names the inputs, in the order ``forward`` takes them,
    with the example shapes to export at (``data`` arrays of those names are used instead of random ones).
    """
    from onnxopt import filekind

    path = Path(path)
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "converting PyTorch models needs the 'torch' extra: pip install \"onnxopt[torch]\""
        ) from None
    kind = filekind.describe(path)
    if kind is not None and not kind.startswith("a TorchScript"):
        raise ConversionError(f"{path}: this is {kind}; {filekind.advice(path, kind)}")
    if not input_shapes:
        raise ConversionError(
            f"{path}: a TorchScript file does not record its input shapes: give --input-shape NAME=D0,D1,... "
            "for each input, in the order forward() takes them"
        )
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ConversionError(f"{path}: not a readable TorchScript file ({first_line(e)})") from e
    rng = np.random.default_rng(0)
    arrays = [
        np.asarray(data[name]) if data is not None and name in data else rng.standard_normal(shape).astype(np.float32)
        for name, shape in input_shapes.items()
    ]
    example = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return from_torch(module, example, opset=opset, input_names=list(input_shapes), tolerance=tolerance)


def convert_file(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    nchw: bool = False,
    data: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Converted:
    """Convert a Keras file, a SavedModel directory, a TFLite file or a TorchScript file (with
    ``input_shapes``), and save the result."""
    from onnxopt import filekind

    source = Path(source)
    if not source.exists():
        raise ConversionError(f"{source}: no such file or directory")
    kind = None if source.is_dir() else filekind.describe(source)
    if source.suffix.lower() in TORCH_SUFFIXES or (kind or "").startswith(("a TorchScript", "a PyTorch", "a safet")):
        result = from_torchscript(source, input_shapes or {}, opset=opset, data=data)
    elif source.is_dir():
        result = from_saved_model(source, opset=opset, nchw=nchw, data=data)
    elif source.suffix.lower() in KERAS_SUFFIXES:
        tf = _require_tf()
        try:
            model = tf.keras.models.load_model(str(source), compile=False)
        except Exception as e:
            raise ConversionError(f"{source}: not a readable Keras model ({first_line(e)})") from e
        result = from_keras(model, opset=opset, nchw=nchw, data=data)
    elif source.suffix.lower() == ".tflite":
        result = from_tflite(source, opset=opset, nchw=nchw, data=data)
    else:
        raise ConversionError(
            f"{source}: unsupported format; give a Keras file ({', '.join(KERAS_SUFFIXES)}), "
            "a SavedModel directory, a .tflite file or a TorchScript file with --input-shape "
            "(a PyTorch module in Python: onnxopt.convert.from_torch)"
        )
    result.save(output)
    return result


# --- helpers ---------------------------------------------------------------------------------------------
def _keras_inputs(model: Any) -> list[Any]:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    return list(inputs) if inputs else [None]


def _keras_input_shapes(model: Any) -> list[list[int | None]]:
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ConversionError("the Keras model has no known input shape; build it (call it once) before converting")
    shapes = shape if isinstance(shape, list) else [shape]
    return [[None, *list(s[1:])] for s in shapes]


def _sample_feeds(model: ir.Model, data: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Up to 8 samples of ``data``, or seeded standard-normal inputs (dynamic dims set to 2)."""
    if data is not None:
        return {k.removeprefix("input__"): np.asarray(v)[:8] for k, v in data.items() if k != "labels"}
    rng = np.random.default_rng(0)
    feeds = {}
    for value in graph_io.data_inputs(model):
        dims = [d if isinstance(d, int) and d > 0 else 2 for d in value.shape]
        feeds[value.name] = rng.standard_normal(dims).astype(value.dtype.numpy())
    return feeds


def _to_nhwc(array: np.ndarray, nchw: bool) -> np.ndarray:
    return np.moveaxis(array, 1, -1) if nchw and array.ndim >= 3 else array


def _as_list(outputs: Any) -> list[Any]:
    if isinstance(outputs, Mapping):
        return list(outputs.values())
    return list(outputs) if isinstance(outputs, list | tuple) else [outputs]


def _match(key: str, feeds: Mapping[str, np.ndarray]) -> str:
    if key in feeds:
        return key
    candidates = [n for n in feeds if n.split(":")[0] == key]
    return candidates[0] if candidates else next(iter(feeds))


def _ordered_keys(outputs: Mapping[str, Any], model: ir.Model) -> list[str]:
    names = [v.name.split(":")[0] for v in model.graph.outputs]
    return [n if n in outputs else k for n, k in zip(names, outputs, strict=False)]


def _check(model: ir.Model, feeds: dict[str, np.ndarray], source: list[np.ndarray], tolerance: float) -> Converted:
    if model.ir_version > graph_io.MAX_IR_VERSION:
        model.ir_version = graph_io.MAX_IR_VERSION
    got = Session(model).run(feeds)
    outputs = [got[v.name] for v in model.graph.outputs]
    if len(outputs) != len(source):
        raise ConversionError(f"the ONNX model has {len(outputs)} outputs, the source {len(source)}")
    worst = 0.0
    for ours, theirs in zip(outputs, source, strict=True):
        theirs = np.asarray(theirs)
        if ours.shape != theirs.shape:
            raise ConversionError(f"output shape {ours.shape} differs from the source's {theirs.shape}")
        scale = max(1.0, float(np.abs(theirs).max())) if theirs.size else 1.0
        worst = max(worst, float(np.abs(ours.astype(np.float64) - theirs).max()) / scale if theirs.size else 0.0)
    samples = next(iter(feeds.values())).shape[0] if feeds else 0
    if not worst <= tolerance:
        raise ConversionError(f"the converted model differs from the source by {worst:.3g} (tolerance {tolerance:g})")
    logger.info("conversion validated on %d samples: max error %.3g (tolerance %g)", samples, worst, tolerance)
    return Converted(model, worst, tolerance, samples)


@contextlib.contextmanager
def _quiet():
    """tf2onnx, TFLite and torch.onnx print progress and warnings, also from C++ straight to file descriptor 2;
    keep the CLI's output to its own lines."""
    import warnings

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(devnull.fileno(), 2)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
