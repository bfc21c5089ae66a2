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
go (:meth:`ChannelPrunePass._allocate`).

``refit`` re-fits every linear layer downstream of the pruned ones (Gemm, MatMul+Add, Conv, ConvTranspose), layer
by layer, by least squares on the pruned model's own calibration activations against the original's outputs
(:mod:`onnxopt.passes._reconstruct`; a re-fitted candidate costs several times a plain one). A search runs without
refit first; with refit on or unset (auto) a third phase (:meth:`ChannelPrunePass._refit_phase`) then checks the
weakest setting above the result that missed without refit, re-fitted: when it misses too, refit does not help
here and the result without refit stands (one re-fitted candidate spent; refit on hands that result on re-fitted
when it holds so); when it holds, the search goes on above it with refit, ``_REFIT_STEPS`` (3) checks in all. For the
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
import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt import graph as graph_io
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip, budget_figures
from onnxopt.passes._channel_groups import Analysis, analyze
from onnxopt.passes._prune_apply import apply_removal
from onnxopt.passes._prune_guard import budget_miss, slower
from onnxopt.passes._prune_latency import measured_unit_costs
from onnxopt.passes._prune_proxy import Curves, MaskedProxy
from onnxopt.passes._prune_scores import score_units
from onnxopt.passes._prune_search import ThresholdSearch, speculate
from onnxopt.passes._prune_select import blocked, describe, removed_and_means, select
from onnxopt.passes._reconstruct import Refit, downstream, reconstruct
from onnxopt.passes._transformer_groups import HANDLERS
from onnxopt.stats import StatsRequest, StatsTable, get_stats

__all__ = ["PruneConfig", "ChannelPrunePass", "CRITERIA", "SCORES"]

logger = logging.getLogger(__name__)

CRITERIA = ("dead", "apoz", "outlier", "constant", "ratio")
RANKS = ("latency", "error")
SCORES = ("contribution", "apoz", "mean")
_DEFAULT_THRESHOLD = {"apoz": 0.9, "constant": 1e-3}
# the lower ends of the searches, which the search itself never checks
_WEAKEST = {
    ("ratio", 0.0): "ratio 0: dead channels only",
    ("apoz", 1.0): "apoz 1: channels zero on every sample",
    ("constant", 0.0): "constant 0: channels constant on every sample",
}
# ratio search on a model with more layer groups than this: ratios allocated by the masked proxy (_allocate)
_GREEDY_GROUPS = 4
_GRID = (0.125, 0.25, 0.375, 0.5, 0.75, 0.9)  # the per-group ratios the proxy scores
_HOPELESS = 0.25  # a group's curve stops at this proxy error (relative squared output error) over dead-only
_REFIT_STEPS = 3  # budget checks of the refit phase: the first setting above the search's without refit, 2 more
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


