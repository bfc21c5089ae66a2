"""Graph I/O and helpers: the edge where ONNX protobuf becomes an ``onnx_ir`` model and back.

Inside the engine and the passes a model is an ``ir.Model``. Protobuf appears only here (load, save,
checker, shape inference) and in :mod:`onnxopt.runtime` (onnxruntime sessions).

Loading accepts any default-domain opset from :data:`MIN_OPSET` to :data:`MAX_OPSET` (what the pinned
onnxruntime runs; older ones are upgraded to :data:`MIN_OPSET` by onnx's version converter), old and new IR
versions, and weights stored as initializers, as graph inputs with initializers (old exporters), or as
``Constant``/``ConstantOfShape`` nodes: :func:`const_array` reads all three. It refuses what cannot be
optimized: an input with a dimension of size 0, an all-NaN weight. Saving writes an IR version onnxruntime
accepts, switches to external data when the weights approach protobuf's 2 GB limit, never leaves a tensor
pointing at another model's external-data file, and is atomic: the file appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import ModelLoadError, ModelSaveError, first_line

__all__ = [
    "MIN_OPSET",
    "MAX_OPSET",
    "MAX_IR_VERSION",
    "EXTERNAL_DATA_THRESHOLD",
    "load",
    "shape_text",
    "save_as_written",
    "file_as_written",
    "writes_without_value_info",
    "save",
    "to_proto",
    "from_proto",
    "clone",
    "default_opset",
    "data_inputs",
    "const_array",
    "weight_bytes",
    "fresh_name",
    "add_initializer",
    "copy_dtype",
    "upgrade_opset",
    "adopt",
    "temporary_model_file",
    "external_data_files",
    "in_memory",
    "make_temp_dir",
    "remove_stale_temp_dirs",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 7
# onnxruntime 1.31 runs default-domain opsets up to 26 and IR versions up to 13 (measured); onnx 1.23
# writes IR 14 by default, which onnxruntime rejects, so saving clamps the IR version.
MAX_OPSET = 26
MAX_IR_VERSION = 13
# Protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load(path: str | os.PathLike) -> ir.Model:
    """Read, check and deserialize an ONNX model file.

    Raises:
        ModelLoadError: missing or empty file, not an ONNX protobuf, a model that fails
            ``onnx.checker``, or an opset outside what onnxruntime runs.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        _refuse_other_kind(path)
        raise ModelLoadError(f"{path}: is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-derived errors, ...
        _refuse_other_kind(path)
        raise ModelLoadError(f"{path}: not a readable ONNX model ({first_line(e)})") from e
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        _refuse_other_kind(path)
        raise ModelLoadError(f"{path}: not an ONNX model (no graph found)")
    opset = _proto_default_opset(proto)
    if opset is None:
        raise ModelLoadError(f"{path}: model imports no default-domain opset")
    if not 1 <= opset <= MAX_OPSET:
        raise ModelLoadError(
            f"{path}: opset {opset} is not supported (onnxopt handles opsets up to {MAX_OPSET}, what onnxruntime runs)"
        )
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: fails the ONNX checker: {first_line(e)}") from e
    del proto
    if opset < MIN_OPSET:
        model = _upgraded(path, opset)
    else:
        try:
            model = ir.load(path)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot be read by onnx_ir ({first_line(e)})") from e
    _check_usable(path, model)
    return model


def _refuse_other_kind(path: Path) -> None:
    """A PyTorch, safetensors, TFLite or Keras file given as a model: say which, and what converts it."""
    from onnxopt import filekind

    kind = filekind.describe(path)
    if kind is not None:
        raise ModelLoadError(f"{path}: this is {kind}, not an ONNX model; {filekind.advice(path, kind)}")


def shape_text(dims: Iterable[object], unknown: str = "?") -> str:
    """A shape as messages and reports write it: ``1x3x224x224``, ``unknown`` for a dimension that is ``None``
    (``N`` where it stands for the batch); ``""`` for a scalar's."""
    return "x".join(unknown if d is None else str(d) for d in dims)


def _check_usable(path: Path, model: ir.Model) -> None:
    """Refuse what passes the checker yet cannot be optimized: an input no sample fits, an all-NaN weight."""
    for value in data_inputs(model):
        if value.shape is not None and any(isinstance(d, int) and d == 0 for d in value.shape):
            dims = shape_text(value.shape)
            raise ModelLoadError(
                f"{path}: input '{value.name}' has shape {dims}: a dimension of size 0 holds no sample"
            )
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or value.dtype is None or not value.dtype.is_floating_point() or tensor.size == 0:
            continue
        array = tensor.numpy()
        # all-NaN needs a NaN first element: one element decides for almost every weight, even a 2 GB one
        if array.dtype.kind == "f" and np.isnan(array.flat[0]) and np.isnan(array).all():
            raise ModelLoadError(f"{path}: weight '{value.name}' is all NaN (a failed export or training run)")


def _upgraded(path: Path, opset: int) -> ir.Model:
    """An opset-1..6 model converted to :data:`MIN_OPSET` by onnx's version converter.

    onnxruntime still runs most such models (pytorch's old exports are opset 6), and the run validates the
    result against the original file as for any pass, so the conversion is checked like a rewrite.
    """
    import onnx.version_converter

    try:
        converted = onnx.version_converter.convert_version(onnx.load(str(path)), MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as e:
        raise ModelLoadError(
            f"{path}: opset {opset} could not be upgraded to opset {MIN_OPSET}, the oldest onnxopt handles "
            f"({first_line(e)})"
        ) from e
    logger.info("%s: opset %d upgraded to %d by onnx.version_converter", path, opset, MIN_OPSET)
    return ir.from_proto(converted)


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    The model and, when used, its ``<name>.data`` external-data file are written into a temporary
    directory beside the target and renamed into place only once complete, so an interrupted save
    leaves no partial output. ``external_data=None`` decides from the weight size.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelSaveError(f"{path}: is a directory; give a file name for the output model")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ModelSaveError(f"{path}: directory {parent} does not exist")
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data" if external_data else None
    try:
        tmp_dir = make_temp_dir(f".{path.name}.", parent, suffix=".tmp")
    except OSError as e:
        raise ModelSaveError(f"{path}: cannot write in {parent} ({e.strerror})") from e
    try:
        tmp_model = tmp_dir / path.name
        if data_name is not None:
            ir.save(model, tmp_model, external_data=data_name)
        else:
            with _weights_in_memory(model):  # weights the input kept in its own .data file go into the proto
                ir.save(model, tmp_model)
        _check_self_contained(tmp_model, data_name)
        if data_name is not None:
            os.replace(tmp_dir / data_name, parent / data_name)
        os.replace(tmp_model, path)
    except OSError as e:
        raise ModelSaveError(f"{path}: cannot write ({e.strerror or e})") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.debug("saved %s (external data: %s)", path, data_name)
    return path


def serialize(model: ir.Model) -> bytes | None:
    """``model`` as ONNX protobuf bytes that load on their own, at an IR version onnxruntime reads, as :func:`save`
    writes it: the initializers the input kept in its .data file are copied in. ``None`` when the bytes would not
    load on their own: weights over :data:`EXTERNAL_DATA_THRESHOLD` (one protobuf holds 2 GB), or a node
    attribute's tensor in an external file (onnxruntime resolves such a path only from a model file)."""
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        return None
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            tensors = attr.value if attr.type == ir.AttributeType.TENSORS else [attr.value]
            if attr.type in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS) and any(
                isinstance(t, ir.ExternalTensor) for t in tensors
            ):
                return None
    with _weights_in_memory(model):
        proto = ir.serde.serialize_model(model)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto.SerializeToString()


def make_temp_dir(prefix: str, parent: str | os.PathLike | None = None, *, suffix: str = "") -> Path:
    """A fresh directory ``<prefix><pid>-<random><suffix>`` in ``parent`` (the system temp dir by default).

    Directories of the same prefix left by a process that no longer runs (killed with SIGKILL, or the machine
    went down mid-save) are removed first: the process id in the name tells them apart from live runs'.
    """
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    remove_stale_temp_dirs(prefix, parent, suffix=suffix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", suffix=suffix, dir=parent))


def remove_stale_temp_dirs(prefix: str, parent: Path, *, suffix: str = "") -> list[Path]:
    """Remove ``parent``'s directories made by :func:`make_temp_dir` with ``prefix`` for a dead process."""
    removed = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix)]
    except OSError:
        return removed
    for candidate in candidates:
        pid_text = candidate.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or not candidate.is_dir() or _process_alive(int(pid_text)):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        logger.info("removed %s, left by process %s, which no longer runs", candidate, pid_text)
        removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


