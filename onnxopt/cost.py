"""Cost model: parameters, multiply-accumulates (MACs) and other ops per node, and file bytes.

Shapes come from ONNX shape inference on a clone whose dynamic input dims are fixed (batch 1 unless
given). MACs, one multiply plus one add each, as the ResNet paper counts "multiply-adds":

- ``Conv``: ``numel(Y) · (C_in / group) · prod(kernel)``  (from the weight, shape (M, C/group, *k));
- ``ConvTranspose``: ``numel(X) · (M / group) · prod(kernel)`` (weight (C, M/group, *k));
- ``Gemm``/``MatMul``: ``numel(Y) · K``, K the reduced dimension; ``MatMulNBits`` from its ``K`` attribute;
  the quantized forms (``ConvInteger``, ``QLinearConv``, ``MatMulInteger``, ``QLinearMatMul``) likewise.

Every other computing node counts ``numel`` of its first output as ``ops`` (elementwise work: BatchNorm,
activations, Add, pools per output), and data-movement nodes (Reshape, Transpose, Concat, ...) count
nothing. Parameters are the elements of floating-point and 8/4-bit integer constant inputs (initializers,
also when listed as graph inputs, and ``Constant``/``ConstantOfShape`` outputs), each counted once per model.
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

__all__ = ["NodeCost", "ModelCost", "estimate"]

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
_CONV_LIKE = {"Conv": (1, 0), "ConvInteger": (1, 0), "QLinearConv": (3, 0)}
_MATMUL_LIKE = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "Gemm": 0, "FusedMatMul": 0}


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """Cost of one node."""

    name: str
    op_type: str
    params: int
    macs: int
    ops: int
    output_shape: tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Per-node costs and model totals. ``params`` counts each shared weight once."""

    nodes: tuple[NodeCost, ...]
    params: int
    macs: int
    ops: int
    bytes: int
    weight_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"params": self.params, "macs": self.macs, "ops": self.ops, "bytes": self.bytes}


def estimate(
    model: ir.Model,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
) -> ModelCost:
    """Cost of ``model`` with dynamic input dims fixed (``input_shapes`` first, then ``batch`` for axis 0)."""
    shapes = _infer_shapes(model, dict(input_shapes or {}), batch)
    weights = _weight_values(model)
    nodes = []
    counted: set[int] = set()
    total_params = 0
    for node in model.graph:
        params = 0
        for value in node.inputs:
            if value is None or id(value) not in weights:
                continue
            numel = _numel(shapes.get(id(value)))
            params += numel
            if id(value) not in counted:
                counted.add(id(value))
                total_params += numel
        macs, ops = _node_work(node, shapes)
        out_shape = shapes.get(id(node.outputs[0])) if node.outputs else None
        nodes.append(NodeCost(node.name or "", node.op_type, params, macs, ops, out_shape))
    return ModelCost(
        nodes=tuple(nodes),
        params=total_params,
        macs=sum(n.macs for n in nodes),
        ops=sum(n.ops for n in nodes),
        bytes=graph_io.to_proto(model).ByteSize(),
        weight_bytes=graph_io.weight_bytes(model),
    )


def _node_work(node: ir.Node, shapes: Mapping[int, tuple[int, ...] | None]) -> tuple[int, int]:
    def shape_of(index: int) -> tuple[int, ...] | None:
        if index >= len(node.inputs) or node.inputs[index] is None:
            return None
        return shapes.get(id(node.inputs[index]))

    out = shapes.get(id(node.outputs[0])) if node.outputs else None
    op = node.op_type
    if op in _CONV_LIKE:
        weight = shape_of(_CONV_LIKE[op][0])
        if weight is None or out is None or len(weight) < 2:
            return 0, 0
        return _numel(out) * weight[1] * math.prod(weight[2:]), 0
    if op == "ConvTranspose":
        weight, x = shape_of(1), shape_of(0)
        if weight is None or x is None:
            return 0, 0
        return _numel(x) * weight[1] * math.prod(weight[2:]), 0
    if op in _MATMUL_LIKE:
        a = shape_of(0)
        if a is None or out is None or not a:
            return 0, 0
        if op == "Gemm":
            trans_a = node.attributes.get("transA")
            k = a[0] if trans_a is not None and trans_a.value else a[-1]
        else:
            k = a[-1]
        return _numel(out) * k, 0
    if op == "MatMulNBits":
        k_attr = node.attributes.get("K")
        return (_numel(out) * int(k_attr.value), 0) if out is not None and k_attr is not None else (0, 0)
    if op in _MOVEMENT_OPS or out is None:
        return 0, 0
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = node.attributes.get("kernel_shape")
        return 0, _numel(out) * (math.prod(kernel.value) if kernel is not None else 1)
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        x = shape_of(0)
        return 0, _numel(x) if x is not None else _numel(out)
    return 0, _numel(out)


