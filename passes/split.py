"""`split`: factorize k×k convolutions into cheaper pairs, only where it saves work.

``mode="spatial"`` (DecomposeMe, thesis 2.5.1): a Conv with kernel kh×kw, K inputs, L outputs becomes a
kh×1 Conv (K → P) followed by a 1×kw Conv (P → L). With the kernel reshaped to the (K·kh)×(L·kw) matrix
``M[(k,i),(l,j)] = W[l,k,i,j]`` and ``M = U·S·Vᵀ``::

    W1[p, k, i, 0] = U[(k,i), p]·√s_p        W2[l, p, 0, j] = √s_p·Vᵀ[p, (l,j)]

so the pair is exact at full rank P = rank(M) and the best rank-P approximation otherwise. Stride, padding
and dilation split per axis (vertical ones on the first conv, horizontal ones on the second); ``auto_pad``
becomes explicit pads; the bias moves to the second conv. Exact with zero padding too: the first conv has
no bias, so the columns the second conv pads are the zeros the original saw.

``mode="depthwise"``: the Conv becomes a depthwise kh×kw Conv with channel multiplier I (K → K·I) followed
by a 1×1 Conv (K·I → L), from a per-input-channel SVD ``W[:, k] = A_k·S_k·F_kᵀ`` (L × kh·kw): filter
``(k, i)`` is ``F_k[:, i]``, pointwise column ``k·I + i`` is ``A_k[:, i]·s_i``. Exact for I = min(L, kh·kw).

A layer is split only when the pair needs fewer MACs *and* fewer parameters than the original, computed
from the real shapes (thesis: P < N·K·L/(K+L); depthwise: I·K·(N² + L) < N²·K·L). The rank: ``rank`` fixed,
``energy`` (fraction of Σσ² kept), or per layer the smallest rank whose whole-model result passes the run's
error budget (bisection, most compressible layers first). Grouped convolutions and ConvTranspose are skipped.

Fewer MACs in two kernels can run slower than one, so with ``latency_guard`` the split model is timed against its
input as ``prune``'s result is (:func:`onnxopt.latency.slower`: the run's data and one sample, 1 thread, the latency
record), and the input kept when the split model is clearly slower; the figures are ``details["split_latency"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt import latency
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip
from onnxopt.stats import conv_pads

__all__ = ["SplitConfig", "ConvSplitPass", "split_spatial", "split_depthwise"]

logger = logging.getLogger(__name__)

MODES = ("spatial", "depthwise")


@dataclasses.dataclass(frozen=True)
class SplitConfig(PassConfig):
    mode: str = dataclasses.field(default="spatial", metadata={"choices": MODES, "help": "how to factorize"})
    rank: int = dataclasses.field(default=0, metadata={"help": "fixed rank P (spatial) or multiplier I (0: choose)"})
    energy: float = dataclasses.field(
        default=-1.0, metadata={"help": "keep this fraction of the singular value energy (<0: search the budget)"}
    )
    latency_guard: bool = dataclasses.field(
        default=True, metadata={"help": "time the split model against its input; keep the input if it is slower"}
    )
    latency_margin: float = dataclasses.field(
        default=0.05, metadata={"help": "relative slow-down of the split model that counts as slower"}
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"split mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.rank < 0 or self.energy > 1:
            raise ValueError("split: rank >= 0 and energy <= 1")
        if not 0 <= self.latency_margin < 1:
            raise ValueError(f"split latency_margin must be in [0, 1), got {self.latency_margin}")


def split_spatial(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W1: P×K×kh×1, W2: L×P×1×kw, singular values) for ``weight`` L×K×kh×kw."""
    l_out, k_in, kh, kw = weight.shape
    matrix = weight.astype(np.float64).transpose(1, 2, 0, 3).reshape(k_in * kh, l_out * kw)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(s[:rank])
    w1 = (u[:, :rank] * root).reshape(k_in, kh, rank).transpose(2, 0, 1)[..., None]
    w2 = (root[:, None] * vt[:rank]).reshape(rank, l_out, kw).transpose(1, 0, 2)[:, :, None, :]
    return w1, w2, s


