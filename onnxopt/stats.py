"""Activation statistics: streaming per-channel reductions and input Gram matrices, collected with onnxruntime.

How it works (as onnxruntime's calibrator and torch.ao's observers do):

1. On a clone of the model, the requested intermediate values are added as graph outputs.
2. The clone runs in onnxruntime (``ORT_DISABLE_ALL``) over the calibration batches.
3. Each batch is folded into fixed-size state, so memory does not grow with the sample count:

   - :class:`ChannelReducer`: per channel (axis 1 by default, the NCHW / (N, features) channel axis)
     count, zeros (APoZ = zeros / count), positives, sum, sum of ``|x|``, sum of ``x²``, min, max;
   - :class:`GramReducer`: for a Gemm/MatMul, ``XᵀX`` and ``ΣX`` of its input rows; for a Conv, the same
     over the unfolded input patches (im2col rows of length ``C·kh·kw``, in the weight's layout
     ``W.reshape(M, -1)``), which data-aware factorization and re-fitting need.

4. Derived numbers (means, APoZ, variance) are computed from the state by :class:`ChannelStats`.

Passes read the result from ``model.meta[STATS_KEY]``; the pass manager invalidates it after any pass
that changed the model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx_ir as ir

from onnxopt.data import DataSource
from onnxopt.errors import CalibrationError
from onnxopt.runtime import Session

if TYPE_CHECKING:
    from onnxopt.executor import Executor

__all__ = [
    "STATS_KEY",
    "ChannelStats",
    "GramStats",
    "StatsRequest",
    "StatsTable",
    "ChannelReducer",
    "GramReducer",
    "collect_stats",
    "attach_stats",
    "get_stats",
    "unfold_conv_input",
    "conv_patches",
    "conv_pads",
]

logger = logging.getLogger(__name__)

STATS_KEY = "onnxopt.stats"
# Per batch, unfold at most this many patch rows at a time (bounds the im2col buffer).
_UNFOLD_CHUNK_ELEMENTS = 8_000_000


@dataclasses.dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one value; every array has shape ``(C,)``.

    ``count`` is the number of elements folded per channel (samples × spatial positions).
    """

    samples: int
    count: int
    zero_frac: np.ndarray
    pos_frac: np.ndarray
    mean: np.ndarray
    abs_mean: np.ndarray
    sq_mean: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @property
    def apoz(self) -> np.ndarray:
        """Average percentage of zeros (as a fraction in [0, 1]), the APoZ paper's criterion."""
        return self.zero_frac

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sq_mean - self.mean**2, 0.0)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])


@dataclasses.dataclass(frozen=True)
class GramStats:
    """Second moments of a layer's input rows: ``xtx = Σ xᵀx`` (K×K), ``sum = Σ x`` (K), over ``rows`` rows."""

    rows: int
    xtx: np.ndarray
    sum: np.ndarray

    @property
    def second_moment(self) -> np.ndarray:
        """``E[xᵀx]``, the matrix data-aware SVD whitens with."""
        return self.xtx / max(self.rows, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.rows, 1)


@dataclasses.dataclass(frozen=True)
class StatsRequest:
    """What a pass needs: channel statistics of these values, Gram matrices of these nodes' inputs.

    ``axes`` gives ``(value, channel axis)`` for values whose channels are not on the collector's default axis
    (a transformer's ``(batch, sequence, features)`` activations: ``-1``).
    """

    values: frozenset[str] = frozenset()
    grams: frozenset[str] = frozenset()
    axes: frozenset[tuple[str, int]] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.values or self.grams)

    def __or__(self, other: StatsRequest) -> StatsRequest:
        return StatsRequest(self.values | other.values, self.grams | other.grams, self.axes | other.axes)


@dataclasses.dataclass
class StatsTable:
    """Results keyed by value name (channel stats) and node name (Gram matrices)."""

    samples: int
    source: str
    channels: dict[str, ChannelStats] = dataclasses.field(default_factory=dict)
    grams: dict[str, GramStats] = dataclasses.field(default_factory=dict)

    def missing(self, request: StatsRequest) -> StatsRequest:
        return StatsRequest(request.values - self.channels.keys(), request.grams - self.grams.keys(), request.axes)

    def merge(self, other: StatsTable) -> None:
        self.channels.update(other.channels)
        self.grams.update(other.grams)


