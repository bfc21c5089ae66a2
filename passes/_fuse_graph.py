"""What the `fuse` pass reads and prepares in a transformer graph, in onnx_ir, before onnxruntime's fusions run.

- :func:`attention_blocks` finds the encoder's self-attention blocks and reads their head count, head size and input
  width from the graph (the scaled-dot-product core: ``MatMul(Q, Kᵀ) → [Div|Mul] → [Add(mask)] → Softmax →
  MatMul(·, V)``, Q's heads split by a Reshape whose target ends in constant ``[heads, head size]``, a constant
  ``[hidden, heads·head size]`` projection weight before it). No block: not a transformer encoder.
- :func:`canonical_masks` rewrites the additive attention mask into the one form onnxruntime's Attention fusion
  matches. Exporters and cleanups build the same ``(1 − mask) · c`` of shape ``[batch, 1, 1, seq]`` in several
  orders: HF's TorchScript export writes ``Unsqueeze → Unsqueeze → Cast → Sub(1, ·) → Mul(·, c)``, onnxscript's
  optimizer (``simplify``) merges the two Unsqueezes into one with axes ``[1, 2]``, and hand-built graphs cast,
  subtract and scale first and unsqueeze last. All are the same values, so the chain from the mask input to the
  Add is rebuilt in HF's order (exact: every step is elementwise with a scalar, or a reshape).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io

__all__ = ["AttentionBlock", "attention_blocks", "canonical_masks"]

logger = logging.getLogger(__name__)

_SCALE_OPS = ("Div", "Mul")
_MASK_OPS = frozenset({"Cast", "Unsqueeze", "Sub", "Mul"})


@dataclasses.dataclass(frozen=True)
class AttentionBlock:
    """One self-attention block: its Softmax node, heads, head size and the width of its input (the hidden size)."""

    softmax: str
    heads: int
    head_size: int
    hidden: int | None  # None: the Q projection's weight is not a constant [hidden, heads·head size] matrix


def attention_blocks(model: ir.Model) -> list[AttentionBlock]:
    """The self-attention blocks of ``model``'s main graph, in graph order."""
    blocks = []
    for node in model.graph:
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            block = _block(node)
            if block is not None:
                blocks.append(block)
    return blocks


def _block(softmax: ir.Node) -> AttentionBlock | None:
    if not any(use.node.op_type == "MatMul" for use in softmax.outputs[0].uses()):
        return None  # not attention probabilities applied to V
    node = _producer(softmax.inputs[0])
    if node is not None and node.op_type == "Add":  # the additive mask
        node = next((p for p in map(_producer, node.inputs) if p is not None and p.op_type in (*_SCALE_OPS, "MatMul")),
                    None)  # fmt: skip
    if node is not None and node.op_type in _SCALE_OPS:
        node = _producer(node.inputs[0])
    if node is None or node.op_type != "MatMul":
        return None
    split = _head_split(node.inputs[0])  # Q: [batch, heads, seq, head size] from Transpose(Reshape(q))
    if split is None:
        return None
    reshape, heads, head_size = split
    hidden = None
    projection = _producer(reshape.inputs[0])
    if projection is not None and projection.op_type == "Add":  # bias
        projection = next((p for p in map(_producer, projection.inputs) if p is not None and p.op_type == "MatMul"),
                          None)  # fmt: skip
    if projection is not None and projection.op_type == "MatMul":
        weight = graph_io.const_array(projection.inputs[1])
        if weight is not None and weight.ndim == 2 and weight.shape[1] == heads * head_size:
            hidden = int(weight.shape[0])
    return AttentionBlock(softmax.name or "", heads, head_size, hidden)


