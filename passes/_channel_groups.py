"""Channel coupling on an ONNX graph: which channels must be removed together, and how to remove them.

Every tracked value (an activation with a channel axis) owns one *slot* per channel. Ops couple slots:

- a producer (Conv, ConvTranspose with group 1, Gemm, 2-D-weight MatMul) creates the slots of its output;
- ops that keep channels (activations, BatchNormalization, pools, Pad on other axes, Resize, Dropout,
  Identity, Transpose, Squeeze/Unsqueeze, Mul/Add/... with a per-channel or scalar constant) tie each
  output slot to the same input slot;
- Add/Sub/Mul/Div/Max/Min between two tracked tensors (residual connections) tie them slot by slot;
- Concat on the channel axis ties input ``k``'s slot ``i`` to output slot ``offset_k + i``;
- Pad on the channel axis ties input slot ``i`` to output slot ``pad_before + i``; padded slots are zeros;
- a depthwise Conv (group = input channels) ties input slot ``c`` to output slots ``c·m .. c·m+m-1``;
- Flatten (or Reshape to ``(N, -1)``) ties channel ``c`` to every flat column it owns (H·W of them,
  wherever the channel axis sits, so tf2onnx's NHWC Flatten works too);
- a consumer (the next Conv/Gemm/MatMul) reads the slots of its input and loses the matching weight columns.

Transformer blocks (attention heads split by Reshape/Transpose, batched MatMuls, GELU gates) are handled by the
table in :mod:`onnxopt.passes._transformer_groups`, which :func:`analyze` takes as ``handlers``.

Slots are joined with a union-find; a connected set of slots is a *unit*, the smallest thing that can be
removed. A unit is blocked (with a reason) when it touches a graph input or output, a value read by an op
this module does not understand, a shared or overridable weight, or a grouped (non-depthwise) Conv. Values
joined by any coupling form a *layer group*; ratio-based pruning ranks units within their layer group.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import networkx as nx
import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io

__all__ = ["Space", "Action", "Unit", "Analysis", "analyze", "rebind", "HANDLERS"]

logger = logging.getLogger(__name__)

_ELEMENTWISE = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSwish", "HardSigmoid", "Elu", "Selu", "Softplus",
        "Softsign", "Identity", "Dropout", "Cast", "Abs", "Neg", "Exp", "Sqrt", "Mish", "Gelu", "Erf", "Celu",
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample",
        "BatchNormalization", "PRelu", "InstanceNormalization", "LRN",
    }
)  # fmt: skip
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow"})
# inputs of per-channel ops that hold one value per channel
_PER_CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "PRelu": (1,), "InstanceNormalization": (1, 2)}
_DEFAULT = ("", "ai.onnx")


@dataclasses.dataclass
class Space:
    """A tracked value: ``size`` channels on ``axis``, slots ``base .. base+size-1``."""

    value: ir.Value
    axis: int
    size: int
    base: int


@dataclasses.dataclass
class Action:
    """What removing channels does to one node: ``kind`` is producer, consumer, depthwise, param, pad, reshape."""

    kind: str
    node: ir.Node
    space: Space
    weight_axis: int = 0
    out_space: Space | None = None
    param_inputs: tuple[int, ...] = ()


@dataclasses.dataclass
class Unit:
    """Slots that must be removed together."""

    slots: list[int]
    blocked: str | None = None
    group: int = -1


class Analysis:
    """Result of :func:`analyze`: spaces, units, actions, blocked reasons."""

    def __init__(self) -> None:
        self.spaces: dict[int, Space] = {}  # id(value) -> Space
        self.actions: list[Action] = []
        self.units: list[Unit] = []
        self.skipped: list[tuple[str, str]] = []
        # values whose sign decides an activation (GELU/ReLU inputs): their non-positive fraction scores channels
        self.gates: list[Space] = []
        # merged attention-head outputs: a unit owns a block of their channels, scored by the Gram matrix
        self.head_inputs: list[Space] = []
        self._parent: list[int] = []
        self._blocked_slots: dict[int, str] = {}
        self._producer_slots: set[int] = set()
        self._value_graph = nx.Graph()

    # --- slots -------------------------------------------------------------------------------------
    def space(self, value: ir.Value, axis: int, size: int) -> Space:
        existing = self.spaces.get(id(value))
        if existing is not None:
            return existing
        space = Space(value, axis, size, len(self._parent))
        self._parent.extend(range(space.base, space.base + size))
        self.spaces[id(value)] = space
        self._value_graph.add_node(id(value))
        return space

    def find(self, slot: int) -> int:
        parent = self._parent
        root = slot
        while parent[root] != root:
            root = parent[root]
        while parent[slot] != root:
            parent[slot], slot = root, parent[slot]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra

    def tie(self, a: Space, b: Space, mapping: Callable[[int], list[int]] | None = None) -> None:
        """Tie slot ``i`` of ``a`` to slots ``mapping(i)`` of ``b`` (default: the same index)."""
        for i in range(a.size):
            for j in mapping(i) if mapping else [i]:
                self.union(a.base + i, b.base + j)
        self._value_graph.add_edge(id(a.value), id(b.value))

    def produced(self, space: Space) -> None:
        """Mark ``space`` as made by a layer (so its channels form units, prunable or blocked)."""
        self._producer_slots.update(range(space.base, space.base + space.size))

    def block(self, space: Space, reason: str, slots: range | None = None) -> None:
        for i in slots if slots is not None else range(space.size):
            self._blocked_slots.setdefault(space.base + i, reason)

    # --- results -----------------------------------------------------------------------------------
    def finish(self) -> None:
        members: dict[int, list[int]] = {}
        for slot in range(len(self._parent)):
            members.setdefault(self.find(slot), []).append(slot)
        producers = self._producer_slots
        groups = {v: g for g, comp in enumerate(nx.connected_components(self._value_graph)) for v in comp}
        owner = self._slot_owner()
        for slots in members.values():
            if not producers.intersection(slots):
                continue
            reasons = [self._blocked_slots[s] for s in slots if s in self._blocked_slots]
            unit = Unit(sorted(slots), reasons[0] if reasons else None, groups[id(owner[slots[0]].value)])
            self.units.append(unit)

    def _slot_owner(self) -> list[Space]:
        owner: list[Space] = [None] * len(self._parent)  # type: ignore[list-item]
        for space in self.spaces.values():
            owner[space.base : space.base + space.size] = [space] * space.size
        return owner

    def removed_by_space(self, units: list[Unit]) -> dict[int, np.ndarray]:
        """For removing ``units``: id(value) -> sorted channel indices removed from that value."""
        owner = self._slot_owner()
        removed: dict[int, list[int]] = {}
        for unit in units:
            for slot in unit.slots:
                space = owner[slot]
                removed.setdefault(id(space.value), []).append(slot - space.base)
        return {k: np.array(sorted(v), dtype=np.int64) for k, v in removed.items()}

    def slot_space(self, slot: int) -> Space:
        return self._slot_owner()[slot]


def rebind(analysis: Analysis, source: ir.Model, clone: ir.Model) -> Analysis:
    """``analysis`` (of ``source``) for ``clone``, a ``source.clone()`` not changed since: the same units (the very
    objects, so a selection made on ``analysis`` applies to the result), spaces and actions, on the clone's values and
    nodes, without analyzing the clone again. Values and nodes are matched by position: the graph inputs, then each
    node and its outputs in graph order; initializers by name. Raises ``ValueError`` when the two graphs differ in
    structure or a value of the analysis has no counterpart."""
    a, b = source.graph, clone.graph
    if len(a) != len(b) or len(a.inputs) != len(b.inputs) or a.initializers.keys() != b.initializers.keys():
        raise ValueError("the clone's graph differs from the analyzed one")
    values = {id(old): new for old, new in zip(a.inputs, b.inputs, strict=True)}
    values.update({id(value): b.initializers[name] for name, value in a.initializers.items()})
    nodes = {}
    for old, new in zip(a, b, strict=True):
        if old.op_type != new.op_type or len(old.outputs) != len(new.outputs):
            raise ValueError(f"node '{old.name}' differs in the clone")
        nodes[id(old)] = new
        values.update({id(o): n for o, n in zip(old.outputs, new.outputs, strict=True)})
    result = Analysis()
    spaces: dict[int, Space] = {}

    def mapped(space: Space) -> Space:
        if id(space) not in spaces:
            value = values.get(id(space.value))
            if value is None:
                raise ValueError(f"value '{space.value.name}' has no counterpart in the clone")
            spaces[id(space)] = Space(value, space.axis, space.size, space.base)
        return spaces[id(space)]

    def node(action: Action) -> ir.Node:
        if id(action.node) not in nodes:
            raise ValueError(f"node '{action.node.name}' is not in the analyzed graph")
        return nodes[id(action.node)]

    result.spaces = {id(mapped(space).value): mapped(space) for space in analysis.spaces.values()}
    result.actions = [
        dataclasses.replace(
            action,
            node=node(action),
            space=mapped(action.space),
            out_space=mapped(action.out_space) if action.out_space is not None else None,
        )
        for action in analysis.actions
    ]
    result.units, result.skipped = analysis.units, analysis.skipped
    result.gates = [mapped(space) for space in analysis.gates]
    result.head_inputs = [mapped(space) for space in analysis.head_inputs]
    result._parent = list(analysis._parent)
    result._blocked_slots, result._producer_slots = analysis._blocked_slots, analysis._producer_slots
    return result


def analyze(model: ir.Model, handlers: dict[str, Callable[[Analysis, ir.Node], None]] | None = None) -> Analysis:
    """Build the channel coupling of ``model``'s main graph. Needs value shapes (run shape inference first).

    ``handlers`` maps op types to handlers (default :data:`HANDLERS`, the CNN ops); ops absent from it are
    elementwise, binary or unknown (their inputs blocked).
    """
    table = HANDLERS if handlers is None else handlers
    analysis = Analysis()
    graph = model.graph
    for node in graph:  # onnx graphs are topologically sorted
        if node.domain not in _DEFAULT:
            _block_inputs(analysis, node, f"custom op {node.domain}::{node.op_type}")
            continue
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            _block_inputs(analysis, node, f"{node.op_type} has subgraphs")
            for value in _captured(node):  # outer values a subgraph reads by name, not as the node's inputs
                space = analysis.spaces.get(id(value))
                if space is not None:
                    analysis.block(space, f"{node.op_type} has subgraphs that read '{value.name}' (node '{node.name}')")
            continue
        handler = table.get(node.op_type)
        if handler is None:
            if node.op_type in _ELEMENTWISE:
                handler = _elementwise
            elif node.op_type in _BINARY:
                handler = _binary
            else:
                handler = _unknown
        handler(analysis, node)
    for value in graph.outputs:
        space = analysis.spaces.get(id(value))
        if space is not None:
            analysis.block(space, f"reaches graph output '{value.name}'")
    analysis.finish()
    return analysis


# --- helpers -------------------------------------------------------------------------------------------
def _static_shape(value: ir.Value | None) -> tuple[int | str, ...] | None:
    """The shape with ints for known dims and the symbol's text for symbolic ones (a batch ``N``)."""
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else str(d) for d in value.shape)


