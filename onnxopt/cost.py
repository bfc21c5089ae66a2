"""Cost model: parameters, multiply-accumulates (MACs) and other ops per node, and file bytes.

Shapes come from ONNX shape inference on a clone whose dynamic input dims are fixed (batch 1 unless
given); those it leaves unknown (computed at run time, or after onnxruntime's com.microsoft ops such as
``QLinearAdd`` or ``FusedConv``, which it does not type) are measured by one onnxruntime run.
MACs, one multiply plus one add each, as the ResNet paper counts "multiply-adds":

- ``Conv``: ``numel(Y) · (C_in / group) · prod(kernel)``  (from the weight, shape (M, C/group, *k));
- ``ConvTranspose``: ``numel(X) · (M / group) · prod(kernel)`` (weight (C, M/group, *k));
- ``Gemm``/``MatMul``: ``numel(Y) · K``, K the reduced dimension; ``MatMulNBits`` from its ``K`` attribute;
  the quantized forms (``ConvInteger``, ``QLinearConv``, ``MatMulInteger``, ``QLinearMatMul``) and
  onnxruntime's fused ones (``FusedConv``, ``FusedGemm``, ``FusedMatMul``, ...) likewise, so an int8 layer
  counts the float layer's MACs (QDQ: the float ``Conv`` between its Dequantize/QuantizeLinear);
- ``LSTM``/``GRU``/``RNN``: ``seq · batch · directions · gates·hidden · (input + hidden)``;
- onnxruntime's ``Attention``/``QAttention`` (``fuse``): the Q/K/V projections plus ``QKᵀ`` and ``softmax·V``.

Every other computing node counts ``numel`` of its first output as ``ops`` (elementwise work: BatchNorm,
activations, Add, pools per output), and data-movement nodes (Reshape, Transpose, Concat, ...) count
nothing. Parameters are the elements of floating-point and 8/4-bit integer constant inputs (initializers,
also when listed as graph inputs, and ``Constant``/``ConstantOfShape`` outputs), each counted once per model.

Control flow: the subgraphs of ``If``, ``Loop`` and ``Scan`` are counted, their cost reported on the node
that holds them (with a ``note`` saying how): ``If`` counts the parameters of both branches (both are in
the file) and the MACs of the larger branch; ``Loop`` counts its body once per iteration when the trip
count is a constant, ``Scan`` once per element of its scan axis when that length is known; otherwise the
body is counted once and the total is *partial*.

A count is partial when a node that does multiply-accumulate work could not be counted (an unknown shape,
an op whose MACs are not modelled, a loop of unknown length): :attr:`ModelCost.uncounted` lists them and
:attr:`ModelCost.macs_partial` says so. Count dynamic models at concrete shapes (``input_shapes``, for
example from :func:`shapes_from_feeds`), and the before/after of one run at the same shapes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io

__all__ = ["NodeCost", "Uncounted", "ModelCost", "estimate", "shapes_from_feeds", "describe_shapes"]

logger = logging.getLogger(__name__)

_MOVEMENT_OPS = frozenset(
    {
        "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Shape", "Size", "Constant",
        "ConstantOfShape", "Gather", "GatherElements", "GatherND", "Concat", "Split", "Slice", "Cast", "Pad",
        "Dropout", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Range", "NonZero", "ScatterND",
        "QuantizeLinear", "DequantizeLinear",
    }
)  # fmt: skip
# op -> (index of the weight input, index of the data input)
_CONV_LIKE = {"Conv": (1, 0), "ConvInteger": (1, 0), "QLinearConv": (3, 0), "FusedConv": (1, 0), "NhwcConv": (1, 0)}
_MATMUL_LIKE = frozenset(
    {"MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "FusedMatMul", "FusedGemm", "QGemm", "MatMulIntegerToFloat",
     "DynamicQuantizeMatMul"}
)  # fmt: skip
_RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# ops that multiply-accumulate but whose MACs this model does not compute: a count with them is partial
_UNMODELLED = frozenset(
    {"Einsum", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
     "PackedMultiHeadAttention", "DecoderAttention", "DecoderMaskedMultiHeadAttention", "LongformerAttention",
     "SparseAttention", "QOrderedAttention", "DynamicQuantizeLSTM"}
)  # fmt: skip
_ATTENTION = frozenset({"Attention", "QAttention"})  # onnxruntime's fused self-attention (``fuse``), float or int8
_MAC_OPS = frozenset(_CONV_LIKE) | _MATMUL_LIKE | {"ConvTranspose", "MatMulNBits"} | frozenset(_RECURRENT_GATES)

Shapes = Mapping[int, tuple[int, ...] | None]


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """Cost of one node (for ``If``/``Loop``/``Scan``: of its subgraphs, as ``note`` says)."""

    name: str
    op_type: str
    params: int
    macs: int
    ops: int
    output_shape: tuple[int, ...] | None
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class Uncounted:
    """A node whose MACs are missing from the total (or counted only in part), and why.

    ``node`` is the node's name, prefixed with the names of the nodes and attributes holding it when it
    sits in a subgraph (``loop/body/matmul``).
    """

    node: str
    op_type: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Per-node costs and model totals. ``params`` counts each shared weight once.

    ``input_shapes`` are the concrete input shapes counted at (an unknown dim stays ``None``); ``uncounted``
    lists what the MAC total leaves out, making it partial.
    """

    nodes: tuple[NodeCost, ...]
    params: int
    macs: int
    ops: int
    bytes: int
    weight_bytes: int
    input_shapes: Mapping[str, tuple[int | None, ...] | None] = dataclasses.field(default_factory=dict)
    uncounted: tuple[Uncounted, ...] = ()

    @property
    def macs_partial(self) -> bool:
        """True when :attr:`macs` leaves out work it could not count (see :attr:`uncounted`)."""
        return bool(self.uncounted)

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "macs": self.macs,
            "ops": self.ops,
            "bytes": self.bytes,
            "macs_partial": self.macs_partial,
            "uncounted": [dataclasses.asdict(u) for u in self.uncounted],
            "input_shapes": {k: None if v is None else list(v) for k, v in self.input_shapes.items()},
        }


