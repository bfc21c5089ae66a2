"""Calibration and evaluation data: `.npz` files, arrays, feed-dict iterables, callables, or random inputs.

Whatever the user gives becomes a :class:`DataSource`: something that can be iterated *again* after each
pass (statistics are re-collected on the rewritten model), yielding :class:`Batch` objects whose feeds
match the model's data inputs in name, dtype and shape.

Array data (an ``.npz`` file or a mapping of arrays) is keyed by input name with the samples on axis 0;
an optional ``labels`` array gives class labels for accuracy, or float targets for task MSE; ``labels`` may
also be the *name* of an input (a 0-d string array), whose values are then the targets (an autoencoder
reconstructs its input). Keys written as ``input__<name>`` (the
reference files in ``../shared/models``) are accepted too, and ``output__*`` keys are ignored. Arrays are
cut into batches of the model's fixed batch size, or of ``batch_size`` when the batch axis is dynamic.
Inputs that share no batch axis (a recurrent state, a scalar, a shape tensor) come as *stacked feeds*:
every array has one axis more than its input's full shape and axis 0 indexes the feed, or a folder of
``.npz`` files holds one feed each; such a source yields one batch per feed. A folder of images (JPEG/PNG)
comes as an :class:`onnxopt.images.ImageFolder` (the folder and its preprocessing) and is read lazily,
batch by batch, by :func:`onnxopt.images.image_source`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt.errors import DataError, UsageError

__all__ = [
    "Feeds",
    "DataLike",
    "Batch",
    "InputSpec",
    "DataSource",
    "input_specs",
    "as_source",
    "random_source",
    "parse_shape_overrides",
    "load_npz",
    "holdout",
    "is_npz_folder",
]

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
DataLike = str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, Any]] | Callable[[], Iterable]
LABELS = "labels"
RANDOM_INPUT_BYTES = 4 << 30  # refuse to draw a random input larger than this (a model declaring huge dims)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch: feeds for the model's data inputs, and labels when the data has them."""

    feeds: Feeds
    labels: np.ndarray | None = None
    count: int | None = None  # samples in this batch when not the first input's axis 0 (a stacked feed: 1)

    @property
    def size(self) -> int:
        if self.count is not None:
            return self.count
        first = next(iter(self.feeds.values()))
        return int(first.shape[0]) if first.ndim else 1


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A data input of the model: name, numpy dtype and shape (``None`` for an unknown dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    @property
    def fixed_batch(self) -> int | None:
        if self.shape and self.shape[0] is not None:
            return self.shape[0]
        return None

    def describe(self) -> str:
        dims = "?" if self.shape is None else graph_io.shape_text(self.shape, "N")
        return f"{self.name} ({self.dtype}, {dims})"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's data inputs (graph inputs that are not initializers)."""
    specs = []
    for value in graph_io.data_inputs(model):
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) and d > 0 else None for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


class DataSource:
    """A re-iterable source of batches for one model.

    A source that reads its batches from files (a folder of ``.npz`` feeds or of images) also has a ``reader``:
    ``reader(start, stop)`` yields batches ``start .. stop-1``, read from the files when iterated, and is
    picklable, so a Ray task reads its own shard by path (:mod:`onnxopt.executor`). ``batch_sizes`` lists the
    samples of every batch when the source knows them up front (arrays and folders).
    """

    def __init__(
        self,
        factory: Callable[[], Iterable[Batch]],
        description: str,
        samples: int | None = None,
        *,
        reader: Callable[[int, int], Iterable[Batch]] | None = None,
        batch_sizes: Sequence[int] | None = None,
    ):
        self._factory = factory
        self.description = description
        self.samples = samples
        self.labels: np.ndarray | None = None  # all labels, when known up front (array data; per pair: pair_labels)
        self.reader = reader
        self.batch_sizes = None if batch_sizes is None else list(batch_sizes)
        self.order: np.ndarray | None = None  # a source read out of order (:func:`reordered`): the sample indices
        self.take: Callable[[np.ndarray], DataSource] | None = None  # array data: the source in another order

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._factory())

    def __repr__(self) -> str:
        return f"DataSource({self.description!r}, samples={self.samples})"

    @property
    def has_labels(self) -> bool:
        first = next(iter(self), None)
        return first is not None and first.labels is not None