def _dim(value: ir.Value | None, axis: int) -> int | None:
    shape = _static_shape(value)
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    return shape[axis] if isinstance(shape[axis], int) else None


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return attr.value if attr is not None else default


def _private_weight(value: ir.Value | None) -> np.ndarray | None:
    """The weight as numpy when it is a constant only this node reads (not shared, not a graph input)."""
    if value is None or value.is_graph_input() or len(value.uses()) != 1:
        return None
    return graph_io.const_array(value)


def _data_space(analysis: Analysis, node: ir.Node) -> Space | None:
    """The tracked space of ``node``'s data input (input 0), or None."""
    value = node.inputs[0] if node.inputs else None
    return analysis.spaces.get(id(value)) if value is not None else None


def _tracked(analysis: Analysis, node: ir.Node) -> list[tuple[int, Space]]:
    return [
        (i, analysis.spaces[id(v)]) for i, v in enumerate(node.inputs) if v is not None and id(v) in analysis.spaces
    ]


def _captured(node: ir.Node) -> list[ir.Value]:
    """Values of enclosing graphs that the subgraphs of ``node`` (at any depth) use."""
    inner: set[int] = set()
    used: dict[int, ir.Value] = {}
    for attr in node.attributes.values():
        if attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            continue
        for graph in attr.value if attr.type == ir.AttributeType.GRAPHS else [attr.value]:
            inner.update(id(v) for v in graph.inputs)
            inner.update(id(v) for v in graph.initializers.values())
            for sub_node in ir.traversal.RecursiveGraphIterator(graph):
                inner.update(id(v) for v in sub_node.outputs)
                used.update((id(v), v) for v in sub_node.inputs if v is not None)
    return [value for key, value in used.items() if key not in inner]