def _head_split(value: ir.Value | None) -> tuple[ir.Node, int, int] | None:
    """``(reshape, heads, head size)`` when ``value`` is ``Transpose(Reshape(x, [..., heads, head size]))``."""
    transpose = _producer(value)
    if transpose is None or transpose.op_type != "Transpose":
        return None
    reshape = _producer(transpose.inputs[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    tail = _shape_tail(reshape.inputs[1])
    if tail is None or len(tail) < 2 or tail[-2] <= 0 or tail[-1] <= 0:
        return None
    return reshape, int(tail[-2]), int(tail[-1])


def _shape_tail(value: ir.Value | None) -> list[int] | None:
    """The constant trailing part of a Reshape target: all of a constant, or the constant last inputs of a Concat."""
    array = graph_io.const_array(value)
    if array is not None:
        return [int(v) for v in array.reshape(-1)]
    concat = _producer(value)
    if concat is None or concat.op_type != "Concat":
        return None
    tail: list[int] = []
    for part in reversed(concat.inputs):
        array = graph_io.const_array(part)
        if array is None:
            break
        tail = [int(v) for v in array.reshape(-1)] + tail
    return tail or None


def canonical_masks(model: ir.Model) -> int:
    """Rebuild each additive attention mask in onnxruntime's form (module docstring); returns how many changed.

    A mask is the chain from a graph input to the value every block adds to its scores, made only of ``Cast`` (to
    float), ``Unsqueeze`` (together inserting axes 1 and 2), ``Sub(1, ·)`` and ``Mul`` by a negative scalar, each
    exactly once (``Cast`` optional). Anything else is left as it is (onnxruntime then fuses what it can).
    """
    graph = model.graph
    if graph_io.default_opset(model) < 13:  # Unsqueeze takes its axes as an input from opset 13
        return 0
    done: set[int] = set()
    changed = 0
    for block in attention_blocks(model):
        softmax = next(n for n in graph if n.name == block.softmax)
        add = _producer(softmax.inputs[0])
        if add is None or add.op_type != "Add":
            continue
        for mask in add.inputs:
            chain = _mask_chain(mask)
            if chain is None or id(mask) in done:
                continue
            done.add(id(mask))
            if _rebuild(graph, mask, *chain):
                changed += 1
    return changed


def _mask_chain(value: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """``(graph input, nodes from it to value)`` for a mask chain, else ``None``."""
    nodes: list[ir.Node] = []
    while value is not None and not value.is_graph_input():
        node = _producer(value)
        if node is None or node.op_type not in _MASK_OPS or node.domain not in ("", "ai.onnx"):
            return None
        operands = node.inputs[:1] if node.op_type in ("Cast", "Unsqueeze") else node.inputs[:2]
        data = [v for v in operands if graph_io.const_array(v) is None]
        if len(data) != 1:
            return None
        nodes.append(node)
        value = data[0]
    if value is None or not nodes:
        return None
    nodes.reverse()
    ops = sorted(n.op_type for n in nodes)
    if ops.count("Sub") != 1 or ops.count("Mul") != 1 or ops.count("Cast") > 1 or "Unsqueeze" not in ops:
        return None
    return value, nodes


def _rebuild(graph: ir.Graph, mask: ir.Value, source: ir.Value, nodes: list[ir.Node]) -> bool:
    """Replace the chain ``nodes`` (from ``source`` to ``mask``) by HF's order; ``False`` when it already is or
    does not compute ``(1 − m) · c`` unsqueezed at axes 1 and 2."""
    shape = [0, 1]  # rank-2 mask: which dims of the result are the original ones
    rank = 2
    mul = cast = None
    for node in nodes:
        if node.op_type == "Unsqueeze":
            axes = graph_io.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes is None:
                attribute = node.attributes.get("axes")
                axes = None if attribute is None else np.array(attribute.value)
            if axes is None:
                return False
            rank += axes.size
            positions = sorted(int(a) % rank for a in axes.reshape(-1))
            kept = iter(shape)
            shape = [None if i in positions else next(kept) for i in range(rank)]
        elif node.op_type == "Sub":
            one = graph_io.const_array(node.inputs[0])
            if one is None or one.size != 1 or float(one.reshape(-1)[0]) != 1.0:
                return False
        elif node.op_type == "Mul":
            scale = next((graph_io.const_array(v) for v in node.inputs if graph_io.const_array(v) is not None), None)
            if scale is None or scale.size != 1 or not float(scale.reshape(-1)[0]) < 0:
                return False
            mul = node
        else:
            to = node.attributes.get("to")
            if to is None or to.value != ir.DataType.FLOAT:
                return False
            cast = node
    if shape != [0, None, None, 1]:
        return False
    order = [n.op_type for n in nodes]
    target = ["Unsqueeze", "Unsqueeze", *(["Cast"] if cast is not None else []), "Sub", "Mul"]
    if order == target:
        return False
    float_scale = float(next(graph_io.const_array(v) for v in mul.inputs if graph_io.const_array(v) is not None)
                        .reshape(-1)[0])  # fmt: skip
    base = graph_io.fresh_name(graph, "attention_mask_canonical")
    axis1 = graph_io.add_initializer(graph, f"{base}_axis1", np.array([1], np.int64))
    axis2 = graph_io.add_initializer(graph, f"{base}_axis2", np.array([2], np.int64))
    one = graph_io.add_initializer(graph, f"{base}_one", np.array([1.0], np.float32))
    scale = graph_io.add_initializer(graph, f"{base}_scale", np.array([float_scale], np.float32))
    new = [ir.node("Unsqueeze", [source, axis1], name=f"{base}/unsqueeze1")]
    new.append(ir.node("Unsqueeze", [new[-1].outputs[0], axis2], name=f"{base}/unsqueeze2"))
    if cast is not None:
        new.append(ir.node("Cast", [new[-1].outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{base}/cast"))
    new.append(ir.node("Sub", [one, new[-1].outputs[0]], name=f"{base}/sub"))
    new.append(ir.node("Mul", [new[-1].outputs[0], scale], name=f"{base}/mul"))
    for node in new:
        node.outputs[0].name = node.name.replace("/", "_")
    new[-1].outputs[0].dtype = ir.DataType.FLOAT
    graph.insert_after(nodes[-1], new)
    mask.replace_all_uses_with(new[-1].outputs[0], replace_graph_outputs=False)
    logger.debug("attention mask %s rebuilt as %s", mask.name, " -> ".join(n.op_type for n in new))
    return True


def _producer(value: ir.Value | None) -> ir.Node | None:
    return None if value is None else value.producer()
