"""Measured latency for prune: how much time each layer group's channels cost, from onnxruntime's profiler.

:func:`layer_times` attributes the kernel times of onnxruntime's optimized graph (:func:`onnxopt.runtime.node_times`)
to the input model's Conv, ConvTranspose, Gemm and MatMul nodes. onnxruntime renames what it rewrites: a Conv
re-laid out in blocked NCHWc format is named after the value it writes plus ``_nchwc``, and that value is often
the output of the activation, BatchNormalization or residual Add fused into it; the way back walks from the value's
producer through those element-wise ops to the layer. Kernels that are not layers (re-layouts, pooling) are left
out.

:func:`unit_costs` turns those times into each layer group's time per unit (channel or neuron): every layer that
produces, reads or convolves depthwise a value of the group saves about ``time / channels`` per channel removed.
The proxy allocation (:class:`onnxopt.passes._prune_proxy.Curves`) then ranks each group's ratio steps by the time
they save against the output error they cost, instead of by the error alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.passes._channel_groups import Analysis

__all__ = ["layer_times", "unit_costs", "measured_unit_costs", "recorded_node_times"]

logger = logging.getLogger(__name__)

LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# kernels that run a layer (onnxruntime's fused and re-laid-out forms included)
LAYER_KERNELS = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})
# element-wise ops onnxruntime fuses into the layer before them: the way back from a fused kernel's output
FUSED = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "BatchNormalization", "Add", "Sum",
                   "Mul", "Div", "Identity", "HardSwish"})  # fmt: skip
_RENAMED = re.compile(r"(_nchwc|_token_\d+)$")


def layer_times(model: ir.Model, times: Mapping[str, tuple[str, float]]) -> dict[ir.Node, float]:
    """Microseconds per layer node of ``model`` from the profiled kernels ``times`` (name: (op, µs)). onnxruntime
    names an unnamed node ``<op>_<index>``, as it is here."""
    nodes = {(node.name or f"{node.op_type}_{i}"): node for i, node in enumerate(model.graph)}
    producers = {out.name: node for node in model.graph for out in node.outputs if out.name}
    result: dict[ir.Node, float] = {}
    for name, (op, us) in times.items():
        if op not in LAYER_KERNELS:
            continue
        node = nodes.get(name)
        if node is None:
            base = _RENAMED.sub("", name)
            node = nodes.get(base) or producers.get(base)
        layer = _layer_before(node)
        if layer is None:
            logger.debug("prune latency: kernel %s (%s) matches no layer of the model", name, op)
            continue
        result[layer] = result.get(layer, 0.0) + us
    return result


def _layer_before(node: ir.Node | None, depth: int = 4) -> ir.Node | None:
    """``node`` if it is a layer, else the layer whose output reaches it through fused element-wise ops."""
    for _ in range(depth + 1):
        if node is None or node.op_type in LAYERS:
            return node
        if node.op_type not in FUSED:
            return None
        producers = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
        # a residual Add: the layer is the input computed by a layer (the other is the skip connection)
        node = next((p for p in producers if p.op_type in LAYERS), producers[0] if producers else None)
    return None


def unit_costs(analysis: Analysis, layer_us: Mapping[ir.Node, float], groups: list[int]) -> dict[int, float]:
    """Microseconds one unit of each group in ``groups`` costs: ``Σ time / channels`` over the layers that produce,
    read or convolve (depthwise) its values. A group without a timed layer gets the mean of the others."""
    owner = analysis._slot_owner()
    group_of: dict[int, int] = {}
    for unit in analysis.units:
        for slot in unit.slots:
            group_of.setdefault(id(owner[slot]), unit.group)
    costs = dict.fromkeys(groups, 0.0)
    seen = set()
    for action in analysis.actions:
        if action.kind not in ("producer", "consumer", "depthwise"):
            continue
        group = group_of.get(id(action.space))
        us = layer_us.get(action.node)
        key = (id(action.node), id(action.space))
        if group not in costs or us is None or key in seen or action.space.size == 0:
            continue
        seen.add(key)
        costs[group] += us / action.space.size
    timed = [c for c in costs.values() if c > 0]
    fill = float(np.mean(timed)) if timed else 1.0
    return {g: (c if c > 0 else fill) for g, c in costs.items()}


def measured_unit_costs(
    model: ir.Model, analysis: Analysis, groups: list[int], feeds: Mapping[str, np.ndarray]
) -> tuple[dict[int, float], float] | None:
    """:func:`unit_costs` from a profile of ``model`` on ``feeds``, and the total layer time (µs); ``None`` when the
    profile matched no layer (the caller ranks by error alone)."""
    try:
        layers = layer_times(model, recorded_node_times(model, feeds))
    except Exception as e:  # a model onnxruntime optimizes differently than it runs unoptimized: rank by error
        logger.info("prune latency: no profile (%s)", e)
        return None
    if not layers:
        return None
    return unit_costs(analysis, layers, groups), float(sum(layers.values()))


def recorded_node_times(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[str, float]]:
    """onnxruntime's per-node profile of ``model`` on ``feeds`` (:func:`onnxopt.runtime.node_times`: node name ->
    (op type, µs)), kept in the latency record (:mod:`onnxopt.latency_cache`, keyed by the model's bytes, the
    feeds' shapes, the CPU and onnxruntime). The allocation ranks groups by these times, and a profile measured
    afresh moves by a few percent from run to run, enough to change which candidates the search checks (MobileNetV2
    pruned to 0.987 of its MACs in one run and 0.962 in another). With the record, the same command on the same
    machine prunes the same."""
    from onnxopt import graph as graph_io
    from onnxopt import latency
    from onnxopt.runtime import node_times

    def measure() -> dict[str, list]:
        return {name: [op, float(us)] for name, (op, us) in node_times(path, feeds).items()}

    with graph_io.temporary_model_file(model) as path:
        times, _ = latency.recorded([path], feeds, measure, valid=lambda v: isinstance(v, dict) and bool(v),
                                    purpose="prune-profile")  # fmt: skip
    return {name: (str(op), float(us)) for name, (op, us) in times.items()}