def as_source(
    data: DataLike | DataSource,
    model: ir.Model,
    *,
    batch_size: int = 16,
    what: str = "data",
    pair_labels: bool = False,
    labels: bool = True,
) -> DataSource:
    """Turn user data into a :class:`DataSource` checked against ``model``'s inputs.

    With ``pair_labels`` (``--metric spearman``), array data holds one label per *pair* of samples (rows 2k,
    2k+1): the labels are then on ``source.labels`` only, not on the batches. ``labels=False`` reads the inputs
    only and leaves any ``labels`` array out, unchecked (timing needs no labels, and does not know their layout).

    Raises:
        DataError: unreadable file, missing or unknown input names, wrong shapes or dtypes, NaN/Inf.
    """
    if isinstance(data, DataSource):
        return data
    from onnxopt import images  # here, not at the top: images builds on this module (Pillow loads later still)

    if isinstance(data, images.ImageFolder):
        return images.image_source(
            data.path, data.preprocess, model, batch_size=data.batch_size or batch_size, what=what,
            max_batch_bytes=None if data.batch_size else data.max_batch_bytes,
        )  # fmt: skip
    specs = input_specs(model)
    if isinstance(data, str | os.PathLike):
        if is_npz_folder(data):
            return _npz_folder_source(Path(data), specs, what)
        if Path(data).is_dir():
            raise UsageError(
                f"{what} {data} is a folder: to read it as images, give a preprocessing "
                "(--preprocess imagenet, tf, none or key=value items; images.ImageFolder(path, preprocess) in Python)"
            )
        arrays = load_npz(Path(data), what)
        return _array_source(arrays, specs, batch_size, f"{what} {Path(data).name}", pair_labels, labels)
    if isinstance(data, Mapping):
        return _array_source(dict(data), specs, batch_size, f"{what} arrays", pair_labels, labels)
    if callable(data):
        return DataSource(lambda: (_check_feed_dict(f, specs, what) for f in data()), f"{what} callable")
    if isinstance(data, Iterator):
        raise DataError(
            f"{what}: a one-shot iterator/generator cannot be read again after each pass; "
            "pass a list of feed dicts or a callable returning a fresh iterator"
        )
    if isinstance(data, Iterable):
        items = list(data)
        checked = [_check_feed_dict(f, specs, what) for f in items]
        samples = sum(b.size for b in checked)
        return DataSource(lambda: iter(checked), f"{what} feed dicts", samples)
    raise DataError(f"{what}: unsupported data of type {type(data).__name__}")


