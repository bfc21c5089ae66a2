"""`share`: weight sharing (thesis 2.4.2): each weight tensor becomes 2^b shared values and b-bit indices.

Before::

    X ─ Conv(W: float32, K·M·k·k values) ─ Y

After::

    idx: uint4 / uint8, shape of W ─ Cast(int64) ─ Gather(codebook: 2^b float32) ─ W' ─ Conv ─ Y

The codebook is a 1-D k-means of the tensor's values (Lloyd's iterations from quantile starts), so the
shared values follow the weight distribution instead of a uniform int grid. The thesis found this impossible
in TensorFlow for lack of low-bit index types; ONNX has UINT4 (opset 21; the model's opset is raised when
needed) and UINT8, so a 4-bit tensor takes an eighth of its float32 size. ``bits`` fixes b for every tensor;
0 (default) tries b = 2, 3, ..., 8 and keeps the smallest whose whole-model result passes the run's error
budget. Only weights of Conv/ConvTranspose/Gemm/MatMul with at least ``min_size`` values, read by that node
alone, are shared. Decoding costs a Gather per weight at run time (onnxruntime does not fold it away), so
the gain is file size, not speed: run it last, after the passes that need float weights.
"""

from __future__ import annotations

import dataclasses
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip

__all__ = ["ShareConfig", "WeightSharePass", "kmeans_1d"]

logger = logging.getLogger(__name__)

_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_LOW_BIT_OPSET = 21  # UINT4 tensors and Cast from them


@dataclasses.dataclass(frozen=True)
class ShareConfig(PassConfig):
    bits: int = dataclasses.field(default=0, metadata={"help": "index bits 2-8 (0: smallest within the budget)"})
    min_size: int = dataclasses.field(default=256, metadata={"help": "share tensors with at least this many values"})

    def __post_init__(self) -> None:
        if self.bits and not 2 <= self.bits <= 8:
            raise ValueError(f"share: bits must be 0 or 2..8, got {self.bits}")


def kmeans_1d(values: np.ndarray, clusters: int, iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """(codebook sorted ascending, index per value) minimizing the squared error, by Lloyd's algorithm in 1-D."""
    flat = values.astype(np.float64).reshape(-1)
    distinct = np.unique(flat)
    if len(distinct) <= clusters:  # already shared: the codebook is exact
        return distinct, np.searchsorted(distinct, flat).reshape(values.shape)
    centroids = np.unique(np.quantile(flat, (np.arange(clusters) + 0.5) / clusters))
    for _ in range(iterations):
        edges = (centroids[1:] + centroids[:-1]) / 2
        index = np.searchsorted(edges, flat)
        sums = np.bincount(index, weights=flat, minlength=len(centroids))
        counts = np.bincount(index, minlength=len(centroids))
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(updated, centroids):
            break
        centroids = np.sort(updated)
    index = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
    return centroids, index.reshape(values.shape)


class WeightSharePass(OptPass):
    """Weight sharing: k-means codebook of 2^b values per weight tensor, stored as b-bit indices (file size)."""

    name = "share"
    exact = False
    config_class = ShareConfig
    simplify_after = False  # constant folding would decode the shared weights back into float

    def call(self, model: ir.Model) -> OptResult:
        config: ShareConfig = self.config
        sites, skipped = _sites(model, config.min_size)
        if not sites:
            return OptResult(model, modified=False, skipped=skipped or [Skip("model", "no weight to share")])
        check = self.context.check if self.context is not None else None
        if config.bits:
            bits = config.bits
        elif check is None:
            raise ir.passes.PreconditionError("share: give --share-bits, or data and a budget to search with")
        else:
            self.expect_trials(7)  # 2 to 8 bits, fewest first
            bits = next((b for b in range(2, 9) if check(_shared_copy(model, b, config.min_size)).ok), None)
            if bits is None:
                return OptResult(
                    model, modified=False, skipped=skipped + [Skip("model", "8-bit sharing misses the budget")]
                )
        if bits <= 4 and graph_io.default_opset(model) < _LOW_BIT_OPSET:
            graph_io.adopt(model, graph_io.upgrade_opset(model, _LOW_BIT_OPSET))
            sites, _ = _sites(model, config.min_size)
        changes = [_share(model, node, bits) for node in sites]
        return OptResult(model, modified=True, changes=changes, skipped=skipped)


def _sites(model: ir.Model, min_size: int) -> tuple[list[ir.Node], list[Skip]]:
    sites, skipped = [], []
    for node in model.graph:
        if node.op_type not in _WEIGHT_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        value = node.inputs[1]
        weight = graph_io.const_array(value)
        if weight is None or weight.dtype.kind != "f" or weight.size < min_size:
            continue
        if value.is_graph_input() or len(value.uses()) != 1:
            skipped.append(Skip(node.name or value.name, "weight is shared or a graph input"))
            continue
        sites.append(node)
    return sites, skipped


def _shared_copy(model: ir.Model, bits: int, min_size: int) -> ir.Model:
    candidate = model.clone()
    if bits <= 4 and graph_io.default_opset(candidate) < _LOW_BIT_OPSET:
        candidate = graph_io.upgrade_opset(candidate, _LOW_BIT_OPSET)
    for node in _sites(candidate, min_size)[0]:
        _share(candidate, node, bits)
    return candidate


def _share(model: ir.Model, node: ir.Node, bits: int) -> Change:
    graph = model.graph
    value = node.inputs[1]
    weight = graph_io.const_array(value)
    codebook, index = kmeans_1d(weight, 2**bits)
    storage = ml_dtypes.uint4 if bits <= 4 else np.uint8
    base = node.name or value.name
    idx = graph_io.add_initializer(graph, f"{base}_shared_idx", index.astype(storage))
    book = graph_io.add_initializer(graph, f"{base}_codebook", codebook.astype(weight.dtype))
    cast = ir.node(
        "Cast", [idx], attributes={"to": ir.DataType.INT64}, name=graph_io.fresh_name(graph, f"{base}_idx64")
    )
    gather = ir.node("Gather", [book, cast.outputs[0]], name=graph_io.fresh_name(graph, f"{base}_decode"))
    gather.outputs[0].dtype = ir.DataType.from_numpy(weight.dtype)
    gather.outputs[0].shape = ir.Shape(weight.shape)
    graph.insert_before(node, [cast, gather])
    node.replace_input_with(1, gather.outputs[0])
    error = float(np.sqrt(np.mean((codebook[index] - weight) ** 2)) / max(float(np.std(weight)), 1e-30))
    return Change(
        base, f"{weight.size} values -> {len(codebook)} shared ({bits}-bit indices), rms error {error:.3f} std"
    )