def _block_inputs(analysis: Analysis, node: ir.Node, reason: str) -> None:
    for _, space in _tracked(analysis, node):
        analysis.block(space, f"{reason} reads '{space.value.name}' (node '{node.name}')")


def _unknown(analysis: Analysis, node: ir.Node) -> None:
    _block_inputs(analysis, node, f"unsupported op {node.op_type}")


def _out_space(analysis: Analysis, value: ir.Value, axis: int) -> Space | None:
    size = _dim(value, axis) if axis >= 0 else None
    return analysis.space(value, axis, size) if size is not None else None


# --- handlers ------------------------------------------------------------------------------------------
def _conv(analysis: Analysis, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    weight = graph_io.const_array(w)
    group = _attr(node, "group", 1)
    in_space = analysis.spaces.get(id(x))
    transpose = node.op_type == "ConvTranspose"
    if weight is None or _dim(node.outputs[0], 1) is None:
        _block_inputs(analysis, node, f"{node.op_type} without constant weight or known shape")
        return
    private = _private_weight(w) is not None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    private = private and (bias is None or _private_weight(bias) is not None)
    out = _out_space(analysis, node.outputs[0], 1)
    if group == 1:
        if in_space is not None:
            if private:
                analysis.actions.append(Action("consumer", node, in_space, weight_axis=0 if transpose else 1))
            else:
                analysis.block(in_space, f"weight of '{node.name}' is shared or a graph input")
        if out is not None:
            analysis.produced(out)
            if private:
                analysis.actions.append(Action("producer", node, out, weight_axis=1 if transpose else 0))
            else:
                analysis.block(out, f"weight of '{node.name}' is shared or a graph input")
        return
    channels_in = _dim(x, 1)
    if not transpose and channels_in == group and weight.shape[1] == 1 and out is not None and private:
        multiplier = out.size // group
        analysis.produced(out)
        if in_space is None:
            analysis.actions.append(Action("producer", node, out, weight_axis=0))
            return
        analysis.tie(in_space, out, lambda c: list(range(c * multiplier, (c + 1) * multiplier)))
        analysis.actions.append(Action("depthwise", node, in_space, out_space=out))
        return
    if in_space is not None:
        analysis.block(in_space, f"grouped {node.op_type} '{node.name}' (group {group})")
    if out is not None:
        analysis.produced(out)
        analysis.block(out, f"grouped {node.op_type} '{node.name}' (group {group})")


def _gemm(analysis: Analysis, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    weight = _private_weight(w)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    in_space = analysis.spaces.get(id(x))
    usable = weight is not None and weight.ndim == 2 and (bias is None or _private_weight(bias) is not None)
    if node.op_type == "Gemm":
        usable = usable and not _attr(node, "transA", 0) and _attr(node, "alpha", 1.0) == _attr(node, "beta", 1.0) == 1
        trans_b = _attr(node, "transB", 0)
        in_axis, out_axis_w, out_axis = (1, 0, 1) if trans_b else (0, 1, 1)
    else:  # MatMul: X (..., K) @ W (K, M)
        in_axis, out_axis_w = 0, 1
        out_axis = (_rank(node.outputs[0]) or 0) - 1
    reason = f"weight of '{node.name}' is shared, a graph input or not a constant matrix"
    if in_space is not None:
        if usable and in_space.axis == (_rank(x) or 0) - 1:
            analysis.actions.append(Action("consumer", node, in_space, weight_axis=in_axis))
        else:
            analysis.block(in_space, reason)
    out = _out_space(analysis, node.outputs[0], out_axis) if out_axis >= 0 else None
    if out is not None:
        analysis.produced(out)
        if usable:
            analysis.actions.append(Action("producer", node, out, weight_axis=out_axis_w))
        else:
            analysis.block(out, reason)


def _elementwise(analysis: Analysis, node: ir.Node) -> None:
    space = _data_space(analysis, node)
    if space is None:
        return
    op = node.op_type
    if op in ("InstanceNormalization", "LRN"):
        analysis.block(space, f"{op} '{node.name}' mixes or normalizes channels")
        return
    params = _PER_CHANNEL_PARAMS.get(op, ())
    for index in params:
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            continue
        array = _private_weight(value)
        if array is None or (array.size not in (1, space.size)):
            analysis.block(space, f"parameter '{value.name}' of '{node.name}' is shared or not per-channel")
            return
    if _tie_output(analysis, node, space, space.axis) and params:
        out = analysis.spaces[id(node.outputs[0])]
        analysis.actions.append(Action("param", node, out, param_inputs=params))


def _binary(analysis: Analysis, node: ir.Node) -> None:
    tracked = _tracked(analysis, node)
    if not tracked:
        return
    out_rank = _rank(node.outputs[0])
    if out_rank is None:
        _block_inputs(analysis, node, f"{node.op_type} with unknown shape")
        return
    # channel axis of the output, as seen through broadcasting (right-aligned)
    index, first = tracked[0]
    axis = first.axis + out_rank - (_rank(first.value) or 0)
    out = _out_space(analysis, node.outputs[0], axis)
    params = []
    for i, value in enumerate(node.inputs):
        space = analysis.spaces.get(id(value))
        if space is not None:
            same_axis = space.axis + out_rank - (_rank(value) or 0) == axis
            if out is None or not same_axis or space.size != out.size:
                _block_inputs(analysis, node, f"{node.op_type} '{node.name}' broadcasts channels")
                if out is not None:
                    analysis.block(out, f"{node.op_type} '{node.name}' broadcasts channels")
                return
            continue
        array = graph_io.const_array(value)
        if array is None and _broadcast_over(value, axis, out_rank):
            continue  # an attention mask (N, 1, 1, S) added to every head's scores
        if array is None:
            _block_inputs(analysis, node, f"{node.op_type} '{node.name}' joins a value that is not prunable")
            if out is not None:
                analysis.block(out, f"{node.op_type} '{node.name}' joins '{value.name}', which is not prunable")
            return
        if array.size > 1:
            params.append(i)
            per_axis = array.ndim - (out_rank - axis)
            shape_ok = 0 <= per_axis < array.ndim and array.shape[per_axis] == out.size
            shape_ok = shape_ok and array.size == out.size and len(value.uses()) == 1 and not value.is_graph_input()
            if not shape_ok:
                _block_inputs(analysis, node, f"constant of '{node.name}' is shared or not per-channel")
                analysis.block(out, f"constant of '{node.name}' is shared or not per-channel")
                return
    for _, space in tracked:
        analysis.tie(space, out)
    if params:
        analysis.actions.append(Action("param", node, out, param_inputs=tuple(params)))


def _broadcast_over(value: ir.Value, axis: int, out_rank: int) -> bool:
    """``value`` (an operand of a broadcasting op) has size 1, or no dim, on the output's channel ``axis``."""
    rank = _rank(value)
    if rank is None:
        return False
    position = axis - (out_rank - rank)
    return position < 0 or _dim(value, position) == 1


def _concat(analysis: Analysis, node: ir.Node) -> None:
    tracked = _tracked(analysis, node)
    if not tracked:
        return
    rank = _rank(node.outputs[0]) or 0
    axis = _attr(node, "axis", 0) % rank if rank else 0
    out = _out_space(analysis, node.outputs[0], axis)
    if out is None or any(s.axis != axis for _, s in tracked):
        _block_inputs(analysis, node, f"Concat '{node.name}' on a non-channel axis")
        if out is not None:
            analysis.block(out, f"Concat '{node.name}' on a non-channel axis")
        return
    offset = 0
    for value in node.inputs:
        size = _dim(value, axis) or 0
        space = analysis.spaces.get(id(value))
        if space is not None:
            analysis.tie(space, out, lambda i, o=offset: [o + i])
        else:
            analysis.block(
                out, f"Concat '{node.name}' input '{value.name}' is not prunable", range(offset, offset + size)
            )
        offset += size


def _pad(analysis: Analysis, node: ir.Node) -> None:
    space = _data_space(analysis, node)
    if space is None:
        return
    rank = _rank(node.inputs[0]) or 0
    mode = _attr(node, "mode", "constant")
    pads = _attr(node, "pads")
    if pads is None and len(node.inputs) > 1:
        pads = graph_io.const_array(node.inputs[1])
    constant = graph_io.const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    axes_given = len(node.inputs) > 3 and node.inputs[3] is not None
    out = _out_space(analysis, node.outputs[0], space.axis)
    if pads is None or out is None or axes_given or len(pads) != 2 * rank:
        analysis.block(space, f"Pad '{node.name}' with unknown pads")
        return
    before, after = int(pads[space.axis]), int(pads[space.axis + rank])
    if before == 0 and after == 0:
        analysis.tie(space, out)
        return
    if mode not in ("constant", b"constant") or (constant is not None and np.any(constant != 0)):
        analysis.block(space, f"Pad '{node.name}' pads channels with non-zero values")
        analysis.block(out, f"Pad '{node.name}' pads channels with non-zero values")
        return
    analysis.tie(space, out, lambda i: [before + i])
    analysis.actions.append(Action("pad", node, space, out_space=out))


def _transpose(analysis: Analysis, node: ir.Node) -> None:
    space = _data_space(analysis, node)
    if space is None:
        return
    perm = _attr(node, "perm") or list(reversed(range(_rank(space.value) or 0)))
    _tie_output(analysis, node, space, list(perm).index(space.axis))


def _reshape_like(analysis: Analysis, node: ir.Node) -> None:
    """Flatten, Reshape, Squeeze, Unsqueeze: the channel axis moves, or channels spread over flat columns."""
    space = _data_space(analysis, node)
    if space is None:
        return
    in_shape, out_shape = _static_shape(node.inputs[0]), _static_shape(node.outputs[0])
    if in_shape is None or out_shape is None:
        analysis.block(space, f"{node.op_type} '{node.name}' with unknown shapes")
        return
    # the channel axis survives when the reshape only adds or drops dims of size 1 (Squeeze, Unsqueeze)
    in_big = [i for i, d in enumerate(in_shape) if d != 1]
    out_big = [i for i, d in enumerate(out_shape) if d != 1]
    if space.size > 1 and [in_shape[i] for i in in_big] == [out_shape[i] for i in out_big]:
        out = analysis.space(node.outputs[0], out_big[in_big.index(space.axis)], space.size)
        analysis.tie(space, out)
        if node.op_type == "Reshape":
            analysis.actions.append(Action("reshape", node, space, out_space=out))
        return
    inner = in_shape[1:]
    flat = len(out_shape) == 2 and out_shape[0] == in_shape[0] and isinstance(out_shape[1], int)
    if flat and space.axis >= 1 and all(isinstance(d, int) for d in inner):
        # Flatten to (N, F): channel c owns the flat columns where its index on the channel axis is c
        columns = np.arange(int(np.prod(inner))).reshape(inner)
        per_channel = np.moveaxis(columns, space.axis - 1, 0).reshape(space.size, -1)
        out = analysis.space(node.outputs[0], 1, out_shape[1])
        analysis.tie(space, out, lambda c: per_channel[c].tolist())
        if node.op_type == "Reshape":
            analysis.actions.append(Action("reshape", node, space, out_space=out))
        return
    analysis.block(space, f"{node.op_type} '{node.name}' reshapes the channel axis")


def _reduce(analysis: Analysis, node: ir.Node) -> None:
    space = _data_space(analysis, node)
    if space is None:
        return
    rank = _rank(space.value) or 0
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = graph_io.const_array(node.inputs[1])
    keepdims = _attr(node, "keepdims", 1)
    if axes is None or space.axis in {int(a) % rank for a in np.atleast_1d(axes)}:
        analysis.block(space, f"{node.op_type} '{node.name}' reduces over channels")
        return
    removed_before = sum(1 for a in np.atleast_1d(axes) if int(a) % rank < space.axis)
    _tie_output(analysis, node, space, space.axis if keepdims else space.axis - removed_before)


def _softmax(analysis: Analysis, node: ir.Node) -> None:
    space = _data_space(analysis, node)
    if space is None:
        return
    rank = _rank(space.value) or 0
    axis = _attr(node, "axis", -1 if node.version is None or node.version >= 13 else 1) % max(rank, 1)
    if axis == space.axis:
        analysis.block(space, f"{node.op_type} '{node.name}' normalizes over channels")
        return
    _tie_output(analysis, node, space, space.axis)


def _tie_output(analysis: Analysis, node: ir.Node, space: Space, axis: int) -> bool:
    """Tie ``space`` slot by slot to ``node``'s output channel axis ``axis``; block it when that cannot be done."""
    out = _out_space(analysis, node.outputs[0], axis)
    if out is None or out.size != space.size:
        analysis.block(space, f"{node.op_type} '{node.name}' has an unknown shape or changes the channel count")
        return False
    analysis.tie(space, out)
    return True


def _shape(analysis: Analysis, node: ir.Node) -> None:
    """Shape is harmless when only dims other than the channel axis are read from it (Gather of the batch)."""
    space = _data_space(analysis, node)
    if space is None:
        return
    rank = _rank(space.value) or 0
    dims = list(range(rank))[_attr(node, "start", 0) : _attr(node, "end", rank)]
    for use in node.outputs[0].uses():
        user = use.node
        indices = graph_io.const_array(user.inputs[1]) if user.op_type == "Gather" and use.idx == 0 else None
        if indices is None or any(dims[int(i)] == space.axis for i in np.atleast_1d(indices)):
            analysis.block(space, f"Shape '{node.name}' is read for the channel count")
            return
    if node.outputs[0].is_graph_output():
        analysis.block(space, f"Shape '{node.name}' is a graph output")


def _slice(analysis: Analysis, node: ir.Node) -> None:
    """Slice on other axes keeps the channels (CIFAR ResNet shortcuts take x[:, :, ::2, ::2])."""
    space = _data_space(analysis, node)
    if space is None:
        return
    rank = _rank(space.value) or 0
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 3 and node.inputs[3] is not None:
        axes = graph_io.const_array(node.inputs[3])
    if axes is None:
        starts = _attr(node, "starts")
        if starts is None and len(node.inputs) > 1:
            starts = graph_io.const_array(node.inputs[1])
        axes = range(len(starts)) if starts is not None else None
    if axes is None or space.axis in {int(a) % rank for a in np.atleast_1d(np.asarray(list(axes)))}:
        analysis.block(space, f"Slice '{node.name}' on the channel axis")
        return
    _tie_output(analysis, node, space, space.axis)


def _size(analysis: Analysis, node: ir.Node) -> None:
    _block_inputs(analysis, node, "Size reads the element count")


HANDLERS: dict[str, Callable[[Analysis, ir.Node], None]] = {
    "Conv": _conv,
    "ConvTranspose": _conv,
    "Gemm": _gemm,
    "MatMul": _gemm,
    "Concat": _concat,
    "Pad": _pad,
    "Transpose": _transpose,
    "Flatten": _reshape_like,
    "Reshape": _reshape_like,
    "Squeeze": _reshape_like,
    "Unsqueeze": _reshape_like,
    "ReduceMean": _reduce,
    "ReduceMax": _reduce,
    "ReduceSum": _reduce,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Shape": _shape,
    "Size": _size,
    "Slice": _slice,
}