class ChannelPrunePass(OptPass):
    """Remove dead and unimportant channels/neurons judged from activations (dead, apoz, outlier, constant, ratio)."""

    name = "prune"
    exact = False
    config_class = PruneConfig
    _speculated: dict = {}  # (setting, per-group ratios, refit) -> candidate built ahead (speculate); reassigned

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
        setting, per_group = self._choose_setting(model, analysis, scored)
        self._speculated = {}
        kept, self._kept = self._kept, None
        chosen = select(analysis, scored, config, setting, per_group)
        if not chosen:
            return OptResult(model, modified=False, skipped=skipped)
        original = model.clone()  # the input (sharing its weights): refit's target, and what a guard restores
        if kept is not None and kept[0] == _key(setting, per_group, self._refit):  # built and checked: hand it on
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
        key = _key(setting, per_group, self._refit)
        if check is not None and self._held is not None and key not in self._held:
            miss = self._missed.get(key) or budget_miss(model, check)
            if miss is not None:
                what = _WEAKEST.get((config.criterion, setting), f"{config.criterion} {setting:.4g}")
                return f"backed off: its weakest setting ({what}) misses the budget: {miss}", {}
        if not config.latency_guard or self.context is None:
            return None, {}
        why, figures = slower(self.context, original, model, margin=config.latency_margin, rounds=15)
        return (None if why is None else f"reverted: {why}"), {"prune_latency": figures}

    # --- search --------------------------------------------------------------------------------------
    def _choose_setting(self, model: ir.Model, analysis: Analysis, scored: dict) -> tuple[float, dict[int, float]]:
        """The criterion's setting, and per layer group ratios refined by the search (ratio only)."""
        config: PruneConfig = self.config
        if config.criterion in ("dead", "outlier"):
            return 0.0, {}
        given = config.ratio if config.criterion == "ratio" else config.threshold
        if given >= 0:
            return given, {}
        check = self.context.check if self.context is not None else None
        self._refit = False  # the search runs without refit first (_refit_phase)
        if check is None:
            self._refit = config.refit is True
            if config.criterion == "ratio":
                raise ir.passes.PreconditionError("prune: give --prune-ratio, or data and a budget to search with")
            return _DEFAULT_THRESHOLD[config.criterion], {}
        # strength grows with the ratio, and falls with the apoz threshold / grows with the constant threshold
        if config.criterion == "ratio":
            lo, hi, stronger_is_higher = 0.0, config.max_ratio, True
        elif config.criterion == "apoz":
            lo, hi, stronger_is_higher = 0.5, 1.0, False
        else:
            lo, hi, stronger_is_higher = 0.0, 0.5, True
        sizes: dict[int, int] = {}
        for item in scored.values():
            sizes[item.unit.group] = sizes.get(item.unit.group, 0) + 1
        raised = [group for group in sorted(sizes, key=lambda g: -sizes[g]) if sizes[group] >= 2]
        if config.criterion == "ratio" and len(raised) > _GREEDY_GROUPS:
            allocated = self._allocate(model, analysis, scored, raised, check)
            if allocated is not None:
                return allocated
        per_group_steps = max(3, config.steps // 2) if config.criterion == "ratio" else 0
        refit_steps = (config.refit is not False) * min(config.steps, _REFIT_STEPS)
        self.expect_trials(config.steps + per_group_steps * len(raised) + refit_steps)  # at most; an estimate
        best, bound = self._bisect(model, lo, hi, stronger_is_higher, lambda v: (v, {}), check)
        weakest, end = (lo, hi) if stronger_is_higher else (hi, lo)
        if best == weakest and not self._weakest_holds(model, weakest, check):
            return best, {}  # phases 2 and 3 start from a setting that holds: none does, even the weakest
        per_group: dict[int, float] = {}
        # Phase 2 (greedy by layer): layers differ in redundancy; raise each group's ratio alone, largest first.
        for group in raised if config.criterion == "ratio" else ():
            trial = lambda v, g=group: (best, {**per_group, g: v})  # noqa: E731
            found, _ = self._bisect(model, best, config.max_ratio, True, trial, check, steps=max(3, config.steps // 2))
            if found > best:
                per_group[group] = found

        def make(value: float) -> tuple[float, dict[int, float]]:  # phase 3: the floor of every group raised
            return value, {g: r for g, r in per_group.items() if (r > value) == stronger_is_higher}

        def text(value: float, groups: dict[int, float]) -> str:
            higher = f" ({len(groups)} group{'s' * (len(groups) != 1)} higher)" if groups else ""
            return f"{config.criterion} {value:.4g}{higher}"

        def rest() -> tuple[tuple[float, dict[int, float]], str]:
            steps = min(config.steps, _REFIT_STEPS) - 1
            lo_hi = (bound, end) if stronger_is_higher else (end, bound)
            found = self._bisect(model, *lo_hi, stronger_is_higher, make, check, steps=steps)[0] if steps else bound
            return make(found), text(*make(found))

        return self._refit_phase(model, (best, per_group), text(best, per_group), make(bound), rest, check)

    def _refit_phase(self, model, base: tuple, base_text: str, first: tuple, rest, check) -> tuple:
        """Phase 3, with ``refit`` on or auto: the search without refit ended on ``base`` (``base_text``); refit is
        tried only above it. ``first``, the weakest setting stronger than ``base`` that missed without refit (or
        the search's upper end), is checked re-fitted: when it holds, ``rest()`` continues the search above it
        with refit (a few checks) and gives the result and its text; when it misses, refit does not help here
        and the search keeps ``base`` (one refit spent) — with refit on, ``base`` re-fitted when that holds. When
        ``first`` is ``base`` (the search's range ends there), there is nothing stronger to try."""
        if self.config.refit is False:
            return base
        self._refit = True
        if first == base:
            why = f"refit not tried: the search ends at {base_text}, nothing stronger to hold"
        elif self._trial(model, *first, check):
            self._held.add(_key(*first, True))
            found, text = rest()
            self._note = Change("refit", f"held {text}, stronger than {base_text}, the strongest without refit")
            return found
        else:
            why = f"refit did not hold a stronger setting than {base_text}, the strongest without it (the next one "
            why += f"re-fitted misses: {self._last_miss})"
        if self.config.refit is True and self._trial(model, *base, check):
            self._held.add(_key(*base, True))
            self._note = Change("refit", f"{why}; {base_text} re-fitted holds")
            return base
        self._refit, self._note = False, Skip("refit", why)
        return base

    def _bisect(self, model, lo: float, hi: float, stronger_is_higher: bool, make, check, steps: int = 0) -> tuple:
        """The strongest setting ``make(v)`` that held for ``v`` in ``(lo, hi)`` (else the weaker end), and the
        weakest that missed (else the stronger end: no check) after ``steps`` bisection steps."""
        best = lo if stronger_is_higher else hi
        self._held = set() if self._held is None else self._held
        steps = steps or self.config.steps
        for step in range(steps):
            mid = (lo + hi) / 2
            key = lambda setting, per_group: _key(setting, per_group, self._refit)  # noqa: E731
            build = lambda setting, per_group: self._candidate(model, setting, per_group)  # noqa: E731
            self._speculated = speculate(self.context, self._speculated, build, key, lo, hi, make, steps - step)
            ok = self._trial(model, *make(mid), check)
            logger.debug("prune search: %s=%.4f -> %s", self.config.criterion, mid, "ok" if ok else "fails")
            if ok == stronger_is_higher:
                lo = mid
            else:
                hi = mid
            if ok:
                best = mid
                self._held.add(_key(*make(mid), self._refit))
        return best, (hi if stronger_is_higher else lo)

    def _allocate(self, model: ir.Model, analysis: Analysis, scored: dict, groups: list[int], check):
        """Per-group ratios for a model with many layer groups, with few budget checks (``None``: no proxy here).

        Each group's ratio is raised alone along :data:`_GRID` from dead channels only, and the output error of
        each step measured on the masked proxy (:mod:`onnxopt.passes._prune_proxy`: a few calibration samples,
        one session, no graph surgery). A threshold ``τ`` gives every group a step: with ``rank="latency"`` the
        one whose time saved (onnxruntime's profile of the model, :mod:`onnxopt.passes._prune_latency`) best pays
        for its error at price ``1/τ``, with ``rank="error"`` its largest step whose error is within ``τ``
        (:class:`~onnxopt.passes._prune_proxy.Curves`; no step reaches :data:`_HOPELESS` error). A bisection on
        ``log τ`` (from the smallest first step's threshold to :meth:`Curves.top`), each a real candidate checked
        against the budget, finds the largest ``τ`` that holds in ``steps`` checks (a threshold that gives
        a setting already checked costs no check). The curves are scored lazily, only as far as the thresholds
        asked for."""
        config: PruneConfig = self.config
        data = self.context.data if self.context is not None else None
        if data is None:
            return None
        try:
            proxy = MaskedProxy(model, analysis, get_stats(model), data)
        except ValueError as e:
            logger.debug("prune: %s; the greedy per-group search instead", e)
            return None
        self._held = set() if self._held is None else self._held
        names = {id(space.value): space.value.name for space in analysis.spaces.values()}

        def removal(per_group: dict[int, float]) -> tuple[int, dict[str, np.ndarray]]:
            chosen = select(analysis, scored, config, 0.0, per_group)
            removed = analysis.removed_by_space([item.unit for item in chosen])
            return len(chosen), {names[key]: channels for key, channels in removed.items()}

        costs = self._costs(model, analysis, groups, proxy) if config.rank == "latency" else None
        grid = tuple(r for r in _GRID if r <= config.max_ratio)
        curves = Curves(proxy, groups, grid, removal, cap=_HOPELESS, costs=costs)
        first = curves.first_errors()
        if not first:
            return 0.0, {}
        self.expect_trials(config.steps + (config.refit is not False) * min(config.steps, _REFIT_STEPS))
        positive = [e for e in first if e > 0]  # a step whose error is 0 comes with every threshold
        lo, hi = math.log(min(positive) if positive else 1e-12) - 1e-9, math.log(curves.top())
        self._verdicts[_key(0.0, {})] = True  # dead channels only: the guard checks it if kept

        def trial(ratios: dict[int, float]) -> bool:  # checked once; remembered for the guard when it holds
            ok = self._trial(model, 0.0, ratios, check)
            if ok and ratios:
                self._held.add(_key(0.0, ratios, self._refit))
            return ok

        at = lambda x: curves.at(math.exp(x))  # noqa: E731
        tau = "error" if costs is None else "error per time saved"  # what the threshold is, for the report
        search = ThresholdSearch(at, trial, lambda ratios: _key(0.0, ratios, self._refit) not in self._verdicts)
        lo, hi, best = search.bisect(lo, hi, {}, config.steps)

        def rest() -> tuple[tuple[float, dict[int, float]], str]:  # phase 3, re-fitted: τ doubled up from hi
            found = search.gallop(hi, math.log(curves.top()), at(hi), min(config.steps, _REFIT_STEPS) - 1)
            return (0.0, found[2]), f"the proxy allocation at {tau} {math.exp(found[0]):.3g}"

        logger.info("prune: proxy errors of %d steps in %d groups on %d samples (%d runs)",
                    sum(map(len, curves.steps.values())), len(groups), proxy.samples, proxy.evaluations)  # fmt: skip
        if not best:  # nothing held above dead channels only (the guard checks those): no refit either
            return 0.0, best
        base_text = f"the proxy allocation at {tau} {math.exp(lo):.3g}"
        return self._refit_phase(model, (0.0, best), base_text, (0.0, at(hi)), rest, check)

    @staticmethod
    def _costs(model: ir.Model, analysis: Analysis, groups: list[int], proxy: MaskedProxy) -> dict[int, float] | None:
        """Per group, the fraction of ``model``'s measured layer time one unit saves (onnxruntime's profiler on the
        proxy's first calibration batch); ``None`` when the profile matches no layer."""
        measured = measured_unit_costs(model, analysis, groups, proxy.batches[0])
        if measured is None:
            return None
        per_unit, total = measured
        logger.info("prune: layer time %.0f us per batch, ranking ratio steps by time saved", total)
        return {group: us / total for group, us in per_unit.items()}

    def _trial(self, model: ir.Model, setting: float, per_group: dict[int, float], check) -> bool:
        """Whether the candidate at the setting (re-fitted when ``self._refit``) holds the budget; a setting checked
        before is not built again."""
        key = _key(setting, per_group, self._refit)
        if key in self._verdicts:
            return self._verdicts[key]
        candidate = self._speculated.pop(key) if key in self._speculated else self._candidate(model, setting, per_group)
        if candidate is None:
            return True
        report = check(candidate)
        self._verdicts[key] = report.ok
        if report.ok:
            self._keep(key, candidate)
        else:
            self._last_miss = budget_figures(report)
        return report.ok

    def _keep(self, key: tuple, candidate: ir.Model) -> None:
        """Remember the candidate that held (only the last: the search's best so far), so that :meth:`call` hands
        it on instead of building the same model again (with ``refit``, another least-squares fit)."""
        self._kept = (key, candidate)

    def _weakest_holds(self, model: ir.Model, setting: float, check) -> bool:
        """Check the lower end of the search, which the bisection never tries (remembered for :meth:`_guard`)."""
        candidate = self._candidate(model, setting, {})
        if candidate is None:
            return True  # it removes nothing
        report = check(candidate)
        key = _key(setting, {}, self._refit)
        if report.ok:
            self._held.add(key)
            self._keep(key, candidate)
        else:
            self._missed[key] = budget_figures(report)
        return report.ok

    def _candidate(self, model: ir.Model, setting: float, per_group: dict[int, float]) -> ir.Model | None:
        """``model`` pruned at ``setting`` (and ``per_group`` ratios); ``None`` when that removes nothing."""
        candidate = model.clone()
        analysis = self._analyze(candidate)
        stats = get_stats(model)
        scored = score_units(analysis, stats)
        chosen = select(analysis, scored, self.config, setting, per_group)
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


def _key(setting: float, per_group: dict[int, float], refit: bool = False) -> tuple:
    """A search setting as a set member (the setting, the per-group ratios, and whether re-fitted)."""
    return setting, tuple(sorted(per_group.items())), refit
