"""Exact folds that onnxscript's optimizer and rules do not do: ConstantOfShape weights, per-channel affine ops.

``fold_constant_of_shape``::

    ConstantOfShape(shape=const [M, C, k, k], value=v)  →  initializer full((M, C, k, k), v)

onnxscript's constant folder deliberately keeps ConstantOfShape (it would grow the file); exporters that
write placeholder weights this way (the onnx wheel's light models) need them as initializers before a
pass can rewrite the weights. Each folded tensor gets its own initializer (no sharing), up to a size limit.

``axes_inputs_to_attributes``: onnxscript's constant folder writes the opset-13 forms ``Unsqueeze(x, axes)``,
``Squeeze(x, axes)`` and ``Split(x, split)`` whatever the model's opset (``ConcatFromSequence`` with
``new_axis=1`` becomes Unsqueeze + Concat); below opset 13 the constant input goes back into the attribute.

``fold_affine_into_producer`` (tf2onnx writes BatchNorm after a biased Conv, and always after a
ConvTranspose, as Mul + Add with per-channel constants)::

    Y = Add(Mul(Conv(X, W, B), s), t)   →   Y = Conv(X, W·s[:, None, ...], B·s + t)

for Conv (output channel axis 0 of W), ConvTranspose (axis 1 of W, group 1), Gemm (transB decides the
axis) and 2-D MatMul (Mul only: it has no bias; its Add then becomes a Gemm bias), when ``s`` and ``t``
are constants that vary only along the channel axis of the producer's output, and each intermediate
value has exactly one use and the producer's output is not a graph output. Mul alone and Add alone fold
the same way (``s = 1`` or ``t = 0``). New weights get fresh names, so shared initializers stay intact.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io

__all__ = [
    "unshare",
    "fold_constant_of_shape",
    "fold_affine_into_producer",
    "remove_inference_dropout",
    "constant_reshape_targets",
    "axes_inputs_to_attributes",
    "AXES_INPUTS",
]

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")


def fold_constant_of_shape(model: ir.Model, limit: int) -> list[str]:
    """Replace ConstantOfShape nodes with a constant shape by initializers; returns the folded values' names."""
    graph = model.graph
    folded = []
    for node in tuple(graph):
        if node.op_type != "ConstantOfShape" or node.domain not in _DEFAULT_DOMAINS:
            continue
        shape = graph_io.const_array(node.inputs[0])
        out = node.outputs[0]
        if shape is None or out.is_graph_output():
            continue
        dims = tuple(int(d) for d in shape.reshape(-1))
        if int(np.prod(dims, dtype=np.int64)) > limit:
            logger.debug("ConstantOfShape %s: %s elements exceed the fold limit", node.name, dims)
            continue
        attr = node.attributes.get("value")
        fill = attr.value.numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
        array = np.full(dims, fill[0], dtype=fill.dtype)
        value = graph_io.add_initializer(graph, f"{out.name}_folded", array)
        ir.convenience.replace_all_uses_with(out, value)
        graph.remove(node, safe=True)
        folded.append(out.name)
    return folded


def unshare(model: ir.Model, names: set[str]) -> int:
    """Give every extra reader of the initializers ``names`` its own copy; returns the copies made."""
    graph = model.graph
    copies = 0
    for name in sorted(names):
        value = graph.initializers.get(name)
        if value is None or value.const_value is None:
            continue
        for use in list(value.uses())[1:]:
            use.node.replace_input_with(use.idx, graph_io.add_initializer(graph, name, value.const_value.numpy()))
            copies += 1
    return copies