class ChannelReducer:
    """Folds batches of one value into fixed-size per-channel state."""

    def __init__(self, name: str, channel_axis: int = 1) -> None:
        self.name = name
        self.channel_axis = channel_axis
        self.samples = 0
        self.count = 0
        self._state: dict[str, np.ndarray] | None = None

    def update(self, batch: np.ndarray) -> None:
        array = np.asarray(batch)
        if array.ndim == 0:
            array = array.reshape(1, 1)
        elif array.ndim == 1:
            array = array.reshape(1, -1)
        axis = self.channel_axis if self.channel_axis < array.ndim else array.ndim - 1
        # (before, C, after): a view of a contiguous array, reduced over axes 0 and 2 without a float64 copy of it
        # (sums accumulate in float64; squares are taken in the array's own precision)
        channels = array.shape[axis]
        flat = np.ascontiguousarray(array).reshape(int(np.prod(array.shape[:axis])), channels, -1)
        if flat.dtype not in (np.float32, np.float64):  # integers, and float16 whose squares overflow
            flat = flat.astype(np.float64)
        over = (0, 2)
        if self._state is None:
            self._state = {
                "zeros": np.zeros(channels),
                "pos": np.zeros(channels),
                "sum": np.zeros(channels),
                "abs": np.zeros(channels),
                "sq": np.zeros(channels),
                "min": np.full(channels, np.inf),
                "max": np.full(channels, -np.inf),
            }
        elif self._state["sum"].shape[0] != channels:
            raise CalibrationError(
                f"value '{self.name}': {channels} channels in one batch, {self._state['sum'].shape[0]} before"
            )
        state = self._state
        state["zeros"] += np.count_nonzero(flat == 0, axis=over)
        state["pos"] += np.count_nonzero(flat > 0, axis=over)
        state["sum"] += flat.sum(axis=over, dtype=np.float64)
        state["abs"] += np.abs(flat).sum(axis=over, dtype=np.float64)
        state["sq"] += np.square(flat).sum(axis=over, dtype=np.float64)
        if flat.shape[0] * flat.shape[2]:
            np.minimum(state["min"], flat.min(axis=over), out=state["min"])
            np.maximum(state["max"], flat.max(axis=over), out=state["max"])
        self.samples += array.shape[0] if axis != 0 else 1
        self.count += flat.shape[0] * flat.shape[2]

    def merge(self, other: ChannelReducer) -> None:
        """Fold ``other``'s state (the same value over other batches) into this one: sums add, extremes combine."""
        if other._state is not None:
            if self._state is None:
                self._state = {key: array.copy() for key, array in other._state.items()}
            elif self._state["sum"].shape != other._state["sum"].shape:
                raise CalibrationError(
                    f"value '{self.name}': {other._state['sum'].shape[0]} channels in one part, "
                    f"{self._state['sum'].shape[0]} in another"
                )
            else:
                for key in ("zeros", "pos", "sum", "abs", "sq"):
                    self._state[key] += other._state[key]
                np.minimum(self._state["min"], other._state["min"], out=self._state["min"])
                np.maximum(self._state["max"], other._state["max"], out=self._state["max"])
        self.samples += other.samples
        self.count += other.count

    def result(self) -> ChannelStats:
        if self._state is None or self.count == 0:
            raise CalibrationError(f"value '{self.name}': no data was collected")
        s, n = self._state, float(self.count)
        return ChannelStats(
            samples=self.samples,
            count=self.count,
            zero_frac=s["zeros"] / n,
            pos_frac=s["pos"] / n,
            mean=s["sum"] / n,
            abs_mean=s["abs"] / n,
            sq_mean=s["sq"] / n,
            min=s["min"].copy(),
            max=s["max"].copy(),
        )