def random_source(
    model: ir.Model,
    *,
    samples: int = 8,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> DataSource:
    """Seeded random inputs (standard normal floats, small non-negative integers) for models without data."""
    specs = input_specs(model)
    batches: list[Batch] = []
    rng = np.random.default_rng(seed)
    shapes = dict(shapes or {})
    concrete = {}
    for spec in specs:
        concrete[spec.name] = _concrete_shape(spec, shapes.get(spec.name))
        size = int(np.prod(concrete[spec.name], dtype=np.float64)) * max(spec.dtype.itemsize, 8)
        if size > RANDOM_INPUT_BYTES:  # numpy draws in float64 first
            raise DataError(
                f"input '{spec.name}': one random input of shape {graph_io.shape_text(concrete[spec.name])} would take "
                f"{size / 2**30:.3g} GiB; give --data, or --input-shape {spec.name}=... with smaller dims"
            )
    batch = concrete[specs[0].name][0] if specs and concrete[specs[0].name] else 1
    count = max(1, samples // max(batch, 1))
    for _ in range(count):
        feeds = {}
        for spec in specs:
            feeds[spec.name] = _random_array(rng, spec.dtype, concrete[spec.name])
        batches.append(Batch(feeds))
    return DataSource(lambda: iter(batches), f"random inputs (seed {seed})", count * batch)


def missing_shapes(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None) -> list[str]:
    """Why :func:`random_source` cannot make inputs for ``model``: one message per input (empty: it can)."""
    problems = []
    for spec in input_specs(model):
        try:
            _concrete_shape(spec, (shapes or {}).get(spec.name))
        except DataError as e:
            problems.append(str(e))
    return problems


def parse_shape_overrides(text: Sequence[str] | None) -> dict[str, list[int]]:
    """Parse ``name=1,3,224,224`` items (CLI ``--input-shape``)."""
    result: dict[str, list[int]] = {}
    for item in text or ():
        name, sep, dims = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            result[name] = [int(d) for d in dims.replace("x", ",").split(",") if d]
        except ValueError:
            raise DataError(f"--input-shape {item!r}: expected NAME=D0,D1,... (for example x=1,3,224,224)") from None
    return result


def _concrete_shape(spec: InputSpec, override: Sequence[int] | None) -> tuple[int, ...]:
    if override is not None:
        if spec.shape is not None and len(override) != len(spec.shape):
            raise DataError(f"input '{spec.name}': --input-shape has rank {len(override)}, model has {len(spec.shape)}")
        return tuple(int(d) for d in override)
    if spec.shape is None:
        raise DataError(f"input '{spec.name}' has an unknown shape; give --data or --input-shape {spec.name}=...")
    dims = []
    for axis, dim in enumerate(spec.shape):
        if dim is None:
            if axis != 0:
                raise DataError(
                    f"input '{spec.name}' has a dynamic dim {axis}; give --data or --input-shape {spec.name}=..."
                )
            dim = 1
        dims.append(dim)
    return tuple(dims)


def _random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, shape).astype(dtype)
    raise DataError(f"cannot make random inputs of dtype {dtype}; give --data")


def load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{what} {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as e:
        raise DataError(f"{what} {path}: not a readable .npz file ({str(e).splitlines()[0][:200]})") from e
    renamed = {}
    for key, array in arrays.items():
        if key.startswith("output__"):
            continue
        renamed[key.removeprefix("input__")] = array
    if not renamed:
        raise DataError(f"{what} {path}: holds no arrays")
    return renamed


def _array_source(
    arrays: dict[str, np.ndarray],
    specs: Sequence[InputSpec],
    batch_size: int,
    description: str,
    pair_labels: bool = False,
    keep_labels: bool = True,
):
    labels = arrays.pop(LABELS, None)  # arrays: the caller's own copy
    if not keep_labels:
        labels = None
    if labels is not None and np.ndim(labels) == 0 and np.asarray(labels).dtype.kind == "U":
        target = str(labels)
        if target not in arrays:
            raise DataError(f"{description}: 'labels' names '{target}', which is not one of the arrays")
        labels = np.asarray(arrays[target], dtype=np.float32)
    _check_names(arrays.keys(), specs, description)
    if _is_stacked(arrays, specs, description):
        return _stacked_source(arrays, labels, specs, description)
    counts = {name: int(np.asarray(a).shape[0]) if np.ndim(a) else 1 for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{description}: arrays have different sample counts {counts}")
    total = next(iter(counts.values()))
    if total == 0:
        raise DataError(f"{description}: holds no samples")
    if labels is not None:
        labels = np.asarray(labels)
        expected = total // 2 if pair_labels else total
        if pair_labels and total % 2:
            raise DataError(f"{description}: {total} samples is odd, but the metric reads pairs (rows 2k, 2k+1)")
        if np.ndim(labels) == 0 or len(labels) != expected:
            per = f"one per pair of the {total} samples" if pair_labels else f"for {total} samples"
            raise DataError(f"{description}: 'labels' has {np.size(labels)} entries, expected {expected} ({per})")
        if labels.dtype.kind in "fc" and not np.isfinite(labels).all():
            raise DataError(f"{description}: 'labels' contains NaN or Inf values")
    checked = {spec.name: _check_array(arrays[spec.name], spec, description, batch_axis=True) for spec in specs}
    fixed = {spec.fixed_batch for spec in specs if spec.fixed_batch is not None}
    if len(fixed) > 1:
        raise DataError(f"{description}: the model's inputs have different fixed batch sizes {sorted(fixed)}")
    fixed_batch = fixed.pop() if fixed else None
    step = fixed_batch or max(1, int(batch_size))
    if fixed_batch and total < fixed_batch:
        raise DataError(f"{description}: {total} samples, but the model's fixed batch size is {fixed_batch}")
    usable = total - total % fixed_batch if fixed_batch else total
    if usable < total:
        logger.warning("%s: %d samples left over after batches of %d are not used", description, total - usable, step)

    def batches() -> Iterator[Batch]:
        for start in range(0, usable, step):
            stop = min(start + step, usable)
            feeds = {name: array[start:stop] for name, array in checked.items()}
            batch_labels = None if labels is None or pair_labels else np.asarray(labels[start:stop])
            yield Batch(feeds, batch_labels)

    sizes = [min(step, usable - start) for start in range(0, usable, step)]
    source = DataSource(batches, description, usable, batch_sizes=sizes)
    if labels is not None:
        source.labels = labels[: usable // 2] if pair_labels else labels[:usable]
    if not pair_labels:
        source.take = lambda order: _taken(checked, None if labels is None else labels[:usable], order, step, source)
    return source


def reordered(source: DataSource, order: np.ndarray) -> DataSource | None:
    """``source``'s samples in ``order`` (a permutation of its sample indices), in batches of the same sizes, the
    arrays indexed batch by batch (no copy of the whole set); ``source.order`` is ``order``. ``None`` for a source
    that cannot be read out of order: files, callables, stacked feeds, labels per pair of samples."""
    take = getattr(source, "take", None)
    if take is None or len(order) != source.samples:
        return None
    return take(np.asarray(order, dtype=np.int64))


def _taken(
    arrays: Mapping[str, np.ndarray], labels: np.ndarray | None, order: np.ndarray, step: int, source: DataSource
) -> DataSource:
    def batches() -> Iterator[Batch]:
        for start in range(0, len(order), step):
            rows = order[start : start + step]
            yield Batch({name: array[rows] for name, array in arrays.items()}, None if labels is None else labels[rows])

    taken = DataSource(batches, source.description, source.samples, batch_sizes=source.batch_sizes)
    taken.labels = None if labels is None else labels[order]
    taken.order = order
    return taken


def is_npz_folder(path: str | os.PathLike) -> bool:
    """A folder holding ``.npz`` files: one feed per file (a folder of images is :mod:`onnxopt.images`' part)."""
    path = Path(path)
    return path.is_dir() and any(child.suffix == ".npz" and child.is_file() for child in path.iterdir())


def _is_stacked(arrays: Mapping[str, Any], specs: Sequence[InputSpec], description: str) -> bool:
    """Which layout ``arrays`` use: stacked feeds (True) or samples on the batch axis (False).

    Stacked feeds: every array has exactly one axis more than its input's full shape, and axis 0 indexes the
    feed. Samples on the batch axis: every array has its input's rank. Inputs of unknown rank follow the rest.
    """
    extra = {spec.name: np.ndim(arrays[spec.name]) - len(spec.shape) for spec in specs if spec.shape is not None}
    stacked = sorted(name for name, axes in extra.items() if axes == 1)
    if not stacked:
        return False
    flat = sorted(name for name, axes in extra.items() if axes == 0)
    if flat:
        raise DataError(
            f"{description}: {', '.join(map(repr, stacked))} have one axis more than the input (stacked feeds) but "
            f"{', '.join(map(repr, flat))} have the input's own rank (samples on the batch axis): use one layout"
        )
    return True


def _stacked_source(
    arrays: dict[str, np.ndarray], labels: np.ndarray | None, specs: Sequence[InputSpec], description: str
) -> DataSource:
    """One batch per feed: ``{name: array[i]}`` for each index ``i`` of axis 0 (see :func:`_is_stacked`)."""
    counts = {name: int(np.shape(a)[0]) for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{description}: stacked feeds of different counts {counts} (axis 0 indexes the feed)")
    total = next(iter(counts.values()))
    if total == 0:
        raise DataError(f"{description}: holds no feeds")
    if labels is not None and (np.ndim(labels) == 0 or len(labels) != total):
        raise DataError(f"{description}: 'labels' has {np.size(labels)} entries for {total} stacked feeds")
    checked = {}
    for spec in specs:
        stacked_spec = InputSpec(spec.name, spec.dtype, None if spec.shape is None else (None, *spec.shape))
        checked[spec.name] = _check_array(arrays[spec.name], stacked_spec, description, batch_axis=True)

    def batches() -> Iterator[Batch]:
        for index in range(total):
            feeds = {name: array[index, ...] for name, array in checked.items()}  # a 0-d array, not a scalar
            yield Batch(feeds, None if labels is None else np.atleast_1d(labels[index]), count=1)

    return DataSource(batches, f"{description} ({total} stacked feeds)", total)


def _npz_folder_source(folder: Path, specs: Sequence[InputSpec], what: str) -> DataSource:
    """A folder of ``.npz`` files in name order, each one feed keyed by input name (arrays of the full input shape).

    Streamed: only the files' directories are read up front (whether each has ``labels``); iterating reads one
    file at a time, and ``reader`` lets a Ray task read its own files.
    """
    files = sorted(child for child in folder.iterdir() if child.suffix == ".npz" and child.is_file())
    description = f"{what} {folder.name}/ ({len(files)} .npz feeds)"
    has_labels = {_npz_has_labels(path, what) for path in files}
    if len(has_labels) > 1:
        raise DataError(f"{description}: some files have 'labels' and some do not")
    reader = _NpzFeeds(files, folder.name, tuple(specs), what)
    return DataSource(
        lambda: reader(0, len(files)), description, len(files), reader=reader, batch_sizes=[1] * len(files)
    )


@dataclasses.dataclass(frozen=True)
class _NpzFeeds:
    """Feeds ``start .. stop-1`` of a folder of ``.npz`` files, each read and checked when its batch is reached."""

    files: list[Path]
    folder: str
    specs: tuple[InputSpec, ...]
    what: str

    def __call__(self, start: int, stop: int) -> Iterator[Batch]:
        for path in self.files[start:stop]:
            arrays = load_npz(path, self.what)
            labels = arrays.pop(LABELS, None)
            where = f"{self.what} {self.folder}/{path.name}"
            _check_names(arrays.keys(), self.specs, where)
            feeds = {spec.name: _check_array(arrays[spec.name], spec, where, batch_axis=False) for spec in self.specs}
            yield Batch(feeds, None if labels is None else np.atleast_1d(labels), count=1)


def _npz_has_labels(path: Path, what: str) -> bool:
    """Whether an ``.npz`` holds ``labels``, from its zip directory (no array is read)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return LABELS in npz.files
    except Exception as e:
        raise DataError(f"{what} {path}: not a readable .npz file ({str(e).splitlines()[0][:200]})") from e


def holdout(data: DataLike | DataSource, fraction: float, *, unit: int = 1) -> tuple[dict, dict, int, int] | None:
    """Split array data (an ``.npz`` path or a mapping) into a calibration part and its last ``fraction``.

    ``unit`` keeps groups of rows together (2 for sentence pairs, whose labels are one per pair). Returns
    ``(first arrays, last arrays, samples held out, samples in all)``, or ``None`` for data that is not arrays
    (a callable, feed dicts, image folders), which is not split.
    """
    if isinstance(data, str | os.PathLike) and Path(data).is_file():
        arrays = load_npz(Path(data), "data")
    elif isinstance(data, Mapping):
        arrays = dict(data)
    else:
        return None
    labels = arrays.pop(LABELS, None)
    counts = {int(np.asarray(a).shape[0]) for a in arrays.values() if np.ndim(a)}
    if len(counts) != 1:
        return None  # let as_source report the mismatch
    total = counts.pop()
    if labels is not None and np.ndim(labels) and len(labels) != (total // unit if unit > 1 else total):
        return None  # let as_source report the mismatch
    units = total // unit
    held = int(round(units * fraction))
    if units < 2 or held == 0:
        return None
    cut = (units - held) * unit
    first = {k: np.asarray(v)[:cut] for k, v in arrays.items()}
    last = {k: np.asarray(v)[cut : units * unit] for k, v in arrays.items()}
    if labels is not None:
        if np.ndim(labels) == 0:  # the name of an input: split with it
            first[LABELS], last[LABELS] = labels, labels
        else:
            split = cut // unit if unit > 1 else cut
            first[LABELS], last[LABELS] = labels[:split], labels[split : (units if unit > 1 else units * unit)]
    return first, last, units * unit - cut, total


def _check_names(keys: Iterable[str], specs: Sequence[InputSpec], description: str) -> None:
    expected = {spec.name for spec in specs}
    given = set(keys)
    missing = sorted(expected - given)
    unknown = sorted(given - expected)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"no array for input {', '.join(repr(m) for m in missing)}")
        if unknown:
            parts.append(f"unknown name {', '.join(repr(u) for u in unknown)}")
        wanted = ", ".join(spec.describe() for spec in specs)
        raise DataError(f"{description}: {'; '.join(parts)} (the model takes {wanted})")


def _check_array(array: Any, spec: InputSpec, description: str, *, batch_axis: bool) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != spec.dtype:
        if array.dtype.kind in "OUSV" or not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
            raise DataError(
                f"{description}: input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}"
            )
        array = array.astype(spec.dtype)
    if spec.shape is not None:
        dims = list(spec.shape)
        actual = list(array.shape)
        if batch_axis and dims:
            dims[0] = None
        if len(actual) != len(dims) or any(d is not None and d != a for d, a in zip(dims, actual, strict=False)):
            expected = graph_io.shape_text(dims, "N")
            raise DataError(
                f"{description}: input '{spec.name}' has shape {graph_io.shape_text(actual)}, "
                f"the model expects {expected}"
            )
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise DataError(f"{description}: input '{spec.name}' contains NaN or Inf values")
    return np.ascontiguousarray(array)


def _check_feed_dict(item: Mapping[str, Any], specs: Sequence[InputSpec], what: str) -> Batch:
    if not isinstance(item, Mapping):
        raise DataError(f"{what}: expected feed dicts {{input name: array}}, got {type(item).__name__}")
    feeds = dict(item)
    labels = feeds.pop(LABELS, None)
    _check_names(feeds.keys(), specs, what)
    checked = {spec.name: _check_array(feeds[spec.name], spec, what, batch_axis=False) for spec in specs}
    return Batch(checked, None if labels is None else np.asarray(labels))
