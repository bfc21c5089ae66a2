"""`svd`: low-rank factorization of fully connected layers (Gemm, MatMul with a constant 2-D weight).

Before (X is N×K, the weight W is K×M in ``X·W`` orientation, bias b)::

    X ─ Gemm(W, b) ─ Y                    N·K·M multiply-adds, K·M weights

After, rank L::

    X ─ MatMul(O: K×L) ─ Gemm(P: L×M, b) ─ Y      N·L·(K+M) multiply-adds, L·(K+M) weights

Only where ``L·(K+M) < K·M`` (the thesis's condition ``NL(K+M) < KNM``), so a layer never gets bigger or
slower in MACs. Gemm's ``transB`` and ``alpha`` are folded into W, ``beta`` stays with the bias on the
second node; ``transA`` Gemms are skipped.

Plain SVD keeps the L largest singular triplets of W: ``O = U_L·√S_L``, ``P = √S_L·V_Lᵀ``; the output error
of any row is bounded by ``‖Δy‖ ≤ σ_{L+1}·‖x‖``. The data-aware variant (default when statistics are there)
minimizes the error of the layer's *output* on the calibration inputs instead: with ``G = E[xxᵀ] = R·Rᵀ``
(Cholesky of the input Gram matrix from the statistics collector, with a small ridge), it factorizes
``Rᵀ·W = U·S·Vᵀ`` and sets ``O = R⁻ᵀ·U_L·√S_L``, ``P = √S_L·V_Lᵀ``, which is the rank-L ``W_L`` minimizing
``E‖x·W − x·W_L‖²``.

The rank: ``rank`` fixes it for every layer; ``energy`` keeps the smallest L whose singular values hold that
fraction of ``Σσ²``; with neither, each layer's smallest L whose whole-model result passes validation within
the run's error budget is found by bisection, the most compressible layers first (a layer where no L both
saves work and passes is left alone and reported).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip
from onnxopt.stats import GramStats, StatsRequest, get_stats

__all__ = ["SvdConfig", "GemmSvdPass", "factorize"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SvdConfig(PassConfig):
    rank: int = dataclasses.field(default=0, metadata={"help": "fixed rank for every layer (0: choose)"})
    energy: float = dataclasses.field(
        default=-1.0, metadata={"help": "keep this fraction of the singular value energy (<0: search the budget)"}
    )
    data_aware: bool = dataclasses.field(default=True, metadata={"help": "whiten with the input Gram matrix"})
    min_size: int = dataclasses.field(default=16, metadata={"help": "skip layers with K or M below this"})

    def __post_init__(self) -> None:
        if self.rank < 0 or self.energy > 1 or self.min_size < 1:
            raise ValueError("svd: rank >= 0, energy <= 1 and min_size >= 1")


@dataclasses.dataclass
class _Site:
    node: ir.Node
    weight: np.ndarray  # K×M, x·W orientation, alpha folded in
    max_rank: int  # largest L with L·(K+M) < K·M


def factorize(weight: np.ndarray, rank: int, gram: GramStats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``O`` (K×L) and ``P`` (L×M) with ``O·P`` the best rank-L approximation of ``weight`` (see module doc)."""
    return _Factorization(weight, gram).at(rank)