@contextlib.contextmanager
def _weights_in_memory(model: ir.Model) -> Iterator[None]:
    """Swap every initializer held in an external-data file for an in-memory copy, and back on exit.

    Saved as they are, such tensors would keep their *relative* location (``model.onnx.data``), which
    resolves against the new file's directory, not the input's: the written model would not load.
    """
    values = [
        value
        for g in model.graphs()
        for value in g.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    ]
    tensors = [value.const_value for value in values]
    try:
        for value, tensor in zip(values, tensors, strict=True):
            value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype)
        yield
    finally:
        for value, tensor in zip(values, tensors, strict=True):
            value.const_value = tensor


def _check_self_contained(path: Path, data_name: str | None) -> None:
    """Refuse to publish a model file whose tensors point at any file but its own ``data_name``.

    A model saved without external data has none left after :func:`_weights_in_memory` unless a node
    attribute holds one; the re-read is skipped for such a file over 64 MB (it would double the memory).
    """
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    if data_name is None and path.stat().st_size > 1 << 26:
        return
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location != data_name:
                raise ModelSaveError(
                    f"{path.name}: tensor '{tensor.name}' would point at external data '{location}' "
                    f"instead of {data_name or 'the model file'}"
                )


@contextlib.contextmanager
def temporary_model_file(model: ir.Model) -> Iterator[Path]:
    """Save ``model`` into a fresh temporary directory and yield the file path; removed on exit.

    A model whose tensors stay in an external file is opened from a path, never from bytes: opened from bytes it
    fails "External data path validation failed" (:func:`serialize` copies initializers in, or declines).
    """
    tmp_dir = make_temp_dir("onnxopt-")
    try:
        yield save(model, tmp_dir / "model.onnx")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def has_value_info(path: str | os.PathLike) -> bool:
    """Whether the model file at ``path`` annotates intermediate values with shapes (its graph's ``value_info``
    entries other than the initializers' own, which onnx_ir writes for every file); remembered per file, size and
    modification time (a search asks it of one original for every candidate)."""
    import onnx

    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HAS_VALUE_INFO:
        graph = onnx.load(str(path), load_external_data=False).graph
        weights = {tensor.name for tensor in graph.initializer}
        _HAS_VALUE_INFO[key] = any(info.name not in weights for info in graph.value_info)
    return _HAS_VALUE_INFO[key]


