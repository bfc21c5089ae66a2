"""What a file that is not an ONNX model is, from its first bytes, to point the user to ``onnxopt convert``.

``onnxopt run model.pt`` used to end in protobuf's "Error parsing message with type 'onnx.ModelProto'"
(or a "wire format" error): accurate, but not what to do. :func:`describe` recognizes the files people
mistake for ONNX models::

    PK\\x03\\x04 ... "<name>/code/"        TorchScript archive (torch.jit.save)
    PK\\x03\\x04 ... "<name>/data.pkl"     PyTorch checkpoint (torch.save): weights, not the network
    \\x80\\x02 ... (pickle)                 PyTorch checkpoint, legacy format
    <u64 n> {"...                          safetensors: weights only
    ....TFL3                               TFLite flatbuffer
    \\x89HDF\\r\\n\\x1a\\n                     Keras HDF5 (.h5)
    PK\\x03\\x04 ... "config.json"          Keras 3 (.keras)
    directory with saved_model.pb          TensorFlow SavedModel

and :func:`advice` says what to run instead. A zip of ``.npy`` arrays (an ``.npz``) is data, not a model.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

__all__ = ["describe", "advice"]

_ZIP = b"PK\x03\x04"
_HDF5 = b"\x89HDF\r\n\x1a\n"


def describe(path: str | Path) -> str | None:
    """The kind of model file at ``path`` when it is a known non-ONNX format, else ``None``."""
    path = Path(path)
    if path.is_dir():
        return "a TensorFlow SavedModel directory" if (path / "saved_model.pb").exists() else None
    try:
        with path.open("rb") as handle:
            head = handle.read(64)
    except OSError:
        return None
    if head.startswith(_ZIP):
        return _zip_kind(path)
    if head.startswith(_HDF5):
        return "a Keras HDF5 model (.h5)"
    if len(head) >= 8 and head[4:8] == b"TFL3":
        return "a TFLite model"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a PyTorch checkpoint (a pickle: torch.save of weights, not the network)"
    if _is_safetensors(path, head):
        return "a safetensors file (weights only, no network)"
    return None


def advice(path: str | Path, kind: str) -> str:
    """What to do with a file of ``kind`` (from :func:`describe`)."""
    if kind.startswith("a TorchScript"):
        return f"convert it first: onnxopt convert {path} --input-shape NAME=D0,D1,... -o model.onnx (torch extra)"
    if kind.startswith(("a PyTorch checkpoint", "a safetensors")):
        return (
            "it holds weights without the network: build the module in Python, load the weights, and export with "
            "onnxopt.convert.from_torch(module, (example_input,)), or save it with torch.jit.save and run "
            "onnxopt convert on that"
        )
    return f"convert it first: onnxopt convert {path} -o model.onnx (tf extra)"


def _zip_kind(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if names and all(n.endswith(".npy") for n in names):
        return None  # an .npz: data
    if any(n.split("/", 1)[-1].startswith("code/") for n in names):
        return "a TorchScript archive"
    if any(n.endswith("data.pkl") for n in names):
        return "a PyTorch checkpoint (torch.save of weights, not the network)"
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return "a Keras model (.keras)"
    return None


def _is_safetensors(path: Path, head: bytes) -> bool:
    """An 8-byte little-endian header length, then that many bytes of JSON starting with ``{``."""
    if len(head) < 10 or head[8:9] != b"{":
        return False
    (size,) = struct.unpack("<Q", head[:8])
    if not 2 <= size <= min(100 << 20, path.stat().st_size - 8):
        return False
    try:
        with path.open("rb") as handle:
            handle.seek(8)
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict)
