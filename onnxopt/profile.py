"""Where a model's time goes: onnxruntime's per-kernel profile, summed by the kind of work each kernel does.

``onnxopt bench A.onnx B.onnx --profile`` prints it side by side, so that an int8 model that is not as much faster
as its 1x1 convolutions says why: on x86, onnxruntime runs a depthwise convolution in int8 no faster than in float
on one sample (MobileNetV2 at batch 1 on AVX-512 VNNI: 1.1 ms in both), while its 1x1 convolutions run 3x faster,
so the depthwise share of the time grows from 15% of the float model's to 30% of the int8 model's
(``bench/results/where_time_goes.md``).

The profile is of the graph onnxruntime runs, with all optimizations, as deployed: kernels are the nodes of its
optimized graph (fused ``Conv`` + activation, blocked NCHWc ``Conv``, ``QLinearConv`` made of a ``Q/DQ`` pattern,
the layout changes it inserts), each timed by onnxruntime's profiler, median over the runs after one warm-up.
Kinds come from a handler table keyed by op type (:data:`KINDS`); a convolution is told apart by its ``group``
attribute and weight shape in the optimized graph (which onnxruntime writes beside the profile):

- depthwise conv: ``group`` > 1 and one input channel per group;
- grouped conv: other ``group`` > 1;
- 1x1 conv: every kernel dimension 1;
- spatial conv: the others (3x3, 5x5, ...);
- an op the table does not know counts as ``other``.

Kernel times are summed, so the total leaves out what runs between kernels (a session's own overhead, well
under 1% on an image model); the figures of two models come from two profiles run one after the other, not
interleaved, so compare kinds, not totals under 5%.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["Kernel", "Profile", "KINDS", "KIND_ORDER", "kind_of", "profile", "kinds_rows", "shares_text"]

logger = logging.getLogger(__name__)

KIND_ORDER = (
    "depthwise conv", "1x1 conv", "spatial conv", "grouped conv", "transposed conv", "matmul/gemm", "attention",
    "normalization", "element-wise", "pooling/resize", "quantize/dequantize", "layout/copy", "other",
)  # fmt: skip

# index of the weight among a convolution kernel's inputs
_CONV_WEIGHT = {"Conv": 1, "FusedConv": 1, "NhwcFusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}


def _conv_kind(node: ir.Node | None) -> str:
    """Depthwise, grouped, 1x1 or spatial, from the optimized graph's node (``spatial conv`` when unknown)."""
    if node is None:
        return "spatial conv"
    index = _CONV_WEIGHT.get(node.op_type, 1)
    weight = node.inputs[index] if len(node.inputs) > index else None
    shape = weight.shape if weight is not None else None
    if shape is None and weight is not None and weight.const_value is not None:
        shape = weight.const_value.shape
    group = node.attributes.get("group")
    groups = group.value if group is not None else 1
    dims = [d if isinstance(d, int) else None for d in shape] if shape is not None else None
    if groups > 1:
        return "depthwise conv" if dims is not None and len(dims) > 1 and dims[1] == 1 else "grouped conv"
    if dims is not None and len(dims) > 2 and all(d == 1 for d in dims[2:]):
        return "1x1 conv"
    kernel = node.attributes.get("kernel_shape")
    if kernel is not None and all(k == 1 for k in kernel.value):
        return "1x1 conv"
    return "spatial conv"


def _table() -> dict[str, str | Callable[[ir.Node | None], str]]:
    kinds: dict[str, str | Callable[[ir.Node | None], str]] = dict.fromkeys(_CONV_WEIGHT, _conv_kind)
    groups = {
        "transposed conv": ("ConvTranspose", "QLinearConvTranspose"),
        "matmul/gemm": ("Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QGemm", "QLinearMatMul", "MatMulInteger",
                        "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "Einsum"),
        "attention": ("Attention", "QAttention", "MultiHeadAttention", "GroupQueryAttention", "Softmax",
                      "QLinearSoftmax", "LogSoftmax"),
        "normalization": ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization",
                          "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "BatchNormalization",
                          "InstanceNormalization", "GroupNorm", "GroupNormalization", "LpNormalization"),
        "element-wise": ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Abs", "Neg", "Reciprocal",
                         "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf",
                         "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd", "Sum", "Max", "Min", "Where",
                         "Equal", "Greater", "Less", "Not", "And", "Or", "QLinearAdd", "QLinearMul",
                         "QLinearSigmoid", "QLinearLeakyRelu", "ReduceMean", "ReduceSum", "ReduceMax"),
        "pooling/resize": ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "QLinearAveragePool",
                           "QLinearGlobalAveragePool", "Resize", "Upsample", "NhwcMaxPool", "LRN"),
        "quantize/dequantize": ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
        "layout/copy": ("Transpose", "ReorderInput", "ReorderOutput", "Reshape", "Flatten", "Squeeze",
                        "Unsqueeze", "Concat", "QLinearConcat", "Split", "Slice", "Gather", "GatherElements",
                        "Pad", "Expand", "Tile", "Identity", "Cast", "DepthToSpace", "SpaceToDepth", "Shape",
                        "MemcpyToHost", "MemcpyFromHost"),
    }  # fmt: skip
    for kind, ops in groups.items():
        kinds.update(dict.fromkeys(ops, kind))
    return kinds


# op type -> kind, or a function of the optimized graph's node (None when not found) giving the kind
KINDS: dict[str, str | Callable[[ir.Node | None], str]] = _table()


