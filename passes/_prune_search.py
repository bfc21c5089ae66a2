"""prune's search: the strongest setting that holds the budget (:class:`PruneSearch`, which
:class:`onnxopt.passes.prune.ChannelPrunePass` mixes in), the proxy allocation's threshold search (a bisection on
``log τ``, and the doubling of the refit phase), and the candidates built ahead for an executor that scores several
at once (:func:`speculate`).

A threshold ``τ`` gives every layer group its largest ratio step whose proxy error is within ``τ``
(:class:`onnxopt.passes._prune_proxy.Curves`); a stronger setting comes with a larger ``τ``. Each threshold is a
real candidate checked against the budget, except that one whose per-group ratios were checked before costs no
check (the caller's ``trial`` remembers its verdicts). :meth:`ThresholdSearch.bisect` halves ``(lo, hi)`` in
``log τ``; :meth:`ThresholdSearch.gallop`, for the re-fitted phase that starts just above the threshold that held
without refit, multiplies ``τ`` by 2, then 4, 16 ... until a threshold misses, and bisects between the last that
held and that one: refit lowers the output error by a modest factor (1.3-2 on ResNet-56's allocation), which a
bisection over the whole range above would step over.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxopt.pass_base import Change, Skip, budget_figures
from onnxopt.passes._channel_groups import Analysis
from onnxopt.passes._prune_latency import measured_unit_costs
from onnxopt.passes._prune_proxy import Curves, MaskedProxy
from onnxopt.passes._prune_select import select
from onnxopt.stats import get_stats

if TYPE_CHECKING:
    from onnxopt.passes.prune import PruneConfig

__all__ = ["PruneSearch", "ThresholdSearch", "setting_key", "speculate"]

logger = logging.getLogger(__name__)

_DEFAULT_THRESHOLD = {"apoz": 0.9, "constant": 1e-3}
# ratio search on a model with more layer groups than this: ratios allocated by the masked proxy (_allocate)
_GREEDY_GROUPS = 4
_GRID = (0.125, 0.25, 0.375, 0.5, 0.75, 0.9)  # the per-group ratios the proxy scores
_HOPELESS = 0.25  # a group's curve stops at this proxy error (relative squared output error) over dead-only
_REFIT_STEPS = 3  # budget checks of the refit phase: the first setting above the search's without refit, 2 more

Ratios = dict[int, float]


class ThresholdSearch:
    """``at(x)``: the per-group ratios at ``τ = exp(x)``; ``trial(ratios)``: whether they hold the budget (checked
    once); ``costs(ratios)``: whether asking ``trial`` spends a check (they were not checked before)."""

    def __init__(
        self, at: Callable[[float], Ratios], trial: Callable[[Ratios], bool], costs: Callable[[Ratios], bool]
    ) -> None:
        self.at, self.trial, self.costs = at, trial, costs

    def bisect(self, lo: float, hi: float, best: Ratios, limit: int) -> tuple[float, float, Ratios]:
        """``limit`` checks halving ``(lo, hi)`` (``lo`` held, ``hi`` missed or the upper end): the last bracket and
        the strongest ratios that held (``best`` when none did)."""
        checks = 0
        for _ in range(4 * limit):  # a threshold whose ratios were checked before costs nothing
            if checks >= limit:
                break
            mid = (lo + hi) / 2
            ok, ratios, spent = self._probe(mid)
            checks += spent
            if ok:
                lo, best = mid, ratios or best
            else:
                hi = mid
        return lo, hi, best

    def gallop(self, lo: float, end: float, best: Ratios, limit: int) -> tuple[float, float, Ratios]:
        """From ``lo`` (held) up to ``end``: ``τ`` times 2, 4, 16 ... while it holds, then :meth:`bisect` between
        the last that held and the first that missed, ``limit`` checks in all."""
        step, hi = math.log(2), end
        while limit > 0 and lo < end:
            mid = min(lo + step, end)
            ok, ratios, spent = self._probe(mid)
            limit -= spent
            if not ok:
                hi = mid
                break
            lo, best, step = mid, ratios or best, 2 * step
        return self.bisect(lo, hi, best, limit) if lo < hi else (lo, hi, best)

    def _probe(self, x: float) -> tuple[bool, Ratios, bool]:
        ratios = self.at(x)
        spent = self.costs(ratios)
        ok = self.trial(ratios)
        logger.debug("prune allocation: threshold %.3g -> %s", math.exp(x), "ok" if ok else "misses")
        return ok, ratios, spent


def speculate(context: Any, built_before: dict, build, key, lo: float, hi: float, make, steps_left: int) -> dict:
    """With an executor that scores several candidates at once (``context.parallel`` > 1), build the settings a
    bisection may try in its next steps (a tree of midpoints below ``(lo, hi)``: 3 for 3 candidates at once, 7 for
    7; ``make(v)`` the setting at ``v``, ``build(*setting)`` its candidate, ``key(*setting)`` its name) and have them
    scored together; the bisection then reads their verdicts in the order it needs them, so it takes the same path,
    and chooses the same, as one trial at a time. Only the graph surgery stays here, one candidate after the other.
    Returns the candidates built (``built_before`` kept where asked again), by key."""
    width = getattr(context, "parallel", 1)
    prefetch = getattr(context, "prefetch", None)
    if width < 2 or prefetch is None:
        return built_before
    depth = min(steps_left, int(math.log2(width + 1)))
    settings, level = [], [(lo, hi)]
    for _ in range(depth):
        settings += [(a + b) / 2 for a, b in level]
        level = [half for a, b in level for half in ((a, (a + b) / 2), ((a + b) / 2, b))]
    built = {}
    for value in settings:
        name = key(*make(value))
        built[name] = built_before[name] if name in built_before else build(*make(value))
    prefetch([candidate for candidate in built.values() if candidate is not None])
    return built


def setting_key(setting: float, per_group: dict[int, float], refit: bool = False) -> tuple:
    """A search setting as a set member (the setting, the per-group ratios, and whether re-fitted)."""
    return setting, tuple(sorted(per_group.items())), refit


class PruneSearch:
    """The search of :class:`onnxopt.passes.prune.ChannelPrunePass`: its strongest setting that holds the budget.

    The pass provides ``config``, ``context``, ``expect_trials`` (:class:`onnxopt.pass_base.OptPass`) and
    ``_candidate(model, setting, per_group)`` (the pruned model, re-fitted when ``self._refit``), and resets the
    search's state (``_held``, ``_missed``, ``_kept``, ``_verdicts``, ``_refit``, ``_note``, ``_last_miss``) before
    each :meth:`_choose_setting`.
    """

    _speculated: dict = {}  # (setting, per-group ratios, refit) -> candidate built ahead (speculate); reassigned

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
            self._held.add(setting_key(*first, True))
            found, text = rest()
            self._note = Change("refit", f"held {text}, stronger than {base_text}, the strongest without refit")
            return found
        else:
            why = f"refit did not hold a stronger setting than {base_text}, the strongest without it (the next one "
            why += f"re-fitted misses: {self._last_miss})"
        if self.config.refit is True and self._trial(model, *base, check):
            self._held.add(setting_key(*base, True))
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
            key = lambda setting, per_group: setting_key(setting, per_group, self._refit)  # noqa: E731
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
                self._held.add(setting_key(*make(mid), self._refit))
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
        self._verdicts[setting_key(0.0, {})] = True  # dead channels only: the guard checks it if kept

        def trial(ratios: dict[int, float]) -> bool:  # checked once; remembered for the guard when it holds
            ok = self._trial(model, 0.0, ratios, check)
            if ok and ratios:
                self._held.add(setting_key(0.0, ratios, self._refit))
            return ok

        at = lambda x: curves.at(math.exp(x))  # noqa: E731
        tau = "error" if costs is None else "error per time saved"  # what the threshold is, for the report
        search = ThresholdSearch(at, trial, lambda ratios: setting_key(0.0, ratios, self._refit) not in self._verdicts)
        lo, hi, best = search.bisect(lo, hi, {}, config.steps)
        proxy.close_cuts()  # the refits' memory comes next; the few proxy runs left run whole

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
        key = setting_key(setting, per_group, self._refit)
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
        key = setting_key(setting, {}, self._refit)
        if report.ok:
            self._held.add(key)
            self._keep(key, candidate)
        else:
            self._missed[key] = budget_figures(report)
        return report.ok
