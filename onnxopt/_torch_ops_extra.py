"""torch implementations of the ops that transformer encoders and shape arithmetic use, for :mod:`onnxopt.finetune`.

The CNN/MLP ops live in ``finetune._ops()``; these are the ones an exported BERT-style encoder adds (embedding
``Gather``, ``LayerNormalization``, ``Erf``/``Gelu``, the attention-mask arithmetic ``Equal``/``Where``/``Expand``, and
the ``Shape``/``Slice``/``Concat`` chains exporters emit for dynamic sequence lengths). Each entry takes the node's
input tensors (``None`` for an omitted optional input) and its attributes, and returns the first output.

Integer tensors (shapes, indices, masks) flow through as torch int64/bool tensors; only float initializers are
trained, so these integer paths never carry gradients.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EXTRA_OPS", "extra_ops"]

# ONNX TensorProto data type -> torch dtype name
_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
}

EXTRA_OPS = frozenset(
    "Gather LayerNormalization Erf Gelu Shape Slice ConstantOfShape Equal Where Expand Cast ReduceSum ReduceMean "
    "Sqrt Pow Neg Exp Log Abs Less Greater Not And Or Min Max Range Tile Softplus Elu".split()
)


def _axes(args, attrs, index=1):
    if len(args) > index and args[index] is not None:
        return [int(a) for a in args[index].tolist()]
    axes = attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _reduce(kind):
    def run(args, attrs):
        x = args[0]
        axes = _axes(args, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if axes is None or not axes:
            if attrs.get("noop_with_empty_axes", 0) and axes == []:
                return x
            axes = list(range(x.dim()))
        dims = tuple(a % x.dim() for a in axes)
        return x.sum(dim=dims, keepdim=keep) if kind == "sum" else x.mean(dim=dims, keepdim=keep)

    return run


def _slice(args, attrs):
    x = args[0]
    starts = [int(s) for s in args[1].tolist()]
    ends = [int(e) for e in args[2].tolist()]
    axes = [int(a) for a in args[3].tolist()] if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = [int(s) for s in args[4].tolist()] if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step <= 0:
            raise ValueError("fine-tuning supports Slice with positive steps only")
        size = x.shape[axis]
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        index[axis % x.dim()] = slice(start, end, step)
    return x[tuple(index)]


def _layer_norm(args, attrs):
    import torch.nn.functional as F

    x, scale = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    shape = tuple(x.shape[axis:])
    return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape),
                        eps=attrs.get("epsilon", 1e-5))  # fmt: skip


def _gather(args, attrs):
    import torch

    data, index = args[0], args[1].long()
    axis = attrs.get("axis", 0) % data.dim()
    index = torch.where(index < 0, index + data.shape[axis], index)
    picked = torch.index_select(data, axis, index.reshape(-1))
    return picked.reshape(tuple(data.shape[:axis]) + tuple(index.shape) + tuple(data.shape[axis + 1 :]))


def _cast(args, attrs):
    import torch

    return args[0].to(getattr(torch, _DTYPES[int(attrs["to"])]))


def _constant_of_shape(args, attrs):
    import torch
    from onnx import numpy_helper

    value = np.array(numpy_helper.to_array(attrs["value"])) if "value" in attrs else np.zeros(1, np.float32)
    return torch.full([int(s) for s in args[0].tolist()], value.reshape(-1)[0].item(),
                      dtype=torch.from_numpy(value).dtype)  # fmt: skip


def _gelu(args, attrs):
    import torch.nn.functional as F

    approximate = attrs.get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return F.gelu(args[0], approximate=approximate)


def extra_ops():
    """The handler table: op type -> ``fn(args, attrs)``."""
    import torch
    import torch.nn.functional as F

    return {
        "Gather": _gather,
        "LayerNormalization": _layer_norm,
        "Erf": lambda a, _: torch.erf(a[0]),
        "Gelu": _gelu,
        "Shape": lambda a, at: torch.tensor(list(a[0].shape)[at.get("start", 0) : at.get("end")], dtype=torch.int64),
        "Slice": _slice,
        "ConstantOfShape": _constant_of_shape,
        "Equal": lambda a, _: a[0] == a[1],
        "Less": lambda a, _: a[0] < a[1],
        "Greater": lambda a, _: a[0] > a[1],
        "Not": lambda a, _: torch.logical_not(a[0]),
        "And": lambda a, _: torch.logical_and(a[0], a[1]),
        "Or": lambda a, _: torch.logical_or(a[0], a[1]),
        "Where": lambda a, _: torch.where(a[0].bool(), a[1], a[2]),
        "Expand": lambda a, _: a[0].expand(torch.broadcast_shapes(a[0].shape, tuple(int(s) for s in a[1].tolist()))),
        "Cast": _cast,
        "ReduceSum": _reduce("sum"),
        "ReduceMean": _reduce("mean"),
        "Sqrt": lambda a, _: torch.sqrt(a[0]),
        "Pow": lambda a, _: torch.pow(a[0], a[1]),
        "Neg": lambda a, _: -a[0],
        "Exp": lambda a, _: torch.exp(a[0]),
        "Log": lambda a, _: torch.log(a[0]),
        "Abs": lambda a, _: torch.abs(a[0]),
        "Min": lambda a, _: torch.stack(torch.broadcast_tensors(*a)).amin(0),
        "Max": lambda a, _: torch.stack(torch.broadcast_tensors(*a)).amax(0),
        "Range": lambda a, _: torch.arange(a[0].item(), a[1].item(), a[2].item()),
        "Tile": lambda a, _: a[0].repeat(*[int(r) for r in a[1].tolist()]),
        "Softplus": lambda a, _: F.softplus(a[0]),
        "Elu": lambda a, at: F.elu(a[0], at.get("alpha", 1.0)),
    }