_HAS_VALUE_INFO: dict[tuple[str, int, int], bool] = {}


def writes_without_value_info(source: str | os.PathLike | None) -> bool:
    """Whether onnxopt writes a result of the model file ``source`` without intermediate shape annotations: when
    ``source`` has none (``onnxopt run``'s writer; :func:`drop_value_info`). ``None``: no file, kept as it is."""
    return source is not None and not has_value_info(source)


def save_as_written(model: ir.Model, path: str | os.PathLike, source: str | os.PathLike | None) -> Path:
    """``model`` saved to ``path`` in the form onnxopt writes a result of ``source`` in: without intermediate shape
    annotations when ``source`` has none (:func:`writes_without_value_info`). ``model`` itself is left as it is (a
    copy is saved: saving weights to a new ``.data`` file would point ``model``'s tensors at it). A model
    timed to choose between candidates must be timed in that form: onnxruntime fuses differently with the
    annotations, and paraphrase-MiniLM-L3-v2's int8 model ran 13% slower with them (16.5 against 14.6 ms at
    16x23: ``SkipLayerNormalization`` fused, and the normalization kernels took 2.4 ms in all instead of 0.5)."""
    model = clone(model)
    if writes_without_value_info(source):
        drop_value_info(model)
    return save(model, path)


def file_as_written(
    path: str | os.PathLike, source: str | os.PathLike | None, copy_to: str | os.PathLike | None = None
) -> Path:
    """The model file at ``path`` in the form onnxopt writes a result of ``source`` in (:func:`save_as_written`):
    ``path`` itself (also when it has no annotations), or a copy without them saved to ``copy_to`` (default: the
    same name in an ``as_written`` folder beside ``path``)."""
    path = Path(path)
    if not writes_without_value_info(source) or not has_value_info(path):
        return path
    if copy_to is None:
        (path.parent / "as_written").mkdir(exist_ok=True)
        copy_to = path.parent / "as_written" / path.name
    model = load(path)
    drop_value_info(model)
    return save(model, copy_to)