def split_depthwise(weight: np.ndarray, multiplier: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depthwise: K·I×1×kh×kw, pointwise: L×K·I×1×1, per-channel singular values K×r) for ``weight``."""
    l_out, k_in, kh, kw = weight.shape
    depth = np.zeros((k_in * multiplier, 1, kh, kw))
    point = np.zeros((l_out, k_in * multiplier, 1, 1))
    spectra = []
    for k in range(k_in):
        a, s, ft = np.linalg.svd(weight[:, k].astype(np.float64).reshape(l_out, kh * kw), full_matrices=False)
        spectra.append(s)
        for i in range(min(multiplier, len(s))):
            depth[k * multiplier + i, 0] = ft[i].reshape(kh, kw)
            point[:, k * multiplier + i, 0, 0] = a[:, i] * s[i]
    return depth, point, np.array(spectra)


@dataclasses.dataclass
class _Site:
    node: ir.Node
    weight: np.ndarray
    attrs: dict
    pads: list[int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    max_rank: int
    spectrum: np.ndarray  # singular values, flattened, for ordering and energy


class ConvSplitPass(OptPass):
    """Split k×k convolutions into k×1 + 1×k (spatial) or depthwise + pointwise pairs where it saves work."""

    name = "split"
    exact = False
    config_class = SplitConfig

    def call(self, model: ir.Model) -> OptResult:
        config: SplitConfig = self.config
        sites, skipped = self._sites(model)
        check = self.context.check if self.context is not None else None
        if not config.rank and config.energy < 0 and check is None:
            raise ir.passes.PreconditionError("split: give --split-rank or --split-energy, or data and a budget")
        if not sites and not skipped:
            return OptResult(model, modified=False, skipped=[Skip("model", "no Conv with a kernel larger than 1x1")])
        if not config.rank and config.energy < 0:  # at most one check, then a bisection, per layer (progress)
            self.expect_trials(sum(1 + int(site.max_rank).bit_length() for site in sites))
        order = sorted(sites, key=lambda s: _tail(s.spectrum, max(1, s.max_rank // 4)))
        guarded = config.latency_guard and self.context is not None
        original = model.clone() if guarded else None
        changes: list[Change] = []
        for site in order:
            rank = self._choose_rank(model, site)
            if rank is None:
                reason = "no rank that saves work keeps the error budget"
                if config.rank or config.energy >= 0:
                    reason = f"the rank asked for would not save work (at most rank {site.max_rank} does)"
                skipped.append(Skip(_name(site.node), reason))
                continue
            before = _macs_before(site)
            _replace(model, site, rank, config.mode)
            after = _macs_after(site, rank, config.mode)
            what = f"{config.mode} rank {rank}: {before:,} -> {after:,} MACs per sample"
            changes.append(Change(_name(site.node), what))
        if changes and guarded:
            # fewer MACs in two kernels can run slower than one (small maps, small channel counts: LeNet-5 with
            # BatchNorm came out 1.08x its input at batch 10 in bench/run.py)
            why, figures = slower(self.context, original, model, margin=config.latency_margin, rounds=15)
            details = {"split_latency": figures}
            if why is not None:
                graph_io.adopt(model, original)
                skipped = [Skip("model", f"reverted: {why}"), *[Skip(c.site, c.what) for c in changes], *skipped]
                return OptResult(model, modified=False, skipped=skipped, details=details)
            return OptResult(model, modified=True, changes=changes, skipped=skipped, details=details)
        return OptResult(model, modified=bool(changes), changes=changes, skipped=skipped)

    def _choose_rank(self, model: ir.Model, site: _Site) -> int | None:
        config: SplitConfig = self.config
        if config.rank:
            return config.rank if config.rank <= site.max_rank else None
        if config.energy >= 0:
            energy = np.cumsum(np.sort(site.spectrum)[::-1] ** 2)
            energy /= max(float(energy[-1]), 1e-30)
            if config.mode == "depthwise":  # multiplier: the energy kept in every input channel
                per = np.cumsum(site.spectrum.reshape(site.weight.shape[1], -1) ** 2, axis=1)
                per /= np.maximum(per[:, -1:], 1e-30)
                rank = int(max(np.searchsorted(row, config.energy - 1e-12) + 1 for row in per))
            else:
                rank = int(np.searchsorted(energy, config.energy - 1e-12) + 1)
            return rank if rank <= site.max_rank else None
        # Ranks past the weight's numerical rank change nothing: start the bisection there (placeholder and
        # low-rank weights then cost one check instead of log2(max_rank)).
        lo, hi = 1, min(site.max_rank, _numerical_rank(site, config.mode))
        if not self._passes(model, site, hi):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if self._passes(model, site, mid):
                hi = mid
            else:
                lo = mid + 1
        return hi

    def _passes(self, model: ir.Model, site: _Site, rank: int) -> bool:
        candidate = model.clone()
        node = list(candidate.graph)[list(model.graph).index(site.node)]
        _replace(candidate, dataclasses.replace(site, node=node), rank, self.config.mode)
        return self.context.check(candidate).ok

    def _sites(self, model: ir.Model) -> tuple[list[_Site], list[Skip]]:
        sites, skipped = [], []
        mode = self.config.mode
        for node in model.graph:
            if node.op_type not in ("Conv", "ConvTranspose") or node.domain not in ("", "ai.onnx"):
                continue
            name = _name(node)
            if node.op_type == "ConvTranspose":
                skipped.append(Skip(name, "ConvTranspose is not split"))
                continue
            weight = graph_io.const_array(node.inputs[1])
            if weight is None or weight.ndim != 4 or weight.dtype.kind != "f":
                continue
            l_out, k_in, kh, kw = weight.shape
            if kh * kw == 1:
                continue
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("group", 1) != 1:
                skipped.append(Skip(name, f"grouped Conv (group {attrs['group']})"))
                continue
            if node.inputs[1].is_graph_input() or len(node.inputs[1].uses()) != 1:
                skipped.append(Skip(name, "weight is shared or a graph input"))
                continue
            x, y = node.inputs[0].shape, node.outputs[0].shape
            if x is None or y is None or not all(isinstance(d, int) for d in list(x)[2:] + list(y)[2:]):
                skipped.append(Skip(name, "spatial shape unknown (give --input-shape)"))
                continue
            strides = list(attrs.get("strides") or [1, 1])
            dilations = list(attrs.get("dilations") or [1, 1])
            pads = conv_pads(tuple(x)[2:], (kh, kw), strides, dilations, attrs)
            site = _Site(node, weight, attrs, pads, tuple(x)[2:], tuple(y)[2:], 0, np.zeros(1))
            limit = kh * kw if mode == "depthwise" else min(k_in * kh, l_out * kw)
            site.max_rank = max((r for r in range(1, limit + 1) if _saves(site, r, mode)), default=0)
            if not site.max_rank:
                skipped.append(Skip(name, f"{mode} split cannot save work for {l_out}x{k_in}x{kh}x{kw}"))
                continue
            site.spectrum = (
                split_spatial(weight, 1)[2] if mode == "spatial" else split_depthwise(weight, 1)[2]
            ).reshape(-1)
            sites.append(site)
        return sites, skipped


def slower(context, model: ir.Model, split: ir.Model, *, margin: float, rounds: int) -> tuple[str | None, dict]:
    """:func:`onnxopt.latency.slower` for ``split`` (figures ``input_us``, ``split_us``, ...; its own record key)."""
    return latency.slower(context, model, split, margin=margin, rounds=rounds, purpose="split latency guard",
                          label="split")  # fmt: skip


def _name(node: ir.Node) -> str:
    return node.name or node.outputs[0].name


def _numerical_rank(site: _Site, mode: str) -> int:
    """Singular values above 1e-6 of the largest (per input channel for depthwise): the rank that is exact."""
    rows = site.spectrum.reshape(site.weight.shape[1], -1) if mode == "depthwise" else site.spectrum.reshape(1, -1)
    top = np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-30)
    return max(1, int((np.abs(rows) > top * 1e-6).sum(axis=1).max()))


def _tail(spectrum: np.ndarray, keep: int) -> float:
    energy = np.sort(spectrum)[::-1] ** 2
    total = float(energy.sum())
    return float(energy[keep:].sum()) / total if total else 0.0


def _macs_before(site: _Site) -> int:
    l_out, k_in, kh, kw = site.weight.shape
    return math.prod(site.out_hw) * l_out * k_in * kh * kw


def _macs_after(site: _Site, rank: int, mode: str) -> int:
    l_out, k_in, kh, kw = site.weight.shape
    if mode == "depthwise":
        return math.prod(site.out_hw) * (k_in * rank * kh * kw + k_in * rank * l_out)
    # the first conv keeps the full (padded-free) width: only vertical stride, padding and dilation apply
    mid_w = site.in_hw[1]
    return site.out_hw[0] * mid_w * rank * k_in * kh + math.prod(site.out_hw) * l_out * rank * kw


def _saves(site: _Site, rank: int, mode: str) -> bool:
    l_out, k_in, kh, kw = site.weight.shape
    params = rank * k_in * (kh * kw + l_out) if mode == "depthwise" else rank * (k_in * kh + l_out * kw)
    return _macs_after(site, rank, mode) < _macs_before(site) and params < l_out * k_in * kh * kw


def _replace(model: ir.Model, site: _Site, rank: int, mode: str) -> None:
    graph, node = model.graph, site.node
    dtype = site.weight.dtype
    base = _name(node)
    strides = list(site.attrs.get("strides") or [1, 1])
    dilations = list(site.attrs.get("dilations") or [1, 1])
    top, left, bottom, right = site.pads
    if mode == "spatial":
        w1, w2, _ = split_spatial(site.weight, rank)
        first_attrs = {"kernel_shape": [w1.shape[2], 1], "strides": [strides[0], 1], "dilations": [dilations[0], 1],
                       "pads": [top, 0, bottom, 0]}  # fmt: skip
        second_attrs = {"kernel_shape": [1, w2.shape[3]], "strides": [1, strides[1]], "dilations": [1, dilations[1]],
                        "pads": [0, left, 0, right]}  # fmt: skip
    else:
        w1, w2, _ = split_depthwise(site.weight, rank)
        first_attrs = {"kernel_shape": list(site.weight.shape[2:]), "strides": strides, "dilations": dilations,
                       "pads": site.pads, "group": site.weight.shape[1]}  # fmt: skip
        second_attrs = {"kernel_shape": [1, 1]}
    w1_value = graph_io.add_initializer(graph, f"{base}_split_a", w1.astype(dtype))
    w2_value = graph_io.add_initializer(graph, f"{base}_split_b", w2.astype(dtype))
    first = ir.node(
        "Conv", [node.inputs[0], w1_value], attributes=first_attrs, name=graph_io.fresh_name(graph, f"{base}_split_0")
    )
    first.outputs[0].name = graph_io.fresh_name(graph, f"{base}_split_h")
    graph_io.copy_dtype(node.outputs[0], first.outputs[0])
    graph.insert_before(node, first)
    for key in ("auto_pad", "pads", "strides", "dilations", "kernel_shape", "group"):
        node.attributes.pop(key, None)
    for key, value in second_attrs.items():
        node.attributes[key] = ir.AttrInt64s(key, value) if isinstance(value, list) else ir.AttrInt64(key, value)
    node.replace_input_with(0, first.outputs[0])
    node.replace_input_with(1, w2_value)