class _Factorization:
    """One SVD of a weight (whitened by the input Gram matrix when given); factors of any rank from it."""

    def __init__(self, weight: np.ndarray, gram: GramStats | None) -> None:
        w = weight.astype(np.float64)
        self.chol = _cholesky(gram.second_moment) if gram is not None else None
        self.u, self.s, self.vt = np.linalg.svd(w if self.chol is None else self.chol.T @ w, full_matrices=False)

    def at(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        root = np.sqrt(self.s[:rank])
        left = self.u[:, :rank] * root
        if self.chol is not None:
            left = np.linalg.solve(self.chol.T, left)
        return left, root[:, None] * self.vt[:rank]


def _cholesky(gram: np.ndarray) -> np.ndarray:
    ridge = 1e-6 * max(float(np.trace(gram)) / gram.shape[0], 1e-12)
    for _ in range(6):
        try:
            return np.linalg.cholesky(gram + ridge * np.eye(gram.shape[0]))
        except np.linalg.LinAlgError:
            ridge *= 100
    raise np.linalg.LinAlgError("input Gram matrix is not positive definite")


class GemmSvdPass(OptPass):
    """Low-rank (SVD) factorization of Gemm/MatMul weights where it saves work; data-aware with statistics."""

    name = "svd"
    exact = False
    config_class = SvdConfig

    def stats_request(self, model: ir.Model) -> StatsRequest:
        if not self.config.data_aware or (self.context is not None and self.context.data is None):
            return StatsRequest()
        sites, _ = self._sites(model)
        return StatsRequest(grams=frozenset(site.node.name for site in sites))

    def call(self, model: ir.Model) -> OptResult:
        config: SvdConfig = self.config
        sites, skipped = self._sites(model)
        stats = get_stats(model) if config.data_aware else None
        grams = stats.grams if stats is not None else {}
        check = self.context.check if self.context is not None else None
        if not config.rank and config.energy < 0 and check is None:
            raise ir.passes.PreconditionError("svd: give --svd-rank or --svd-energy, or data and a budget to search")
        if not config.rank and config.energy < 0:  # at most one check, then a bisection, per layer (progress)
            self.expect_trials(sum(1 + int(site.max_rank).bit_length() for site in sites))
        factors = {id(site.node): _Factorization(site.weight, grams.get(site.node.name)) for site in sites}
        # most compressible first: the smallest fraction of layer energy outside the first few directions
        order = sorted(sites, key=lambda s: _tail_energy(factors[id(s.node)].s, max(1, s.max_rank // 4)))
        changes: list[Change] = []
        for site in order:
            factor = factors[id(site.node)]
            rank = self._choose_rank(model, site, factor)
            if rank is None:
                reason = "no rank that saves work keeps the error budget"
                if config.rank or config.energy >= 0:
                    reason = f"the rank asked for would not save work (at most rank {site.max_rank} does)"
                skipped.append(Skip(site.node.name or site.node.outputs[0].name, reason))
                continue
            k, m = site.weight.shape
            _replace(model, site, *factor.at(rank))
            ratio = rank * (k + m) / (k * m)
            changes.append(
                Change(site.node.name or site.node.outputs[0].name, f"{k}x{m} -> rank {rank} ({ratio:.2f} of the MACs)")
            )
        return OptResult(model, modified=bool(changes), changes=changes, skipped=skipped)

    def _choose_rank(self, model: ir.Model, site: _Site, factor: _Factorization) -> int | None:
        config: SvdConfig = self.config
        spectrum = factor.s
        if config.rank:
            return config.rank if config.rank <= site.max_rank else None
        if config.energy >= 0:
            energy = np.cumsum(spectrum**2) / max(float(np.sum(spectrum**2)), 1e-30)
            rank = int(np.searchsorted(energy, config.energy - 1e-12) + 1)
            return rank if rank <= site.max_rank else None
        lo, hi = 1, site.max_rank  # find the smallest passing rank in [lo, hi]
        if not self._passes(model, site, factor.at(hi)):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if self._passes(model, site, factor.at(mid)):
                hi = mid
            else:
                lo = mid + 1
        return hi

    def _passes(self, model: ir.Model, site: _Site, factors: tuple[np.ndarray, np.ndarray]) -> bool:
        candidate = model.clone()
        node = list(candidate.graph)[list(model.graph).index(site.node)]  # clones keep the node order
        twin = _Site(node, site.weight, site.max_rank)
        _replace(candidate, twin, *factors)
        return self.context.check(candidate).ok

    def _sites(self, model: ir.Model) -> tuple[list[_Site], list[Skip]]:
        sites, skipped = [], []
        for node in model.graph:
            if node.op_type not in ("Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
                continue
            site_name = node.name or node.outputs[0].name
            weight_value = node.inputs[1]
            weight = graph_io.const_array(weight_value)
            if weight is None or weight.ndim != 2 or weight.dtype.kind != "f":
                skipped.append(Skip(site_name, "no constant 2-D float weight (both inputs computed)"))
                continue
            if weight_value.is_graph_input() or len(weight_value.uses()) != 1:
                skipped.append(Skip(site_name, "weight is shared or a graph input"))
                continue
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transA", 0):
                skipped.append(Skip(site_name, "Gemm with transA"))
                continue
            w = weight.T if attrs.get("transB", 0) else weight
            w = w * attrs.get("alpha", 1.0)
            k, m = w.shape
            if min(k, m) < self.config.min_size:
                skipped.append(Skip(site_name, f"{k}x{m}: smaller than --svd-min-size {self.config.min_size}"))
                continue
            max_rank = (k * m - 1) // (k + m)
            if max_rank < 1:
                skipped.append(Skip(site_name, f"{k}x{m}: no rank saves work"))
                continue
            sites.append(_Site(node, w, max_rank))
        if not sites and not skipped:
            skipped.append(Skip("model", "no Gemm or MatMul node"))
        return sites, skipped


def _tail_energy(spectrum: np.ndarray, keep: int) -> float:
    total = float(np.sum(spectrum**2))
    return float(np.sum(spectrum[keep:] ** 2)) / total if total else 0.0


def _replace(model: ir.Model, site: _Site, left: np.ndarray, right: np.ndarray) -> None:
    """``X → MatMul(O) → (Gemm|MatMul)(P[, bias])``, in place of ``site.node``."""
    graph, node = model.graph, site.node
    dtype = site.weight.dtype
    base = node.name or node.outputs[0].name
    o = graph_io.add_initializer(graph, f"{base}_svd_O", left.astype(dtype))
    p = graph_io.add_initializer(graph, f"{base}_svd_P", right.astype(dtype))
    first = ir.node("MatMul", [node.inputs[0], o], name=graph_io.fresh_name(graph, f"{base}_svd_0"))
    first.outputs[0].name = graph_io.fresh_name(graph, f"{base}_svd_h")
    graph_io.copy_dtype(node.outputs[0], first.outputs[0])
    graph.insert_before(node, first)
    if node.op_type == "Gemm":
        beta = node.attributes.get("beta")
        node.attributes.pop("transB", None)
        node.attributes.pop("alpha", None)
        if beta is not None:
            node.attributes["beta"] = beta
    node.replace_input_with(0, first.outputs[0])
    node.replace_input_with(1, p)
