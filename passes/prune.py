"""`prune`: remove dead and unimportant channels and neurons, judged from activations, as a smaller dense model.

Before (fc1 has 4 neurons, neuron 2 never fires on the calibration data)::

    X ─ Gemm(W1: 4×K, b1) ─ Relu ─ Gemm(W2: M×4, b2) ─ Y

After::

    X ─ Gemm(W1[[0,1,3]], b1[[0,1,3]]) ─ Relu ─ Gemm(W2[:, [0,1,3]], b2 + W2[:, 2]·μ₂) ─ Y

with ``μ₂`` the neuron's constant activation (0 for a dead ReLU), so removing a dead or constant channel
is exact. Channels that must go together (BatchNorm, residual Add, Concat, depthwise Conv, Flatten→Gemm,
Pad, Transpose) are found by :mod:`onnxopt.passes._channel_groups`, and in transformer encoders attention heads
(Q/K/V columns, the head-split Reshapes, the output projection's rows) and FFN neurons by
:mod:`onnxopt.passes._transformer_groups`; the hidden size stays. The surgery is in :mod:`onnxopt.passes._prune_apply`.

Criteria (``criterion``), judged on the activations the next layer reads:

- ``dead``: zero on every calibration sample (the thesis's vanilla pruning);
- ``apoz``: average percentage of zeros ≥ ``threshold`` (APoZ paper, Network Trimming);
- ``outlier``: activation frequency below mean − 2·std of its layer (the thesis's outlier pruning);
- ``constant``: standard deviation ≤ ``threshold`` × the layer's mean |activation| (any activation function);
  the constant is folded into the next layer's bias;
- ``ratio``: the lowest-scoring ``ratio`` of each layer group, by ``score``: ``contribution`` (RMS activation ×
  norm of the next layer's weights for that channel; for an attention head ``√E‖c_h·W_o,h‖²``, its context's
  contribution through its rows of the output projection, from the Gram matrix of the projection's input),
  ``apoz`` (fraction of zeros read by the next layer; for GELU/ReLU neurons the fraction of non-positive
  activation inputs) or ``mean`` (mean |activation|).

When ``threshold`` or ``ratio`` is left negative, the pass searches the strongest setting whose result passes
validation within the run's error budget (bisection, ``steps`` validations). For ``ratio`` on a model with at
most 4 layer groups, a second phase then raises each group alone (a bisection per group, each step checked). On a
larger model (MobileNetV2: 25 groups, about 80 checks that way) the groups' ratios are allocated from a proxy
instead: each group's output error at rising ratios on a few calibration samples, scored in one session of the
input model with the pruned layers' inputs masked (:mod:`onnxopt.passes._prune_proxy`), weighed against the
time each step saves, measured by onnxruntime's profiler on the model (``rank``, :mod:`onnxopt.passes._prune_latency`:
latency, not MACs); a bisection on the price of error, ``steps`` budget checks of real candidates, picks how far to
go (:meth:`ChannelPrunePass._allocate`; the searches are in :mod:`onnxopt.passes._prune_search`).

``refit`` re-fits every linear layer downstream of the pruned ones (Gemm, MatMul+Add, Conv, ConvTranspose), layer
by layer, by least squares on the pruned model's own calibration activations against the original's outputs
(:mod:`onnxopt.passes._reconstruct`; a re-fitted candidate costs several times a plain one). A search runs without
refit first; with refit on or unset (auto) a third phase (:meth:`ChannelPrunePass._refit_phase`) then checks the
weakest setting above the result that missed without refit, re-fitted: when it misses too, refit does not help
here and the result without refit stands (one re-fitted candidate spent; refit on hands that result on re-fitted
when it holds so); when it holds, the search goes on above it with refit, 3 checks in all (``_REFIT_STEPS``). For the
bisection the settings above are the uniform ratio raised under the per-group ones, for the proxy allocation the
error threshold raised. A fixed setting is re-fitted only with refit on. The pass's changes (or skips) say whether
refit was used and why. The candidate of the chosen setting, checked by the search, is the model handed on.
Each layer group keeps at least ``min_channels`` channels and, with ``ratio``, a multiple of ``align`` (16 by
default; a group of fewer than 2·``align`` channels a multiple of 8 or 4, one of fewer than 8 any count; attention
heads any count). onnxruntime's kernels work in channel blocks (``bench/results/channel_multiples.md``, AVX-512
VNNI CPU): a float depthwise Conv over a count that is not a multiple of 4 runs 3-4x slower than over the next
multiple, float 1×1 Convs take the time of the next multiple of 16, and the int8 depthwise kernel runs a multiple of
8 that is not one of 16 (EfficientNet-Lite0 pruned to 216, 424 and 1,144 channels) 1.4-1.9x slower than the next
multiple of 16 (which also holds the 8-blocks of AVX2 CPUs).

Before handing the result on (:mod:`onnxopt.passes._prune_guard`): a result the search did not check itself (the
weakest setting it falls back to when nothing stronger passes: dead or constant channels only, the lower end the
bisection never tries) is checked against the budget — for ``ratio`` before the per-group phase, which would
otherwise spend its checks raising groups from a setting that misses — and when it misses, the pass backs off to no
change; and with ``latency_guard``, the pruned model is timed against its input (as ``quant`` times its recipes) and
the input kept when the pruned model is clearly slower (by more than ``latency_margin`` in the median, and in its
fastest round than the input's median). Either reason is the first skipped site; the timing is in
``details["prune_latency"]``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt import graph as graph_io
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip
from onnxopt.passes._channel_groups import Analysis, analyze, rebind
from onnxopt.passes._prune_apply import apply_removal
from onnxopt.passes._prune_guard import budget_miss, slower
from onnxopt.passes._prune_scores import score_units
from onnxopt.passes._prune_search import PruneSearch, setting_key
from onnxopt.passes._prune_select import blocked, describe, removed_and_means, select
from onnxopt.passes._reconstruct import Refit, downstream, reconstruct
from onnxopt.passes._transformer_groups import HANDLERS
from onnxopt.stats import StatsRequest, StatsTable, get_stats

__all__ = ["PruneConfig", "ChannelPrunePass", "CRITERIA", "SCORES"]

logger = logging.getLogger(__name__)

CRITERIA = ("dead", "apoz", "outlier", "constant", "ratio")
RANKS = ("latency", "error")
SCORES = ("contribution", "apoz", "mean")
# the lower ends of the searches, which the search itself never checks
_WEAKEST = {
    ("ratio", 0.0): "ratio 0: dead channels only",
    ("apoz", 1.0): "apoz 1: channels zero on every sample",
    ("constant", 0.0): "constant 0: channels constant on every sample",
}
_REFIT_META = "onnxopt.prune.refit"  # a candidate's Refit (the layers re-fitted and declined), in its meta


@dataclasses.dataclass(frozen=True)
class PruneConfig(PassConfig):
    criterion: str = dataclasses.field(default="ratio", metadata={"choices": CRITERIA, "help": "what to remove"})
    threshold: float = dataclasses.field(
        default=-1.0, metadata={"help": "apoz: min fraction of zeros; constant: max relative std (<0: search)"}
    )
    ratio: float = dataclasses.field(default=-1.0, metadata={"help": "ratio: fraction per layer (<0: search)"})
    score: str = dataclasses.field(default="contribution", metadata={"choices": SCORES, "help": "ranking"})
    max_ratio: float = dataclasses.field(default=0.99, metadata={"help": "upper end of the ratio search"})
    min_channels: int = dataclasses.field(default=1, metadata={"help": "channels every layer keeps"})
    align: int = dataclasses.field(
        default=16, metadata={"help": "keep channel counts multiples of this (smaller layers: of 8 or 4)"}
    )
    refit: bool | None = dataclasses.field(
        default=None,
        metadata={
            "help": "re-fit every linear layer downstream to the original's outputs (least squares); auto (neither "
            "flag): a search re-fits only above the setting that holds without refit, and keeps refit when it holds "
            "a stronger one",
            "unset": "auto",
        },
    )
    steps: int = dataclasses.field(default=7, metadata={"help": "validations in the search"})
    rank: str = dataclasses.field(
        default="latency",
        metadata={
            "choices": RANKS,
            "help": "how the allocation of a model with many layer groups ranks their ratio steps: latency (time "
            "saved, from onnxruntime's profiler, against proxy error) or error (proxy error alone)",
        },
    )
    latency_guard: bool = dataclasses.field(
        default=True, metadata={"help": "time the pruned model against its input; keep the input if it is slower"}
    )
    latency_margin: float = dataclasses.field(
        default=0.05, metadata={"help": "relative slow-down of the pruned model that counts as slower"}
    )

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"prune criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.rank not in RANKS:
            raise ValueError(f"prune rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if self.score not in SCORES:
            raise ValueError(f"prune score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.ratio > 1 or self.max_ratio > 1 or self.min_channels < 1 or self.align < 1 or self.steps < 1:
            raise ValueError("prune: ratio and max_ratio must be <= 1; min_channels, align and steps >= 1")
        if self.refit not in (True, False, None):
            raise ValueError(f"prune refit must be true, false or unset (auto), got {self.refit!r}")
        if not 0 <= self.latency_margin < 1:
            raise ValueError(f"prune latency_margin must be in [0, 1), got {self.latency_margin}")


class ChannelPrunePass(PruneSearch, OptPass):
    """Remove dead and unimportant channels/neurons judged from activations (dead, apoz, outlier, constant, ratio)."""

    name = "prune"
    exact = False
    config_class = PruneConfig
    _base: tuple | None = None  # (model, its analysis, scored units) while call() searches: each candidate's selection

    def needs_data(self, model: ir.Model) -> bool:
        return bool(self.stats_request(model))  # channels are judged from activations, if there are any to prune

    def stats_request(self, model: ir.Model) -> StatsRequest:
        analysis = self._analyze(model)
        spaces = [a.space for a in analysis.actions if a.kind == "consumer"] + analysis.gates
        heads = {id(space.value) for space in analysis.head_inputs}
        grams = {a.node.name for a in analysis.actions if a.kind == "consumer" and id(a.space.value) in heads}
        axes = {(space.value.name, space.axis) for space in spaces if space.axis != 1}
        return StatsRequest(frozenset(s.value.name for s in spaces), frozenset(grams), frozenset(axes))

    def call(self, model: ir.Model) -> OptResult:
        config: PruneConfig = self.config
        analysis = self._analyze(model)
        skipped = blocked(analysis)
        if not any(unit.blocked is None for unit in analysis.units):
            return OptResult(model, modified=False, skipped=skipped or [Skip("model", "no prunable channel group")])
        stats = get_stats(model)
        if stats is None:
            raise ir.passes.PreconditionError("pass 'prune' needs activation statistics: give calibration data")
        scored = score_units(analysis, stats)
        self._held = None  # the settings whose candidates held the budget, once a search runs (_bisect)
        self._missed: dict[tuple, str] = {}  # settings checked and missed (_weakest_holds): the figures
        self._kept: tuple[tuple, ir.Model] | None = None  # the last candidate that held, and its setting (_keep)
        self._verdicts: dict[tuple, bool] = {}  # every setting checked (_trial), and whether it held
        self._refit = config.refit is True  # candidates are re-fitted (a search starts without, _refit_phase)
        self._note: Change | Skip | None = None  # whether the search used refit, and why (_refit_phase)
        self._last_miss = "fails"  # the figures of the last candidate that missed the budget (_trial)
        self._base = (model, analysis, scored)  # each candidate selects on these (_candidate)
        try:
            setting, per_group = self._choose_setting(model, analysis, scored)
        finally:
            self._base = None
        self._speculated = {}
        kept, self._kept = self._kept, None
        chosen = select(analysis, scored, config, setting, per_group)
        if not chosen:
            return OptResult(model, modified=False, skipped=skipped)
        original = model.clone()  # the input (sharing its weights): refit's target, and what a guard restores
        if kept is not None and kept[0] == setting_key(setting, per_group, self._refit):  # checked: hand it on
            refit = kept[1].meta.pop(_REFIT_META, Refit())
            graph_io.adopt(model, kept[1])
        else:
            refit = self._apply(original, model, analysis, chosen, stats)
        changes = describe(analysis, chosen, setting, per_group, config)
        if refit.done:
            layers = f"{len(refit.done)} layer{'s' * (len(refit.done) != 1)}"
            changes.append(Change(layers, "re-fitted to the original outputs (least squares)"))
        skipped += [Skip(name, why) for name, why in refit.declined.items()]
        if self._note is not None:
            (changes if isinstance(self._note, Change) else skipped).append(self._note)
        why, details = self._guard(original, model, setting, per_group)
        if why is not None:
            logger.info("prune: %s", why)
            graph_io.adopt(model, original)
            return OptResult(model, modified=False, skipped=[Skip("model", why), *skipped], details=details)
        return OptResult(model, modified=True, changes=changes, skipped=skipped, details=details)

    def _guard(self, original: ir.Model, model: ir.Model, setting: float, per_group: dict[int, float]):
        """Why to keep the input ``original`` rather than the pruned ``model`` (or ``None``), and the report's
        details: a result the search did not check is checked, a pruned model slower than its input is dropped."""
        config: PruneConfig = self.config
        check = self.context.check if self.context is not None else None
        key = setting_key(setting, per_group, self._refit)
        if check is not None and self._held is not None and key not in self._held:
            miss = self._missed.get(key) or budget_miss(model, check)
            if miss is not None:
                what = _WEAKEST.get((config.criterion, setting), f"{config.criterion} {setting:.4g}")
                return f"backed off: its weakest setting ({what}) misses the budget: {miss}", {}
        if not config.latency_guard or self.context is None:
            return None, {}
        why, figures = slower(self.context, original, model, margin=config.latency_margin, rounds=15)
        return (None if why is None else f"reverted: {why}"), {"prune_latency": figures}

    def _candidate(self, model: ir.Model, setting: float, per_group: dict[int, float]) -> ir.Model | None:
        """``model`` pruned at ``setting`` (and ``per_group`` ratios); ``None`` when that removes nothing."""
        stats = get_stats(model)
        base, analysis, candidate = self._base, None, None
        if base is not None and base[0] is model:  # the search's model: its analysis, carried onto the clone
            chosen = select(base[1], base[2], self.config, setting, per_group)  # the same units as the clone's
            if not chosen:
                return None  # known before the model is cloned
            candidate = model.clone()
            try:
                analysis = rebind(base[1], model, candidate)
            except ValueError as e:
                logger.debug("prune: the candidate is analyzed again: %s", e)
        if analysis is None:
            candidate = model.clone() if candidate is None else candidate
            analysis = self._analyze(candidate)
            chosen = select(analysis, score_units(analysis, stats), self.config, setting, per_group)
            if not chosen:
                return None
        candidate.meta[_REFIT_META] = self._apply(model, candidate, analysis, chosen, stats)
        ShapeInferencePass(strict_mode=False)(candidate)
        return candidate

    def _apply(self, original: ir.Model, model: ir.Model, analysis: Analysis, chosen, stats: StatsTable) -> Refit:
        """Remove the ``chosen`` channels from ``model`` (an ``analysis`` of it); with ``refit``, re-fit the layers
        downstream to ``original``'s outputs on the calibration data. Returns the layers re-fitted and declined."""
        removed, means = removed_and_means(analysis, chosen, stats)
        apply_removal(model, analysis, removed, means)
        if not self._refit:
            return Refit()
        data = self.context.data if self.context is not None else None
        if data is None:
            raise ir.passes.PreconditionError("prune: --prune-refit needs the calibration data")
        touched = [a for a in analysis.actions if a.kind in ("producer", "consumer") and id(a.space.value) in removed]
        kept = {
            a.node.name: np.setdiff1d(np.arange(a.space.size), removed[id(a.space.value)])
            for a in touched
            if a.kind == "producer"
        }
        nodes = [node.name for node in downstream(model, [action.node for action in touched])]
        return reconstruct(original, model, nodes, kept, data, seed=self.context.seed)

    @staticmethod
    def _analyze(model: ir.Model) -> Analysis:
        ShapeInferencePass(strict_mode=False)(model)
        return analyze(model, HANDLERS)