def kind_of(op_type: str, node: ir.Node | None = None) -> str:
    """The kind of work of a kernel of ``op_type`` (``node``: its node in the optimized graph, if known)."""
    handler = KINDS.get(op_type, "other")
    return handler(node) if callable(handler) else handler


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of the optimized graph: its node name, op type, kind and median time (microseconds)."""

    name: str
    op: str
    kind: str
    us: float


@dataclasses.dataclass
class Profile:
    """A model's kernels as profiled on ``feeds`` (input name -> shape) with ``threads`` intra-op threads."""

    kernels: list[Kernel]
    feeds: dict[str, list[int]]
    threads: int
    runs: int

    @property
    def total_us(self) -> float:
        return float(sum(k.us for k in self.kernels))

    def by_kind(self) -> dict[str, float]:
        """Microseconds per kind, in :data:`KIND_ORDER`; kinds without a kernel are left out."""
        sums: dict[str, float] = {}
        for kernel in self.kernels:
            sums[kernel.kind] = sums.get(kernel.kind, 0.0) + kernel.us
        return {kind: sums[kind] for kind in KIND_ORDER if kind in sums}

    def top(self, count: int) -> list[Kernel]:
        return sorted(self.kernels, key=lambda k: -k.us)[:count]

    def to_json(self, top: int = 10) -> dict[str, Any]:
        return {
            "total_us": round(self.total_us, 1),
            "kinds_us": {kind: round(us, 1) for kind, us in self.by_kind().items()},
            "top": [dataclasses.asdict(k) | {"us": round(k.us, 1)} for k in self.top(top)],
            "feeds": self.feeds, "threads": self.threads, "runs": self.runs,
        }  # fmt: skip


def profile(
    source: ir.Model | str | os.PathLike, feeds: Mapping[str, np.ndarray], *, runs: int = 10, threads: int = 1
) -> Profile:
    """Profile ``source`` on ``feeds`` (``runs`` runs after a warm-up, ``threads`` intra-op threads, all of
    onnxruntime's optimizations) and sort its kernels into kinds."""
    from onnxopt.runtime import Session, kernel_times

    try:
        session = Session(source, optimize=True, threads=threads, profile=True, save_optimized=True)
    except Exception as e:  # onnxruntime could not write its optimized graph: kinds from op types alone
        logger.info("profile: without onnxruntime's optimized graph (%s)", e)
        session = Session(source, optimize=True, threads=threads, profile=True)
    times = kernel_times(session, feeds, runs=runs)
    nodes = _optimized_nodes(session.optimized_path)
    kernels = [Kernel(name, op, kind_of(op, nodes.get(name)), us) for name, (op, us) in times.items()]
    shapes = {name: list(np.shape(array)) for name, array in feeds.items()}
    return Profile(kernels, shapes, threads, runs)


def _optimized_nodes(path) -> dict[str, ir.Node]:
    """The nodes of the optimized graph onnxruntime wrote, by name; empty when it wrote none or it cannot be read
    (kinds then come from op types alone)."""
    if path is None or not path.exists():
        return {}
    try:
        model = ir.load(path)
    except Exception as e:  # the profile stands without it
        logger.info("profile: cannot read onnxruntime's optimized graph (%s)", e)
        return {}
    return {node.name: node for node in model.graph.all_nodes() if node.name}


def kinds_rows(named: Sequence[tuple[str, Profile]]) -> list[tuple[str, ...]]:
    """A table of microseconds (and share of the model's total) per kind, one column per profile; with two or more
    profiles, a last column of each later one's time over the first's per kind (``-``: a kind the first lacks)."""
    sums = [p.by_kind() for _, p in named]
    kinds = [k for k in KIND_ORDER if any(k in s for s in sums)]
    ratio = len(named) > 1
    header = ["kind"] + [name for name, _ in named] + (["x first"] if ratio else [])
    rows = [tuple(header)]
    totals = [p.total_us for _, p in named]
    for kind in kinds + ["total"]:
        values = totals if kind == "total" else [s.get(kind, 0.0) for s in sums]
        cells = [kind]
        for value, total, kinds_us in zip(values, totals, sums, strict=True):
            if kind != "total" and kind not in kinds_us:
                cells.append("-")
                continue
            share = f" ({100 * value / total:.0f}%)" if kind != "total" and total > 0 else ""
            cells.append(f"{value:,.0f}{share}")
        if ratio:
            base = values[0]
            cells.append(" / ".join("-" if base <= 0 else f"{v / base:.2f}" for v in values[1:]))
        rows.append(tuple(cells))
    return rows


def shares_text(original: Profile, optimized: Profile, *, min_share: float = 0.1) -> str:
    """The kinds that take at least ``min_share`` of ``optimized``'s kernel time, largest first, each with its share
    and its time over ``original``'s for the same kind: ``"1x1 conv 55% at 0.32x the original's, depthwise conv 31%
    at 0.89x the original's"``. Empty when no kernel was timed."""
    before, after, total = original.by_kind(), optimized.by_kind(), optimized.total_us
    parts = []
    for kind, us in sorted(after.items(), key=lambda item: -item[1]):
        if total <= 0 or us < min_share * total:
            continue
        base = before.get(kind, 0.0)
        versus = f"at {us / base:.2f}x the original's" if base > 0 else "(the original has none)"
        parts.append(f"{kind} {100 * us / total:.0f}% {versus}")
    return ", ".join(parts)