def estimate(
    model: ir.Model,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
) -> ModelCost:
    """Cost of ``model`` with dynamic input dims fixed (``input_shapes`` first, then ``batch`` for axis 0).

    Args:
        model: the model; not changed (shapes are inferred on a clone).
        input_shapes: concrete shapes of data inputs, by name (from :func:`shapes_from_feeds` to count at
            the data's shapes); an input left out keeps its declared dims.
        batch: the size of a dynamic axis 0 of an input not in ``input_shapes``.

    Returns:
        Per-node costs and totals, with the input shapes counted at and what could not be counted
        (:attr:`ModelCost.uncounted`): a dim that stays unknown leaves the MACs it governs out.
    """
    shapes = _infer_shapes(model, dict(input_shapes or {}), batch)
    counter = _Counter(shapes, _weight_values(model))
    nodes = counter.graph(model.graph, prefix="")
    used = {
        name: None if dims is None else tuple(dims) for name, dims in _input_dims(model, input_shapes, batch).items()
    }
    return ModelCost(
        nodes=tuple(nodes),
        params=counter.total_params,
        macs=sum(n.macs for n in nodes),
        ops=sum(n.ops for n in nodes),
        bytes=graph_io.to_proto(model).ByteSize(),
        weight_bytes=graph_io.weight_bytes(model),
        input_shapes=used,
        uncounted=tuple(counter.uncounted),
    )