def remove_inference_dropout(model: ir.Model) -> list[str]:
    """Dropout is the identity at inference: remove it when its mask is unused and it is not in training mode.

    onnxscript's rule only matches an explicit ``training_mode=False`` input; exporters (opset 9-11) write
    Dropout with neither.
    """
    graph = model.graph
    removed = []
    for node in tuple(graph):
        if node.op_type != "Dropout" or node.domain not in _DEFAULT_DOMAINS:
            continue
        training = node.inputs[2] if len(node.inputs) > 2 else None
        if training is not None and not (
            graph_io.const_array(training) is not None and not graph_io.const_array(training).any()
        ):
            continue
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            continue
        out, source = node.outputs[0], node.inputs[0]
        if out.is_graph_output() and (source.is_graph_input() or source.is_graph_output()):
            continue
        name = out.name
        ir.convenience.replace_all_uses_with(out, source, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if source.is_graph_output() and not source.is_graph_input():
            source.name = name  # a graph output keeps its public name
        removed.append(name)
    return removed


AXES_INPUTS = {"Unsqueeze": "axes", "Squeeze": "axes", "Split": "split"}  # input 1 before opset 13: attributes


def axes_inputs_to_attributes(model: ir.Model) -> list[str]:
    """Below opset 13, move a constant ``axes``/``split`` input of Unsqueeze, Squeeze, Split into its attribute.

    Returns the rewritten nodes' names. A non-constant one is left for validation to reject (no exporter
    writes it: the opset does not allow it).
    """
    if graph_io.default_opset(model) >= 13:
        return []
    rewritten = []
    for node in tuple(model.graph):
        attribute = AXES_INPUTS.get(node.op_type)
        if attribute is None or node.domain not in _DEFAULT_DOMAINS or len(node.inputs) < 2:
            continue
        values = graph_io.const_array(node.inputs[1])
        if values is None:
            continue
        node.resize_inputs(1)
        node.attributes[attribute] = ir.AttrInt64s(attribute, [int(v) for v in values.reshape(-1)])
        rewritten.append(node.name)
    return rewritten


def constant_reshape_targets(model: ir.Model) -> list[str]:
    """``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), i)), ...))`` → ``Reshape(x, [..., 0, ...])``.

    PyTorch exports ``x.view(x.size(0), -1)`` as a runtime shape computation; the dim it copies from ``x``
    at the same position is what Reshape's ``0`` means (``allowzero`` unset), so the target becomes a
    constant, shape inference can follow it, and the Shape/Gather/Unsqueeze/Concat chain goes.
    """
    graph = model.graph
    rewritten = []
    for node in tuple(graph):
        if node.op_type != "Reshape" or node.domain not in _DEFAULT_DOMAINS or node.attributes.get("allowzero"):
            continue
        concat = node.inputs[1].producer() if node.inputs[1] is not None else None
        if concat is None or concat.op_type != "Concat":
            continue
        target: list[int] = []
        for piece in concat.inputs:
            constant = graph_io.const_array(piece)
            if constant is not None:
                target.extend(int(v) for v in constant.reshape(-1))
                continue
            if not _copies_dim(piece, node.inputs[0], len(target)):
                break
            target.append(0)
        else:
            node.replace_input_with(
                1, graph_io.add_initializer(graph, f"{node.name or 'reshape'}_shape", np.array(target, np.int64))
            )
            rewritten.append(node.name)
    return rewritten


def _copies_dim(piece: ir.Value, source: ir.Value, position: int) -> bool:
    """``piece`` is ``Unsqueeze(Gather(Shape(source), position))``: a 1-element copy of that dim."""
    unsqueeze = piece.producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return False
    gather = unsqueeze.inputs[0].producer()
    if gather is None or gather.op_type != "Gather":
        return False
    index = graph_io.const_array(gather.inputs[1])
    shape = gather.inputs[0].producer()
    if index is None or index.size != 1 or shape is None or shape.op_type != "Shape" or shape.attributes:
        return False
    return shape.inputs[0] is source and int(index.reshape(-1)[0]) == position


def fold_affine_into_producer(model: ir.Model) -> list[str]:
    """Fold per-channel Mul/Add after Conv, ConvTranspose and Gemm into their weights; returns producer names."""
    graph = model.graph
    folded = []
    for node in tuple(graph):
        if node.graph is None or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        while _fold_one(graph, node):
            folded.append(node.name)
    return folded


def _fold_one(graph: ir.Graph, node: ir.Node) -> bool:
    """Fold the single Mul or Add that consumes ``node``'s output; True when something was folded."""
    out = node.outputs[0]
    if out.is_graph_output() or len(out.uses()) != 1:
        return False
    consumer = next(iter(out.uses())).node
    if consumer.op_type not in ("Mul", "Add") or consumer.domain not in _DEFAULT_DOMAINS:
        return False
    other = consumer.inputs[1] if consumer.inputs[0] is out else consumer.inputs[0]
    constant = graph_io.const_array(other)
    layout = _layout(node)
    if constant is None or layout is None or out.shape is None:
        return False
    channels, w_axis, rank = layout
    per_channel = _per_channel(constant, channels, rank)
    if per_channel is None or (node.op_type == "MatMul" and consumer.op_type == "Add"):
        return False  # MatMul has no bias input: its Add becomes a Gemm bias through onnxscript's rule
    weight = graph_io.const_array(node.inputs[1])
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = graph_io.const_array(bias_value) if bias_value is not None else np.zeros(channels, weight.dtype)
    if bias is None or bias.size not in (1, channels) or weight.dtype.kind != "f":
        return False
    beta = node.attributes.get("beta")
    if node.op_type == "Gemm" and beta is not None and beta.value != 1:
        return False
    bias = np.broadcast_to(bias.reshape(-1), (channels,)).astype(np.float64)
    if consumer.op_type == "Mul":
        shape = [1] * weight.ndim
        shape[w_axis] = channels
        new_weight = (weight.astype(np.float64) * per_channel.reshape(shape)).astype(weight.dtype)
        node.replace_input_with(1, graph_io.add_initializer(graph, node.inputs[1].name, new_weight))
        new_bias = bias * per_channel
    else:
        new_bias = bias + per_channel
    if node.op_type != "MatMul":
        base = bias_value.name if bias_value is not None else f"{node.name or out.name}_bias"
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, graph_io.add_initializer(graph, base, new_bias.astype(weight.dtype)))
    result = consumer.outputs[0]
    out.shape, out.dtype = result.shape or out.shape, result.dtype or out.dtype
    name = result.name
    ir.convenience.replace_all_uses_with(result, out, replace_graph_outputs=True)
    graph.remove(consumer, safe=True)
    out.name = name  # keep the public name of the value that survives
    return True


