"""Channel coupling of transformer encoder blocks: attention heads, FFN neurons, and the hidden size kept.

An encoder layer as torch exports it (BERT, MiniLM)::

    x ─┬ MatMul(Wq)+bq ─ Reshape(b,s,H,D) ─ Transpose(0,2,1,3) ──────────── MatMul ─ Div ─ Add(mask) ─ Softmax ┐
       ├ MatMul(Wk)+bk ─ Reshape(b,s,H,D) ─ Transpose(0,2,3,1) ────────────┘                                   │
       └ MatMul(Wv)+bv ─ Reshape(b,s,H,D) ─ Transpose(0,2,1,3) ───────────────────────────────────── MatMul ───┘
             ─ Transpose(0,2,1,3) ─ Reshape(b,s,H·D) ─ MatMul(Wo)+bo ─ Add(x) ─ LayerNormalization ─ y
    y ─ MatMul(W1)+b1 ─ GELU (Gelu, x·½·(1+erf(x/√2)), or Relu) ─ MatMul(W2)+b2 ─ Add(y) ─ LayerNormalization

Handlers here extend the CNN table of :mod:`onnxopt.passes._channel_groups`:

- a Reshape that *splits* the channel axis into ``(H, D)`` ties channel ``c`` to head ``c // D`` of the output's
  head axis; one that *merges* ``(H, D)`` back ties head ``h`` to channels ``h·D .. h·D+D-1``. The target gets
  the new head (or channel) count: a constant target (``[b, s, H, D]``, ``[0, 0, H, D]``, ``[0, 0, H·D]``) or a
  Concat of runtime dims and constants, as torch writes ``x.view(x.size(0), x.size(1), H, D)``;
- a MatMul of two activations (``Q·Kᵀ``, ``P·V``) ties the head axis of both operands to the output's (heads are
  batch axes there); a tracked axis that is contracted or a row/column axis blocks;
- Add of the attention mask ``(b, 1, 1, s)`` broadcasts over heads (handled by the CNN ``_binary``);
- Gelu, Erf and Relu record their input as a *gate*: the fraction of non-positive GELU inputs (APoZ-style)
  scores FFN neurons;
- LayerNormalization normalizes over the hidden size, which residual Adds join across all layers: its input is
  blocked (the hidden size is kept), with that reason.

So one attention head is one unit (its ``D`` columns of Wq, Wk, Wv with their biases, its head slot in every
4-D value, and its ``D`` rows of Wo), and one FFN neuron is one unit (a column of W1 and b1, a row of W2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt.passes import _channel_groups as cg
from onnxopt.passes._channel_groups import Action, Analysis, Space

__all__ = ["HANDLERS", "target_pieces", "bias_add"]

logger = logging.getLogger(__name__)


def bias_add(node: ir.Node) -> tuple[ir.Node, int] | None:
    """For a MatMul whose only reader is an Add of a private constant ``(M,)`` bias: ``(that Add, bias index)``."""
    out = node.outputs[0]
    uses = list(out.uses())
    weight = graph_io.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.op_type != "MatMul" or weight is None or len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    index = 1 - uses[0].idx
    value = add.inputs[index]
    array = graph_io.const_array(value)
    if array is None or array.ndim != 1 or array.shape[0] != weight.shape[-1]:
        return None
    if value.is_graph_input() or len(value.uses()) != 1:
        return None
    return add, index


def _matmul(analysis: Analysis, node: ir.Node) -> None:
    """MatMul with a constant 2-D weight is a layer (CNN ``_gemm``); between two activations, heads are batch axes."""
    weight = graph_io.const_array(node.inputs[1])
    if weight is not None and weight.ndim == 2:
        cg._gemm(analysis, node)
        return
    out_rank = cg._rank(node.outputs[0])
    tracked = cg._tracked(analysis, node)
    if not tracked:
        return
    if out_rank is None or out_rank < 3:
        cg._block_inputs(analysis, node, f"MatMul '{node.name}' with unknown or 2-D shapes")
        return
    axis = None
    for _, space in tracked:
        rank = cg._rank(space.value) or 0
        aligned = space.axis + out_rank - rank
        if space.axis >= rank - 2 or (axis is not None and aligned != axis):
            cg._block_inputs(analysis, node, f"MatMul '{node.name}' contracts or mixes the channel axis")
            return
        axis = aligned
    out = cg._out_space(analysis, node.outputs[0], axis)
    if out is None or any(space.size != out.size for _, space in tracked):
        cg._block_inputs(analysis, node, f"MatMul '{node.name}' broadcasts channels")
        return
    for index, value in enumerate(node.inputs):
        if id(value) in analysis.spaces:
            continue
        rank = cg._rank(value)
        position = axis - (out_rank - rank) if rank is not None else None
        if position is None or (position >= 0 and cg._dim(value, position) != 1):
            # an operand that is not pruned but has one slice per head (a constant per-head table)
            cg._block_inputs(analysis, node, f"MatMul '{node.name}' input {index} has per-channel slices")
            analysis.block(out, f"MatMul '{node.name}' input {index} has per-channel slices")
            return
    for _, space in tracked:
        analysis.tie(space, out)


def _reshape(analysis: Analysis, node: ir.Node) -> None:
    """Head split ``(…, H·D) → (…, H, D)`` and merge ``(…, H, D) → (…, H·D)``; other reshapes as for CNNs."""
    space = cg._data_space(analysis, node)
    in_shape, out_shape = cg._static_shape(node.inputs[0]), cg._static_shape(node.outputs[0])
    if space is None or in_shape is None or out_shape is None:
        cg._reshape_like(analysis, node)
        return
    a = space.axis
    if len(out_shape) == len(in_shape) + 1 and _same(in_shape[:a], out_shape[:a]):
        heads, depth = out_shape[a], out_shape[a + 1] if a + 1 < len(out_shape) else None
        split = isinstance(heads, int) and isinstance(depth, int) and heads > 1 and heads * depth == space.size
        if split and _same(in_shape[a + 1 :], out_shape[a + 2 :]):
            _tie_reshape(analysis, node, space, a, heads, lambda c: [c // depth], "split")
            return
    if len(out_shape) == len(in_shape) - 1 and a + 1 < len(in_shape) and _same(in_shape[:a], out_shape[:a]):
        depth = in_shape[a + 1]
        merged = out_shape[a]
        merge = isinstance(depth, int) and isinstance(merged, int) and merged == space.size * depth
        if merge and _same(in_shape[a + 2 :], out_shape[a + 1 :]):
            _tie_reshape(analysis, node, space, a, merged, lambda h: list(range(h * depth, (h + 1) * depth)), "merge")
            return
    cg._reshape_like(analysis, node)


def _tie_reshape(analysis: Analysis, node: ir.Node, space: Space, axis: int, size: int, mapping, kind: str) -> None:
    entry = _target_entry(node, axis)
    if entry is None or entry[1] == 0:
        analysis.block(space, f"Reshape '{node.name}' has a target the head count cannot be updated in")
        return
    out = analysis.space(node.outputs[0], axis, size)
    analysis.tie(space, out, mapping)
    analysis.actions.append(Action("reshape", node, space, out_space=out))
    if kind == "merge":
        analysis.head_inputs.append(out)
    logger.debug("Reshape %s: head %s on axis %d (%d)", node.name, kind, axis, size)


def _same(a: tuple, b: tuple) -> bool:
    """Dims that agree where both are known (symbolic dims may be named differently)."""
    return len(a) == len(b) and all(
        x == y or not (isinstance(x, int) and isinstance(y, int)) for x, y in zip(a, b, strict=True)
    )


def target_pieces(node: ir.Node) -> list[tuple[ir.Node | None, int, np.ndarray | None, int]] | None:
    """A Reshape target as pieces ``(owner, input index, constant or None, length)``.

    A constant target is one piece owned by the Reshape (input 1); a Concat target has one piece per Concat input
    (a runtime piece, like ``Unsqueeze(Gather(Shape(x)))``, has no constant). None when a length is unknown.
    """
    target = node.inputs[1] if len(node.inputs) > 1 else None
    constant = graph_io.const_array(target)
    if constant is not None:
        return [(node, 1, constant.reshape(-1), constant.size)]
    concat = target.producer() if target is not None else None
    if concat is None or concat.op_type != "Concat":
        return None
    pieces = []
    for index, value in enumerate(concat.inputs):
        array = graph_io.const_array(value)
        length = array.size if array is not None else cg._dim(value, 0)
        if length is None:
            return None
        pieces.append((concat, index, None if array is None else array.reshape(-1), length))
    return pieces


def _target_entry(node: ir.Node, axis: int) -> tuple[ir.Node, int] | None:
    """The target's entry at ``axis`` as ``(its value, 0 when copied from the input)``; None when not constant."""
    pieces = target_pieces(node)
    if pieces is None:
        return None
    offset = 0
    for _, _, array, length in pieces:
        if offset <= axis < offset + length:
            return (node, int(array[axis - offset])) if array is not None else None
        offset += length
    return None


