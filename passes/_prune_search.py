"""prune's search on the proxy allocation's error threshold: a bisection on ``log τ``, and the doubling of the refit
phase.

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

__all__ = ["ThresholdSearch"]

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