def _layout(node: ir.Node) -> tuple[int, int, int] | None:
    """(output channels, channel axis of the weight, rank of the output) or None when unsupported."""
    weight = graph_io.const_array(node.inputs[1])
    out = node.outputs[0]
    if weight is None or out.shape is None:
        return None
    rank = len(out.shape)
    if node.op_type == "Conv":
        return weight.shape[0], 0, rank
    if node.op_type == "ConvTranspose":
        group = node.attributes.get("group")
        if group is not None and group.value != 1:
            return None
        return weight.shape[1], 1, rank
    if node.op_type == "MatMul":
        # Only 2-D: the channel axis of the output is then axis 1, as for Conv and Gemm.
        return (weight.shape[1], 1, rank) if weight.ndim == 2 and rank == 2 else None
    trans_a = node.attributes.get("transA")
    alpha = node.attributes.get("alpha")
    if (trans_a is not None and trans_a.value) or (alpha is not None and alpha.value != 1) or weight.ndim != 2:
        return None
    trans_b = node.attributes.get("transB")
    if trans_b is not None and trans_b.value:
        return weight.shape[0], 0, rank
    return weight.shape[1], 1, rank


def _per_channel(constant: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """The constant as a (channels,) vector if it broadcasts along the output's channel axis (1) only."""
    if constant.ndim > rank:
        return None
    shape = (1,) * (rank - constant.ndim) + constant.shape
    for axis, dim in enumerate(shape):
        if dim != 1 and not (axis == 1 and dim == channels):
            return None
    return np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()