def _gate(analysis: Analysis, node: ir.Node) -> None:
    """Gelu, Erf (of erf-GELU) and Relu keep channels; their input's sign says whether the neuron is active."""
    space = cg._data_space(analysis, node)
    cg._elementwise(analysis, node)
    if space is not None:
        analysis.gates.append(space)


def _add(analysis: Analysis, node: ir.Node) -> None:
    """A residual Add onto the LayerNormalization stream joins the hidden size of all layers: kept, with a reason."""
    tracked = cg._tracked(analysis, node)
    stream = [v for v in node.inputs if v is not None and id(v) not in analysis.spaces and _is_stream(v)]
    if tracked and stream:
        for _, space in tracked:
            analysis.block(space, f"hidden size: residual Add '{node.name}' joins it across layers (kept)")
        return
    cg._binary(analysis, node)


def _is_stream(value: ir.Value) -> bool:
    """The residual stream: the encoder's input or a LayerNormalization output."""
    if value.is_graph_input():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type in ("LayerNormalization", "SkipLayerNormalization")


def _layer_norm(analysis: Analysis, node: ir.Node) -> None:
    space = cg._data_space(analysis, node)
    if space is None:
        return
    rank = cg._rank(space.value) or 0
    axis = cg._attr(node, "axis", -1) % max(rank, 1)
    if space.axis >= axis:
        analysis.block(
            space, "hidden size: LayerNormalization normalizes over it and residual Adds join it across layers (kept)"
        )
        return
    cg._elementwise(analysis, node)


HANDLERS: dict[str, Callable[[Analysis, ir.Node], None]] = {
    **cg.HANDLERS,
    "Add": _add,
    "MatMul": _matmul,
    "Reshape": _reshape,
    "Gelu": _gate,
    "Erf": _gate,
    "Relu": _gate,
    "LayerNormalization": _layer_norm,
}