def shapes_from_feeds(
    model: ir.Model, feeds: Mapping[str, np.ndarray], *, per_sample: bool = True
) -> dict[str, list[int]]:
    """Concrete input shapes of a batch of ``feeds``, for :func:`estimate`.

    With ``per_sample``, axis 0 becomes 1 where the model's input declares a dynamic (or unknown) batch
    axis, so the count is per sample, as ``onnxopt inspect`` counts at batch 1; a fixed batch stays, as
    in ``inspect``. Other axes (sequence length, image size) are the data's.
    """
    declared = {v.name: v.shape for v in graph_io.data_inputs(model)}
    result: dict[str, list[int]] = {}
    for name, array in feeds.items():
        if name not in declared:
            continue
        dims = [int(d) for d in np.shape(array)]
        shape = declared[name]
        fixed_batch = shape is not None and len(shape) > 0 and isinstance(shape[0], int) and shape[0] > 0
        if per_sample and dims and not fixed_batch:
            dims[0] = 1
        result[name] = dims
    return result


def describe_shapes(shapes: Mapping[str, Sequence[int | None] | None]) -> str:
    """``input_ids=1x64, attention_mask=1x64`` (``?`` for an unknown dim or shape)."""
    parts = []
    for name, dims in shapes.items():
        text = "?" if dims is None else graph_io.shape_text(dims) or "scalar"
        parts.append(f"{name}={text}")
    return ", ".join(parts)


class _Counter:
    """Walks a graph and its subgraphs, summing per-node costs and recording what it could not count."""

    def __init__(self, shapes: Shapes, weights: set[int]):
        self.shapes = shapes
        self.weights = weights
        self.counted: set[int] = set()
        self.total_params = 0
        self.uncounted: list[Uncounted] = []
        self._readers: list[set[int]] = []  # weights read inside each control-flow node being walked

    def graph(self, graph: ir.Graph, prefix: str) -> list[NodeCost]:
        nodes = []
        for index, node in enumerate(graph):
            name = node.name or f"{node.op_type}_{index}"
            subgraphs = _subgraphs(node)
            if subgraphs:
                nodes.append(self._control_flow(node, name, prefix, subgraphs))
                continue
            params = self._params(node)
            macs, ops, reason = _node_work(node, self.shapes)
            if reason is not None:
                self.uncounted.append(Uncounted(prefix + name, node.op_type, reason))
            out_shape = self.shapes.get(id(node.outputs[0])) if node.outputs else None
            nodes.append(NodeCost(node.name or "", node.op_type, params, macs, ops, out_shape))
        return nodes

    def _params(self, node: ir.Node) -> int:
        params = 0
        for value in node.inputs:
            if value is None or id(value) not in self.weights:
                continue
            numel = _numel(self.shapes.get(id(value)))
            params += numel
            for reader in self._readers:
                reader.add(id(value))
            if id(value) not in self.counted:
                self.counted.add(id(value))
                self.total_params += numel
        return params

    def _control_flow(self, node: ir.Node, name: str, prefix: str, subgraphs: list[tuple[str, ir.Graph]]) -> NodeCost:
        read: set[int] = set()  # every weight read by the node and its subgraphs, each counted once
        self._readers.append(read)
        try:
            self._params(node)
            bodies = []
            for label, subgraph in subgraphs:
                inner = self.graph(subgraph, f"{prefix}{name}/{label}/")
                bodies.append((label, sum(n.macs for n in inner), sum(n.ops for n in inner)))
        finally:
            self._readers.pop()
        params = sum(_numel(self.shapes.get(i)) for i in read)
        op = node.op_type
        out_shape = self.shapes.get(id(node.outputs[0])) if node.outputs else None
        if op == "If" and len(bodies) > 1:
            label, macs, ops = max(bodies, key=lambda b: (b[1], b[2]))
            others = ", ".join(f"{b[0]} {b[1]:,}" for b in bodies if b[0] != label)
            note = f"MACs of the larger branch, {label} (other: {others} MACs); parameters of both"
            return NodeCost(node.name or "", op, params, macs, ops, out_shape, note)
        macs, ops = sum(b[1] for b in bodies), sum(b[2] for b in bodies)
        if op in ("Loop", "Scan"):
            trips, why = _loop_trips(node, self.shapes) if op == "Loop" else _scan_trips(node, self.shapes)
            if trips is not None:
                return NodeCost(
                    node.name or "", op, params, macs * trips, ops * trips, out_shape, f"body x {trips} {why}"
                )
            if macs or any(u.node.startswith(f"{prefix}{name}/") for u in self.uncounted):
                self.uncounted.append(Uncounted(prefix + name, op, f"{why}: body counted once"))
            return NodeCost(node.name or "", op, params, macs, ops, out_shape, f"body counted once ({why})")
        note = f"its {len(bodies)} subgraph(s) counted once each"
        return NodeCost(node.name or "", op, params, macs, ops, out_shape, note)