class GramReducer:
    """Accumulates ``XᵀX`` of a Gemm/MatMul input or of a Conv's unfolded input patches."""

    SUPPORTED: ClassVar[frozenset[str]] = frozenset({"Gemm", "MatMul", "Conv"})

    def __init__(self, node: ir.Node) -> None:
        if node.op_type not in self.SUPPORTED or node.domain not in ("", "ai.onnx"):
            raise CalibrationError(f"node '{node.name}': Gram matrices are collected for Gemm, MatMul and Conv only")
        self.node_name = node.name
        self.op_type = node.op_type
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        self.attrs = attrs
        if self.op_type == "Conv" and attrs.get("group", 1) != 1:
            raise CalibrationError(f"node '{node.name}': Gram matrices of grouped convolutions are not supported")
        weight = node.inputs[1]
        self.kernel_shape = None
        if self.op_type == "Conv":
            if weight is None or weight.shape is None or not all(isinstance(d, int) for d in weight.shape):
                raise CalibrationError(f"node '{node.name}': the Conv weight shape is unknown")
            self.kernel_shape = tuple(weight.shape[2:])
        self.rows = 0
        self._xtx: np.ndarray | None = None
        self._sum: np.ndarray | None = None

    def update(self, batch: np.ndarray) -> None:
        x = np.asarray(batch, dtype=np.float64)
        if self.op_type == "Conv":
            for sample in x:
                for rows in unfold_conv_input(sample[None], self.kernel_shape, self.attrs):
                    self._fold(rows)
            return
        if self.op_type == "Gemm" and self.attrs.get("transA", 0):
            x = x.T
        self._fold(x.reshape(-1, x.shape[-1]))

    def _fold(self, rows: np.ndarray) -> None:
        if self._xtx is None:
            k = rows.shape[1]
            self._xtx = np.zeros((k, k))
            self._sum = np.zeros(k)
        self._xtx += rows.T @ rows
        self._sum += rows.sum(axis=0)
        self.rows += rows.shape[0]

    def merge(self, other: GramReducer) -> None:
        """Fold ``other``'s state (the same node over other batches) into this one: the matrices and sums add."""
        if other._xtx is not None:
            if self._xtx is None:
                self._xtx, self._sum = other._xtx.copy(), other._sum.copy()
            elif self._xtx.shape != other._xtx.shape:
                raise CalibrationError(f"node '{self.node_name}': input rows of different lengths in two parts")
            else:
                self._xtx += other._xtx
                self._sum += other._sum
        self.rows += other.rows

    def result(self) -> GramStats:
        if self._xtx is None:
            raise CalibrationError(f"node '{self.node_name}': no data was collected")
        return GramStats(self.rows, self._xtx.copy(), self._sum.copy())


