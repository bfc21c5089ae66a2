"""prune's search helpers: the proxy allocation's threshold search (a bisection on ``log τ``, and the doubling of
the refit phase), and the candidates built ahead for an executor that scores several at once (:func:`speculate`).

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
from typing import Any

__all__ = ["ThresholdSearch", "speculate"]

logger = logging.getLogger(__name__)

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