def _subgraphs(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    found = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            found.append((attr.name, attr.as_graph()))
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend((f"{attr.name}[{i}]", g) for i, g in enumerate(attr.as_graphs()))
    return found


def _loop_trips(node: ir.Node, shapes: Shapes) -> tuple[int | None, str]:
    trip = node.inputs[0] if node.inputs else None
    value = _constant(trip)
    if value is None or value.size != 1:
        return None, "trip count not a constant"
    cond = node.inputs[1] if len(node.inputs) > 1 else None
    early = "" if cond is None else " (at most: its condition may end the loop earlier)"
    return int(value.reshape(())), f"iterations, the constant trip count{early}"


def _scan_trips(node: ir.Node, shapes: Shapes) -> tuple[int | None, str]:
    count = node.attributes.get("num_scan_inputs")
    if count is None or count.as_int() < 1:
        return None, "scan length unknown"
    first = len(node.inputs) - count.as_int()
    shape = shapes.get(id(node.inputs[first])) if 0 <= first < len(node.inputs) and node.inputs[first] else None
    axes = node.attributes.get("scan_input_axes")
    axis = axes.as_ints()[0] if axes is not None and axes.as_ints() else 0
    if shape is None or not -len(shape) <= axis < len(shape):
        return None, "scan length unknown"
    return shape[axis], "iterations, the length of the scanned axis"


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return np.asarray(attr.as_tensor().numpy())
    return None


def _node_work(node: ir.Node, shapes: Shapes) -> tuple[int, int, str | None]:
    """``(macs, ops, reason)``; ``reason`` says why a node that multiply-accumulates could not be counted."""

    def shape_of(index: int) -> tuple[int, ...] | None:
        if index >= len(node.inputs) or node.inputs[index] is None:
            return None
        return shapes.get(id(node.inputs[index]))

    unknown = "unknown shapes"
    out = shapes.get(id(node.outputs[0])) if node.outputs else None
    op = node.op_type
    if op in _CONV_LIKE:
        weight = shape_of(_CONV_LIKE[op][0])
        if weight is None or out is None or len(weight) < 2:
            return 0, 0, unknown
        return _numel(out) * weight[1] * math.prod(weight[2:]), 0, None
    if op == "ConvTranspose":
        weight, x = shape_of(1), shape_of(0)
        if weight is None or x is None:
            return 0, 0, unknown
        return _numel(x) * weight[1] * math.prod(weight[2:]), 0, None
    if op in _MATMUL_LIKE:
        a = shape_of(0)
        if a is None or out is None or not a:
            return 0, 0, unknown
        trans_a = node.attributes.get("transA") if op in ("Gemm", "FusedGemm", "QGemm") else None
        k = a[0] if trans_a is not None and trans_a.value else a[-1]
        return _numel(out) * k, 0, None
    if op == "MatMulNBits":
        k_attr = node.attributes.get("K")
        if out is None or k_attr is None:
            return 0, 0, unknown
        return _numel(out) * int(k_attr.value), 0, None
    if op in _RECURRENT_GATES:
        x, w, r = shape_of(0), shape_of(1), shape_of(2)
        if x is None or w is None or r is None or len(x) != 3 or len(w) != 3 or len(r) != 3:
            return 0, 0, unknown
        layout = node.attributes.get("layout")
        seq, batch = (x[1], x[0]) if layout is not None and layout.value == 1 else (x[0], x[1])
        return seq * batch * w[0] * w[1] * (w[2] + r[2]), 0, None
    if op in _ATTENTION:
        return _attention_macs(node, shape_of(0), shape_of(1))
    if op in _UNMODELLED:
        return 0, _numel(out), f"MACs of {op} are not modelled"
    if op in _MOVEMENT_OPS or out is None:
        return 0, 0, None
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = node.attributes.get("kernel_shape")
        return 0, _numel(out) * (math.prod(kernel.value) if kernel is not None else 1), None
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        x = shape_of(0)
        return 0, _numel(x) if x is not None else _numel(out), None
    return 0, _numel(out), None


def _attention_macs(
    node: ir.Node, x: tuple[int, ...] | None, weight: tuple[int, ...] | None
) -> tuple[int, int, str | None]:
    """onnxruntime's ``Attention``/``QAttention`` on x ``[batch, seq, hidden]`` with weight ``[hidden, Q+K+V]``: the
    Q/K/V projections ``batch·seq·hidden·(Q+K+V)``, then per head ``QKᵀ`` and ``softmax·V``, ``batch·seq²·(Q+V)``
    (Q, K, V widths from ``qkv_hidden_sizes``, else a third of the weight each). Past state is not modelled."""
    if x is None or weight is None or len(x) != 3 or len(weight) != 2:
        return 0, 0, "unknown shapes"
    sizes = node.attributes.get("qkv_hidden_sizes")
    q, _, v = (int(s) for s in sizes.value) if sizes is not None else (weight[1] // 3,) * 3
    batch, seq, hidden = x
    return batch * seq * hidden * weight[1] + batch * seq * seq * (q + v), 0, None


def _weight_values(model: ir.Model) -> set[int]:
    """ids of floating-point constant values that feed nodes: initializers and Constant/ConstantOfShape outputs.

    Subgraphs included (their own initializers and Constants).
    """
    weights = set()
    low_bit = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4}
    for graph in _graphs(model.graph):
        for value in graph.initializers.values():
            if value.dtype is not None and (value.dtype.is_floating_point() or value.dtype in low_bit):
                weights.add(id(value))  # float weights, and quantized ones (int8/int4 read by DequantizeLinear...)
        for node in graph:
            if node.op_type in ("Constant", "ConstantOfShape") and node.domain in ("", "ai.onnx"):
                out = node.outputs[0]
                if out.dtype is None or out.dtype.is_floating_point():
                    weights.add(id(out))
    return weights


def _graphs(graph: ir.Graph) -> list[ir.Graph]:
    """``graph`` and every subgraph nested in it, parents first."""
    found = [graph]
    for node in graph:
        for _, subgraph in _subgraphs(node):
            found.extend(_graphs(subgraph))
    return found


def _infer_shapes(
    model: ir.Model, overrides: dict[str, Sequence[int]], batch: int
) -> dict[int, tuple[int, ...] | None]:
    """Shapes of every value of ``model`` (keyed by ``id`` of the original values) with inputs made concrete."""
    from onnx_ir.passes.common import ShapeInferencePass

    copy = model.clone()
    dims_of = _input_dims(copy, overrides, batch)
    for value in graph_io.data_inputs(copy):
        dims = dims_of[value.name]
        if dims is not None:
            value.shape = ir.Shape([d if d is not None else ir.SymbolicDim(None) for d in dims])
    initializer_names = set(copy.graph.initializers)
    for value in copy.graph.initializers.values():  # tools leave stale declared shapes (onnxsim's pruning)
        if value.const_value is not None:
            value.shape = ir.Shape(list(value.const_value.shape))
    for node in copy.graph:
        for output in node.outputs:
            if output.name not in initializer_names:
                output.shape = None
    ShapeInferencePass(strict_mode=False, data_prop=True)(copy)
    _run_for_missing_shapes(copy)
    result: dict[int, tuple[int, ...] | None] = {}
    # match values by name graph by graph (a subgraph may reuse a name; shape inference reorders initializers)
    for graph, twin_graph in zip(_graphs(model.graph), _graphs(copy.graph), strict=True):
        copied = {value.name: value for value in _graph_values(twin_graph) if value.name}
        for original in _graph_values(graph):
            twin = copied.get(original.name)
            result[id(original)] = _static(twin) if twin is not None else None
    return result


def _input_dims(
    model: ir.Model, overrides: Mapping[str, Sequence[int]] | None, batch: int
) -> dict[str, list[int | None] | None]:
    """Each data input's dims as counted: the override, else the declared dims with a dynamic axis 0 = ``batch``."""
    overrides = overrides or {}
    result: dict[str, list[int | None] | None] = {}
    for value in graph_io.data_inputs(model):
        if value.name in overrides:
            result[value.name] = [int(d) for d in overrides[value.name]]
        elif value.shape is not None:
            result[value.name] = [
                d if isinstance(d, int) and d > 0 else (batch if i == 0 else None) for i, d in enumerate(value.shape)
            ]
        else:
            result[value.name] = None
    return result


def _run_for_missing_shapes(model: ir.Model) -> None:
    """Fill shapes that static inference could not derive by running the model once.

    ONNX shape inference gives up on shapes computed at run time (the Slice+Pad shortcuts of the CIFAR
    ResNets build their pads from ConstantOfShape/Reshape/Transpose) and on onnxruntime's com.microsoft
    ops, whose outputs it leaves without shape *and* type (``QLinearAdd`` of a QOperator-quantized ResNet:
    every ``QLinearConv`` after it had unknown shapes and counted no MACs). One onnxruntime run on zeros of the
    concrete input shapes measures them instead; untyped values are measured too (onnxruntime types them),
    and when that run fails, it is repeated with the typed values only.
    """
    inputs = graph_io.data_inputs(model)
    if any(_static(v) is None or v.dtype is None for v in inputs):
        return
    missing = [
        out
        for node in model.graph
        for out in node.outputs
        if out.name and _static(out) is None and out.dtype != ir.DataType.STRING
    ]
    feeds = {v.name: np.zeros(_static(v), dtype=v.dtype.numpy()) for v in inputs}
    measured = _measure(model, feeds, missing)
    typed = [v for v in missing if v.dtype is not None]
    if measured is None and len(typed) < len(missing):
        measured = _measure(model, feeds, typed)
    for value, result in (measured or {}).items():
        if isinstance(result, np.ndarray):  # a sequence value comes back as a list: no shape
            value.shape = ir.Shape(list(result.shape))


def _measure(model: ir.Model, feeds: dict[str, np.ndarray], values: list[ir.Value]) -> dict[ir.Value, Any] | None:
    """``values`` computed by one onnxruntime run of ``model`` on ``feeds`` (``None``: the run failed)."""
    from onnxopt.runtime import Session

    if not values:
        return None
    graph = model.graph
    declared = list(graph.outputs)
    names = {v.name for v in declared}
    graph.outputs.extend(v for v in values if v.name not in names)
    try:
        results = Session(model).run(feeds, [v.name for v in values])
    except Exception as e:  # a model that cannot run on zeros keeps its unknown shapes
        logger.debug("shape measurement run failed: %s", e)
        return None
    finally:
        graph.outputs.clear()
        graph.outputs.extend(declared)
    return {value: results[value.name] for value in values}


def _graph_values(graph: ir.Graph) -> list[ir.Value]:
    """The values ``graph`` itself defines (not those of its subgraphs)."""
    values = list(graph.inputs) + list(graph.initializers.values())
    for node in graph:
        values.extend(node.outputs)
    return values


def _static(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None:
        if value.const_value is not None:
            return tuple(value.const_value.shape)
        return None
    dims = tuple(value.shape)
    if all(isinstance(d, int) for d in dims):
        return tuple(int(d) for d in dims)
    return None


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape is not None else 0