def unfold_conv_input(
    x: np.ndarray, kernel_shape: tuple[int, ...], attrs: Mapping[str, object]
) -> Iterable[np.ndarray]:
    """Yield the im2col rows of ``x`` (N, C, *spatial) for a Conv, in chunks.

    Each row has length ``C·prod(kernel_shape)`` ordered like ``W.reshape(M, -1)``, so ``rows @ W.T``
    reproduces the convolution (without bias) for group 1.
    """
    patches = conv_patches(x, kernel_shape, attrs)
    n, c = x.shape[:2]
    out = patches.shape[1 : len(x.shape) - 1]
    row_len = c * int(np.prod(kernel_shape))
    per_out_row = row_len * int(np.prod(out[1:]))
    step = max(1, _UNFOLD_CHUNK_ELEMENTS // max(per_out_row, 1))
    for i in range(n):
        for start in range(0, out[0], step):
            yield np.ascontiguousarray(patches[i, start : start + step]).reshape(-1, row_len)


def conv_patches(x: np.ndarray, kernel_shape: tuple[int, ...], attrs: Mapping[str, object]) -> np.ndarray:
    """The im2col patches of ``x`` (N, C, *spatial) for a Conv as a strided view (N, *out, C, *kernel), nothing copied:
    ``view[n, *position].reshape(-1)`` is the row of :func:`unfold_conv_input` for that output position."""
    spatial = x.shape[2:]
    rank = len(spatial)
    strides = list(attrs.get("strides") or [1] * rank)
    dilations = list(attrs.get("dilations") or [1] * rank)
    pads = conv_pads(spatial, kernel_shape, strides, dilations, attrs)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + rank]) for i in range(rank)]) if any(pads) else x
    extent = [d * (k - 1) + 1 for k, d in zip(kernel_shape, dilations, strict=True)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, extent, axis=tuple(range(2, 2 + rank)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, d) for d in dilations)
    windows = windows[index]  # (N, C, *out, *kernel)
    order = (0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
    return windows.transpose(order)


def conv_pads(spatial, kernel_shape, strides, dilations, attrs) -> list[int]:
    """Explicit ``[begin..., end...]`` pads of a Conv, resolving ``auto_pad`` from the input's spatial size."""
    rank = len(spatial)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel_shape, strides, dilations, strict=True):
            out = -(-size // s)
            total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        return begins + ends
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    return list(attrs.get("pads") or [0] * (2 * rank))


def collect_stats(
    model: ir.Model,
    data: DataSource,
    request: StatsRequest,
    *,
    channel_axis: int = 1,
    progress: Callable[[int, int | None], None] | None = None,
    executor: Executor | None = None,
) -> StatsTable:
    """Run ``model`` over ``data`` and reduce the requested values and Gram matrices.

    With an ``executor`` (:mod:`onnxopt.executor`, e.g. Ray), the batches are folded in shards, each into fresh
    reducers, and the shards' reducers merged in batch order; ``None`` folds them all here.

    Raises:
        CalibrationError: a requested value or node does not exist, or no batch arrived.
    """
    graph = model.graph
    values = _values_by_name(graph)
    nodes = {node.name: node for node in graph}
    channel_reducers = {}
    for name in sorted(request.values):
        if name not in values:
            raise CalibrationError(f"value '{name}' is not in the graph")
        channel_reducers[name] = ChannelReducer(name, dict(request.axes).get(name, channel_axis))
    gram_reducers: dict[str, tuple[str, GramReducer]] = {}
    for node_name in sorted(request.grams):
        node = nodes.get(node_name)
        if node is None:
            raise CalibrationError(f"node '{node_name}' is not in the graph")
        if node.inputs[0] is None or not node.inputs[0].name:
            raise CalibrationError(f"node '{node_name}' has no named data input")
        gram_reducers[node_name] = (node.inputs[0].name, GramReducer(node))
    needed = set(channel_reducers) | {value_name for value_name, _ in gram_reducers.values()}
    input_names = {v.name for v in graph.inputs}
    exposed = sorted(needed - input_names)

    if executor is not None:
        samples = _collect_sharded(
            executor,
            expose(model, exposed) if exposed else model,
            data,
            progress,
            (exposed, needed, input_names, channel_reducers, gram_reducers),
        )
    else:
        session = Session(expose(model, exposed)) if exposed else None
        samples = 0
        for batch in data:
            _fold_batch(batch, session, exposed, needed, input_names, channel_reducers, gram_reducers)
            samples += batch.size
            if progress is not None:
                progress(samples, data.samples)
    if samples == 0:
        raise CalibrationError(f"no calibration batch arrived from {data.description}")
    table = StatsTable(samples=samples, source=data.description)
    table.channels = {name: r.result() for name, r in channel_reducers.items()}
    table.grams = {name: r.result() for name, (_, r) in gram_reducers.items()}
    logger.info(
        "statistics: %d values, %d Gram matrices over %d samples", len(table.channels), len(table.grams), samples
    )
    return table


def _fold_batch(batch, session, exposed, needed, input_names, channel_reducers, gram_reducers) -> None:
    """Run one batch and fold the requested values into the reducers."""
    outputs = session.run(batch.feeds, exposed) if session is not None else {}
    outputs.update({name: batch.feeds[name] for name in needed & input_names})
    for name, reducer in channel_reducers.items():
        reducer.update(outputs[name])
    for value_name, reducer in gram_reducers.values():
        reducer.update(outputs[value_name])


def _stats_shard(session: Session, batches, init_args) -> tuple[int, dict, dict]:
    """An executor's shard: fold ``batches`` into the (fresh, unshared) reducers of ``init_args``."""
    exposed, needed, input_names, channel_reducers, gram_reducers = init_args
    samples = 0
    for batch in batches:
        _fold_batch(batch, session if exposed else None, exposed, needed, input_names, channel_reducers, gram_reducers)
        samples += batch.size
    return samples, channel_reducers, gram_reducers


def _collect_sharded(executor: Executor, model: ir.Model, data: DataSource, progress, init_args) -> int:
    """Fold ``data`` in the executor's shards and merge each shard's reducers, in batch order, into ``init_args``'."""
    _, _, _, channel_reducers, gram_reducers = init_args
    samples = 0
    for shard_samples, shard_channels, shard_grams in executor.map_batches(
        model, data, _stats_shard, init_args, progress=progress
    ):
        samples += shard_samples
        for name, reducer in channel_reducers.items():
            reducer.merge(shard_channels[name])
        for name, (_, reducer) in gram_reducers.items():
            reducer.merge(shard_grams[name][1])
    return samples


def attach_stats(model: ir.Model, table: StatsTable) -> None:
    """Store ``table`` in ``model.meta`` where passes look for it, merging with valid earlier results."""
    existing = get_stats(model)
    if existing is not None and existing is not table:
        existing.merge(table)
        table = existing
    model.meta[STATS_KEY] = table


def get_stats(model: ir.Model) -> StatsTable | None:
    """The model's current statistics, or ``None`` when absent or invalidated."""
    if STATS_KEY in model.meta and model.meta.is_valid(STATS_KEY):
        return model.meta[STATS_KEY]
    return None


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        for output in node.outputs:
            if output.name:
                values[output.name] = output
    return values


def expose(model: ir.Model, names: list[str]) -> ir.Model:
    """A clone of ``model`` with ``names`` added as graph outputs (types inferred where missing)."""
    exposed = model.clone()
    values = _values_by_name(exposed.graph)
    if any(values[name].dtype is None for name in names):
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass(strict_mode=False)(exposed)
        values = _values_by_name(exposed.graph)
    outputs = {v.name for v in exposed.graph.outputs}
    for name in names:
        value = values[name]
        if value.dtype is None:
            raise CalibrationError(f"value '{name}': its type cannot be inferred, so it cannot be exposed")
        if name not in outputs:
            exposed.graph.outputs.append(value)
    return exposed