def drop_value_info(model: ir.Model) -> int:
    """Clear the type and shape annotations of the main graph's intermediate values (node outputs that are not
    graph outputs), so that the saved file has no ``value_info``; returns how many were cleared. The tensors
    computed are the same: onnxruntime infers the shapes again. Why it matters: with every intermediate shape
    annotated, onnxruntime fuses more (``SkipLayerNormalization`` in a BERT-style encoder whose input had no
    annotations), and a fusion is not always faster: paraphrase-MiniLM-L3-v2 ran 4% slower that way."""
    outputs = {id(v) for v in model.graph.outputs}
    cleared = 0
    for node in model.graph:
        for value in node.outputs:
            if id(value) in outputs or (value.type is None and value.shape is None):
                continue
            value.type, value.shape = None, None
            cleared += 1
    return cleared


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files the model file at ``path`` reads its tensors from (none for an unreadable file)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # load() reports an unreadable model
        return []
    locations = {
        entry.value
        for tensor in _get_all_tensors(proto)
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path.parent / location for location in sorted(locations)]


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize to protobuf (for the checker, shape inference and small in-memory sessions)."""
    return ir.to_proto(model)


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    """Deserialize a protobuf model into onnx_ir."""
    return ir.from_proto(proto)


def clone(model: ir.Model) -> ir.Model:
    """A deep copy whose graph can be changed without touching ``model``."""
    return model.clone()


def default_opset(model: ir.Model) -> int:
    """The model's default-domain (``ai.onnx``) opset version."""
    version = model.opset_imports.get("")
    if version is None:
        version = model.opset_imports.get("ai.onnx")
    if version is None:
        raise ModelLoadError("model imports no default-domain opset")
    return version


def data_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that take data: those without an initializer of the same name.

    Old exporters (IR < 4) list every weight as a graph input as well; those are not fed.
    """
    graph = model.graph
    return [value for value in graph.inputs if value.name not in graph.initializers]


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant content of ``value`` as numpy, or ``None`` when it is not a constant.

    Reads initializers (also when they are listed as graph inputs) and outputs of ``Constant``
    nodes. A graph input that is *not* an initializer is never constant.
    """
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


def in_memory(model: ir.Model) -> ir.Model:
    """``model`` with every weight read from its external-data file into memory (the file may then go)."""
    ir.external_data.load_to_model(model)
    return model


def fresh_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... : a name no value of ``graph`` uses yet."""
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    taken |= {out.name for node in graph for out in node.outputs}
    name, index = base, 0
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    return name


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer under a fresh name derived from ``base`` (a 0-d array stays a scalar)."""
    array = np.asarray(array)
    contiguous = np.ascontiguousarray(array).reshape(array.shape)  # ascontiguousarray alone makes a 0-d array 1-d
    value = ir.Value(name=fresh_name(graph, base), const_value=ir.tensor(contiguous))
    value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def copy_dtype(source: ir.Value, target: ir.Value) -> None:
    """Give ``target`` the element type of ``source`` when it is known (a ``None`` type cannot be serialized)."""
    if source.dtype is not None:
        target.dtype = source.dtype


def upgrade_opset(model: ir.Model, target: int) -> ir.Model:
    """A copy of ``model`` converted to default-domain opset ``target`` by onnx's version converter."""
    import onnx.version_converter

    proto = onnx.version_converter.convert_version(to_proto(model), target)
    proto.ir_version = min(max(proto.ir_version, 10), MAX_IR_VERSION)  # opset 21+ types (UINT4) need IR >= 10
    return from_proto(proto)


def adopt(model: ir.Model, other: ir.Model) -> None:
    """Make ``model`` (the object a pass manager holds) take ``other``'s graph, opsets and IR version in place."""
    model.graph = other.graph  # the graph carries its opset imports
    model.ir_version = other.ir_version
    for key in list(model.functions):
        del model.functions[key]
    model.functions.update(other.functions)


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializer data in the main graph."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def _proto_default_opset(proto: onnx.ModelProto) -> int | None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None
