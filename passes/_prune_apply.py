"""Graph surgery for channel pruning: slice the weights around removed channels, fold constants, re-fit.

Given the channels to remove from each tracked value (:meth:`Analysis.removed_by_space`), every recorded
action is applied:

- producer: ``W ← take(W, keep, out_axis)``, ``B ← B[keep]``;
- consumer: ``W ← take(W, keep, in_axis)`` and, for each removed input channel ``c`` whose activation is the
  constant ``μ_c`` (0 for a dead ReLU channel), ``B ← B + Σ_c μ_c · Σ_k W[:, c, k]``: exact for Gemm,
  MatMul and unpadded Conv, exact for any Conv when ``μ_c = 0``; for a live channel the mean is the
  first-order compensation. Not for ConvTranspose, whose taps overlap unevenly;
- depthwise Conv: its weight and bias lose the output channels, ``group`` the input channels;
- per-channel parameters (BatchNormalization, PRelu, Mul/Add constants) lose the removed entries;
- Pad on the channel axis pads as many fewer zero channels as were removed from the padding;
- Reshape with an explicit target shape gets the new channel (or flat column, or attention head) count, also
  when the target is a Concat of runtime dims and constants (torch's ``x.view(b, s, H, D)``).

The least-squares re-fit of the layers downstream (``refit``) is :mod:`onnxopt.passes._reconstruct`.
Shapes of every touched value are cleared for shape inference to refill.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt.passes._channel_groups import Action, Analysis
from onnxopt.passes._transformer_groups import bias_add, target_pieces

__all__ = ["apply_removal"]

logger = logging.getLogger(__name__)


def apply_removal(
    model: ir.Model,
    analysis: Analysis,
    removed: Mapping[int, np.ndarray],
    means: Mapping[int, np.ndarray],
) -> None:
    """Remove ``removed[id(value)]`` channels everywhere; ``means[id(value)]`` are the activation means."""
    empty = np.array([], dtype=np.int64)
    for action in analysis.actions:
        drop = removed.get(id(action.space.value), empty)
        out_drop = removed.get(id(action.out_space.value), empty) if action.out_space is not None else empty
        if not len(drop) and not len(out_drop):
            continue
        handler = _APPLY[action.kind]
        handler(model, action, drop, removed, means)
    for space in analysis.spaces.values():
        if id(space.value) in removed and not space.value.is_graph_input() and not space.value.is_graph_output():
            space.value.shape = None


def _set_const(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def _keep(size: int, drop: np.ndarray) -> np.ndarray:
    mask = np.ones(size, dtype=bool)
    mask[drop] = False
    return np.flatnonzero(mask)


def _producer(model, action: Action, drop, removed, means) -> None:
    node = action.node
    weight = graph_io.const_array(node.inputs[1])
    keep = _keep(action.space.size, drop)
    _set_const(node.inputs[1], np.take(weight, keep, axis=action.weight_axis))
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = graph_io.const_array(node.inputs[2])
        if bias.ndim >= 1 and bias.shape[-1] == action.space.size:  # (C,) or Gemm's (1, C); a scalar stays
            _set_const(node.inputs[2], bias[..., keep])


def _consumer(model, action: Action, drop, removed, means) -> None:
    node = action.node
    weight = graph_io.const_array(node.inputs[1]).astype(np.float64)
    axis = action.weight_axis
    keep = _keep(action.space.size, drop)
    mu = means.get(id(action.space.value))
    out_axis = {"Conv": 0, "ConvTranspose": 1}.get(node.op_type, 1 - axis)
    # contribution of the removed inputs, as constants, to every output channel
    delta = None
    # ConvTranspose spreads a constant input unevenly (overlapping taps with stride > 1): no bias folding
    if mu is not None and node.op_type != "ConvTranspose" and np.any(mu[drop] != 0):
        removed_part = np.take(weight, drop, axis=axis)
        shape = [1] * weight.ndim
        shape[axis] = len(drop)
        scaled = removed_part * mu[drop].reshape(shape)
        sum_axes = tuple(i for i in range(weight.ndim) if i != out_axis)
        delta = scaled.sum(axis=sum_axes)
    new_weight = np.take(weight, keep, axis=axis)
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = graph_io.const_array(bias_value).astype(np.float64).reshape(-1) if bias_value is not None else None
    if delta is not None:
        bias = delta if bias is None else bias + delta
    dtype = graph_io.const_array(node.inputs[1]).dtype
    _set_const(node.inputs[1], new_weight.astype(dtype))
    if bias is None:
        return
    if bias_value is not None:
        _set_const(bias_value, bias.astype(dtype))
    elif node.op_type in ("Gemm", "Conv", "ConvTranspose"):
        value = graph_io.add_initializer(model.graph, f"{node.name or 'node'}_bias", bias.astype(dtype))
        node.resize_inputs(3)
        node.replace_input_with(2, value)
    else:  # MatMul has no bias input: add the constant to the bias Add after it, or add one
        found = bias_add(node)
        if found is None:
            _append_bias_add(model, node, bias.astype(dtype))
        else:
            add, index = found
            old = graph_io.const_array(add.inputs[index])
            _set_const(add.inputs[index], (old.astype(np.float64) + bias).astype(old.dtype))


def _depthwise(model, action: Action, drop, removed, means) -> None:
    node = action.node
    out_drop = removed.get(id(action.out_space.value), np.array([], dtype=np.int64))
    keep_out = _keep(action.out_space.size, out_drop)
    weight = graph_io.const_array(node.inputs[1])
    _set_const(node.inputs[1], weight[keep_out])
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        _set_const(node.inputs[2], graph_io.const_array(node.inputs[2])[keep_out])
    node.attributes["group"] = ir.AttrInt64("group", action.space.size - len(drop))


def _param(model, action: Action, drop, removed, means) -> None:
    node = action.node
    keep = _keep(action.space.size, drop)
    rank = len(action.space.value.shape) if action.space.value.shape is not None else None
    for index in action.param_inputs:
        value = node.inputs[index]
        if value is None:
            continue
        array = graph_io.const_array(value)
        if array.size != action.space.size:
            continue  # a scalar applies to every channel
        if node.op_type in ("BatchNormalization", "PRelu", "InstanceNormalization") and array.ndim == 1:
            _set_const(value, array[keep])
            continue
        axis = array.ndim - (rank - action.space.axis) if rank is not None else array.ndim - 1
        _set_const(value, np.take(array, keep, axis=axis))


def _pad(model, action: Action, drop, removed, means) -> None:
    node = action.node
    out_drop = removed.get(id(action.out_space.value), np.array([], dtype=np.int64))
    rank = len(action.space.value.shape)
    pads_attr = node.attributes.get("pads")
    pads = np.array(pads_attr.value if pads_attr is not None else graph_io.const_array(node.inputs[1]), np.int64)
    before, after = int(pads[action.space.axis]), int(pads[action.space.axis + rank])
    pads[action.space.axis] = before - int(np.sum(out_drop < before))
    pads[action.space.axis + rank] = after - int(np.sum(out_drop >= action.out_space.size - after))
    if pads_attr is not None:
        node.attributes["pads"] = ir.AttrInt64s("pads", pads.tolist())
    else:
        _replace_const_input(model, node, 1, pads)


def _reshape(model, action: Action, drop, removed, means) -> None:
    node = action.node
    pieces = target_pieces(node)
    if pieces is None:
        return
    out = action.out_space
    offset = 0
    for owner, index, array, length in pieces:
        if offset <= out.axis < offset + length:
            if array is not None and array[out.axis - offset] == out.size:
                out_drop = removed.get(id(out.value), np.array([], dtype=np.int64))
                new = array.copy()
                new[out.axis - offset] = out.size - len(out_drop)
                _replace_const_input(model, owner, index, new)
            return
        offset += length


def _replace_const_input(model: ir.Model, node: ir.Node, index: int, array: np.ndarray) -> None:
    value = node.inputs[index]
    if len(value.uses()) == 1 and value.is_initializer() and not value.is_graph_input():
        _set_const(value, array)
        return
    node.replace_input_with(index, graph_io.add_initializer(model.graph, f"{value.name}_pruned", array))


def _append_bias_add(model: ir.Model, node: ir.Node, bias: np.ndarray) -> None:
    graph = model.graph
    out = node.outputs[0]
    const = graph_io.add_initializer(graph, f"{node.name or out.name}_bias", bias)
    add = ir.node("Add", [out, const], name=graph_io.fresh_name(graph, f"{node.name}_bias_add"))
    uses = [(use.node, use.idx) for use in out.uses() if use.node is not add]
    graph.insert_after(node, add)
    for consumer, index in uses:
        consumer.replace_input_with(index, add.outputs[0])
    if out.is_graph_output():
        ir.convenience.replace_all_uses_with(out, add.outputs[0], replace_graph_outputs=True)
    graph_io.copy_dtype(out, add.outputs[0])


_APPLY = {
    "producer": _producer,
    "consumer": _consumer,
    "depthwise": _depthwise,
    "param": _param,
    "pad": _pad,
    "reshape": _reshape,
}