def _weight_values(model: ir.Model) -> set[int]:
    """ids of floating-point constant values that feed nodes: initializers and Constant/ConstantOfShape outputs."""
    graph = model.graph
    weights = set()
    low_bit = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4}
    for value in graph.initializers.values():
        if value.dtype is not None and (value.dtype.is_floating_point() or value.dtype in low_bit):
            weights.add(id(value))  # float weights, and quantized ones (int8/int4 read by DequantizeLinear...)
    for node in graph:
        if node.op_type in ("Constant", "ConstantOfShape") and node.domain in ("", "ai.onnx"):
            out = node.outputs[0]
            if out.dtype is None or out.dtype.is_floating_point():
                weights.add(id(out))
    return weights


def _infer_shapes(
    model: ir.Model, overrides: dict[str, Sequence[int]], batch: int
) -> dict[int, tuple[int, ...] | None]:
    """Shapes of every value of ``model`` (keyed by ``id`` of the original values) with inputs made concrete."""
    from onnx_ir.passes.common import ShapeInferencePass

    copy = model.clone()
    for value in graph_io.data_inputs(copy):
        if value.name in overrides:
            value.shape = ir.Shape(list(overrides[value.name]))
        elif value.shape is not None:
            dims = [
                d if isinstance(d, int) and d > 0 else (batch if i == 0 else None) for i, d in enumerate(value.shape)
            ]
            if any(d is None for d in dims):
                value.shape = ir.Shape([d if d is not None else ir.SymbolicDim(None) for d in dims])
            else:
                value.shape = ir.Shape(dims)
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
    copied = {value.name: value for value in _all_values(copy) if value.name}
    result: dict[int, tuple[int, ...] | None] = {}
    for original in _all_values(model):
        twin = copied.get(original.name)
        result[id(original)] = _static(twin) if twin is not None else None
    return result


def _run_for_missing_shapes(model: ir.Model) -> None:
    """Fill shapes that static inference could not derive by running the model once.

    ONNX shape inference gives up on shapes computed at run time (the Slice+Pad shortcuts of the CIFAR
    ResNets build their pads from ConstantOfShape/Reshape/Transpose); one onnxruntime run on zeros of the
    concrete input shapes measures them instead.
    """
    from onnxopt.runtime import Session

    inputs = graph_io.data_inputs(model)
    if any(_static(v) is None or v.dtype is None for v in inputs):
        return
    graph = model.graph
    outputs = {v.name for v in graph.outputs}
    missing = [
        out
        for node in graph
        for out in node.outputs
        if out.name and _static(out) is None and out.dtype is not None and out.dtype != ir.DataType.STRING
    ]
    if not missing:
        return
    for value in missing:
        if value.name not in outputs:
            graph.outputs.append(value)
    feeds = {v.name: np.zeros(_static(v), dtype=v.dtype.numpy()) for v in inputs}
    try:
        results = Session(model).run(feeds, [v.name for v in missing])
    except Exception as e:  # a model that cannot run on zeros keeps its unknown shapes
        logger.debug("shape measurement run failed: %s", e)
        return
    for value in missing:
        value.shape = ir.Shape(list(results[value.name].shape))


def _all_values(model: ir.Model) -> list[ir.Value]:
    graph = model.graph
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
