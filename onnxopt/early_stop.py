"""Early stop of a budget check: decide a clear failure before the whole evaluation set has been scored.

A search validates many candidates against the same original on the same data, and most of them fail; a
failure that is already certain on part of the set need not be scored on the rest. :func:`onnxopt.validate.validate`
with ``early_stop`` asks a :class:`Stopper` after every batch whether the verdict is already decided; a candidate
that passes is always scored on every sample, so a passing verdict (and the final validation, which never stops
early) is exactly what it is without early stopping. The rules, and which are exact, are listed in
:mod:`onnxopt.validate`'s docstring; this module implements them.

They need facts about the *whole* set that only the original model gives: its metric rows, its largest
output magnitude, its element counts (:class:`Baseline`, computed once per data source by
:func:`baseline`, from the reference's cached outputs of the original).

Modes (``validate(..., early_stop=MODE)``, the environment variable ``ONNXOPT_EARLY_STOP`` for the searches of
:class:`onnxopt.manager.PassManager`): ``"off"``; ``"exact"`` (bounds that cannot be wrong); ``"on"`` (the
default: the exact bounds, and for a metric without one, ``spearman``, a statistical stop on a stratified
quarter of the batches); ``"fast"`` (opt-in: the statistical stop for every bootstrapped metric, ``top1`` too, on
top of the exact bounds; a search may then choose differently from full checks, rarely).
"""

from __future__ import annotations

import dataclasses
import math
import os
import weakref
from collections.abc import Mapping

import numpy as np

from onnxopt import metrics as metrics_mod
from onnxopt.budget import TOLERANCE
from onnxopt.errors import UsageError

__all__ = ["MODES", "ENV", "mode", "Baseline", "baseline", "ordered", "Stopped", "Stopper", "SearchCost"]

MODES = ("off", "exact", "on", "fast")
ENV = "ONNXOPT_EARLY_STOP"
STRIDE = 4  # the statistical subset: every 4th batch (a quarter, spread over the set as it is ordered)
CONFIDENCE = 0.99  # the statistical stop: the subset's 99% interval of the drop must lie wholly beyond the budget
MIN_UNITS = 32  # ... on at least this many samples (pairs for a pair metric)
SLACK = TOLERANCE  # the budget's own tolerance: a bound met up to float rounding holds
_REL = 1e-12  # float summation order: a bound on a sum of non-negative terms is shaded by this much


def mode(value: str | None = None) -> str:
    """The early-stop mode: ``value``, else ``$ONNXOPT_EARLY_STOP``, else ``"on"``.

    Raises:
        UsageError: not one of :data:`MODES`.
    """
    chosen = (value if value is not None else os.environ.get(ENV, "on")).strip().lower() or "on"
    if chosen not in MODES:
        raise UsageError(f"early stop must be one of {', '.join(MODES)}, got {chosen!r} (${ENV})")
    return chosen


@dataclasses.dataclass
class Baseline:
    """The original model on the whole evaluation set: what the bounds need to know about the samples not yet seen.

    Attributes:
        metric: the metric the checks are judged by (``top1`` when resolved from an accuracy budget), or ``None``.
        offsets: sample offset of each batch, and the total last (``offsets[-1]`` samples in all).
        ref_max: per output, the largest finite |y| of the original over the whole set.
        elements: per output, the number of elements over the whole set.
        before: the metric's rows of the original over the whole set (only for metrics with a bound).
        labels: all labels (per pair for a pair metric), or ``None``.
        before_score: the metric of the original over the whole set (``None`` for a reference-based metric).
    """

    metric: metrics_mod.Metric | None
    offsets: list[int]
    ref_max: dict[str, float]
    elements: dict[str, int]
    before: metrics_mod.Rows | None = None
    labels: np.ndarray | None = None
    before_score: float | None = None

    @property
    def samples(self) -> int:
        return self.offsets[-1]


@dataclasses.dataclass(frozen=True)
class Stopped:
    """Why a check stopped early: ``kind`` ``"exact"`` or ``"statistical"``, after ``samples`` of ``total``."""

    reason: str
    kind: str
    samples: int
    total: int
    seconds: float = 0.0  # the scoring loop's time until the stop

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _bounded(metric: metrics_mod.Metric | None) -> str | None:
    """Which exact metric bound applies (``None``: none)."""
    if isinstance(metric, metrics_mod._TopK):
        return "hits"
    if isinstance(metric, metrics_mod._MSE | metrics_mod._PSNR):
        return "sse"
    return None


_BASELINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Reference -> {DataSource: (key, Baseline)}


def baseline(
    reference, data, metric: metrics_mod.Metric | None, budget, stop_mode: str, auto_metric
) -> Baseline | None:
    """The original (``reference``, an :class:`onnxopt.validate.Reference`) on the whole of ``data``, computed once
    per reference and data source; its outputs come from the reference's cache where they fit.

    ``auto_metric(outputs, labels)``: the metric an accuracy budget resolves to when ``metric`` is ``None`` (as
    :func:`onnxopt.validate.validate` does on the first batch), or ``None``. ``None`` when ``data`` is empty.
    """
    per_data = _BASELINES.setdefault(reference, weakref.WeakKeyDictionary())
    key = _baseline_key(metric, budget, stop_mode)
    cached = per_data.get(data)
    if cached is not None and cached[0] == key:
        return cached[1]
    offsets, ref_max, elements, rows, batch_labels = [0], {}, {}, [], []
    resolved, keep = metric, False
    for index, batch in enumerate(data):
        outputs = reference.run(index, batch.feeds)
        if index == 0:
            if resolved is None and batch.labels is not None:
                resolved = auto_metric(outputs, batch.labels)
            if resolved is not None:
                resolved.bind(outputs, batch.labels)
            keep = needs_rows(resolved, stop_mode)
        for name, array in outputs.items():
            values = np.asarray(array, np.float64)
            finite = values[np.isfinite(values)]
            ref_max[name] = max(ref_max.get(name, 0.0), float(np.abs(finite).max()) if finite.size else 0.0)
            elements[name] = elements.get(name, 0) + int(values.size)
        if keep:
            rows.append(resolved.rows(outputs, batch.feeds, labels=batch.labels))
        if batch.labels is not None:
            batch_labels.append(np.asarray(batch.labels))
        offsets.append(offsets[-1] + batch.size)
    if len(offsets) == 1:
        return None
    labels = getattr(data, "labels", None)
    if labels is None and batch_labels:
        labels = np.concatenate(batch_labels, axis=0)
    result = Baseline(resolved, offsets, ref_max, elements, labels=labels)
    if keep:
        before = metrics_mod.concatenate(rows)
        try:  # a metric that cannot be scored gets no bound; the full check reports why
            resolved.check_labels(labels, offsets[-1])
            score = None if resolved.reference_based else resolved.score(before, labels, before)
        except Exception:
            score, before = None, None
        if score is None or math.isfinite(score):
            result.before, result.before_score = before, score
    per_data[data] = (key, result)
    return result


def _baseline_key(metric: metrics_mod.Metric | None, budget, stop_mode: str) -> tuple:
    return id(metric), budget, stop_mode


def ordered(reference, data, metric: metrics_mod.Metric | None, budget, stop_mode: str, auto_metric):
    """The reference and data a search's checks read: for a top-k budget on array data, the evaluation samples
    ordered so that a failing candidate's failure is certain soonest; else ``(reference, data)`` as given.

    The exact bound of a top-k check stops once the candidate's misses exceed the original's misses on the whole
    set plus the budget (every remaining sample could be a hit). A candidate misses, above all, where the original
    misses or barely hits, so the samples go in the order of the original's margin (the true class's score less
    the best other within the top k; misses first, worst first): a failing candidate is then decided on a third
    or so of the set instead of nearly all of it. Scores and verdicts are unchanged: :func:`onnxopt.validate.validate`
    puts the metric's rows back in the set's order before scoring (``data.order``), and the per-sample
    comparisons do not depend on the order. The original is not run again (its cached outputs are reordered), and
    the data is not read again for the reordered set's :class:`Baseline` (this set's, its rows and labels
    reordered).
    """
    if stop_mode == "off":
        return reference, data
    base = baseline(reference, data, metric, budget, stop_mode, auto_metric)
    if base is None or _bounded(base.metric) != "hits" or base.before is None or base.labels is None:
        return reference, data
    outputs = reference.cached(len(data.batch_sizes)) if data.batch_sizes else None
    if outputs is None:
        return reference, data
    from onnxopt import data as data_mod

    scores = np.concatenate([batch[base.metric.output] for batch in outputs], axis=0)
    order = np.argsort(_margins(scores, base.labels, base.metric.k), kind="stable")
    taken = data_mod.reordered(data, order)
    other = None if taken is None else reference.reordered(data, taken)
    if other is None:
        return reference, data
    permuted = dataclasses.replace(
        base, before={name: rows[order] for name, rows in base.before.items()}, labels=base.labels[order]
    )
    _BASELINES.setdefault(other, weakref.WeakKeyDictionary())[taken] = (
        _baseline_key(metric, budget, stop_mode),
        permuted,
    )
    return other, taken


def _margins(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per sample: the true class's score less the k-th best other class's (negative: a top-k miss)."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    truth = labels.argmax(axis=1) if labels.ndim == 2 else labels.reshape(-1).astype(np.int64)
    rows = np.arange(len(scores))
    own = scores[rows, truth]
    others = scores.copy()
    others[rows, truth] = -np.inf
    kth = np.partition(others, -k, axis=1)[:, -k]
    return own - kth


def needs_rows(metric: metrics_mod.Metric | None, stop_mode: str) -> bool:
    """Whether :class:`Baseline` must keep the metric's rows of the original (a bound or the statistical stop)."""
    if metric is None:
        return False
    statistical = stop_mode in ("on", "fast") and metric.bootstrap and not metric.reference_based
    return _bounded(metric) is not None or statistical


class Stopper:
    """Decides, batch by batch, whether a check's failure is already certain (see the module docstring).

    Args:
        budget: the check's :class:`onnxopt.validate.Budget`.
        baseline: the original on the whole set.
        stop_mode: ``"exact"``, ``"on"`` or ``"fast"``.
    """

    def __init__(self, budget, baseline: Baseline, stop_mode: str) -> None:
        self.budget = budget
        self.baseline = baseline
        self.metric = baseline.metric
        self.kind = _bounded(self.metric) if baseline.before is not None else None
        self.statistical = (
            (stop_mode == "fast" or (stop_mode == "on" and self.kind is None))
            and self.metric is not None
            and self.metric.bootstrap
            and not self.metric.reference_based
            and baseline.before is not None
            and self._drop_bound() is not None
        )
        self.hits = 0  # top-k: hits of the candidate so far
        self.sse = 0.0  # mse / psnr: squared error of the candidate so far
        self.seen = 0
        self.max_mismatch = budget.max_mismatch
        task = (budget.max_accuracy_drop, budget.max_mse_increase, budget.max_metric_drop, budget.metric_limit)
        if self.max_mismatch is None and all(v is None for v in task):
            self.max_mismatch = 0.0  # as onnxopt.budget.judge: integer outputs exact unless a task budget rules

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def add(self, index: int, after_rows: metrics_mod.Rows | None) -> None:
        """Count batch ``index`` (its candidate rows of the metric) into the running bounds."""
        start, stop = self.baseline.offsets[index], self.baseline.offsets[index + 1]
        self.seen += stop - start
        if self.kind is None or after_rows is None:
            return
        labels = self.baseline.labels
        if self.kind == "hits":
            batch_labels = None if labels is None else labels[start:stop]
            self.hits += int(np.count_nonzero(self.metric.per_sample(after_rows, batch_labels)))
        elif "sse" in after_rows:
            self.sse += float(np.sum(after_rows["sse"]))
        else:  # mse rows kept as outputs (labels checked against the whole set later)
            y = after_rows["y"].astype(np.float64)
            target = np.asarray(labels[start:stop], np.float64).reshape(y.shape)
            self.sse += float(np.sum((y - target) ** 2))

    # -- exact --------------------------------------------------------------------------------------------------
    def exact(self, outputs: Mapping) -> str | None:
        """A failure no remaining sample can undo, given the running per-output accumulators; else ``None``."""
        budget, base = self.budget, self.baseline
        for name, acc in outputs.items():
            if acc.nonfinite_mismatch:
                return f"output '{name}': NaN/Inf differ from the original's at {acc.nonfinite_mismatch} places"
            if acc.exact:
                if self.max_mismatch is not None and base.elements.get(name):
                    least = acc.mismatched / base.elements[name]  # every remaining element equal at best
                    if not least <= self.max_mismatch:
                        return f"output '{name}': at least {100 * least:.3g}% of its integer values differ"
                continue
            if budget.min_cosine is not None and not acc.worst_cosine >= budget.min_cosine:
                return f"output '{name}': cosine {acc.worst_cosine:.6f} < {budget.min_cosine:g}"
            if budget.max_rel_l2 is not None and not acc.worst_rel_l2 <= budget.max_rel_l2:
                return f"output '{name}': relative L2 {acc.worst_rel_l2:.3g} > {budget.max_rel_l2:g}"
            if budget.max_abs is not None:
                least = acc.max_abs / max(1.0, base.ref_max.get(name, math.inf))
                if not least <= budget.max_abs:
                    return f"output '{name}': max abs error {least:.3g} (scaled) > {budget.max_abs:g}"
        return self._metric_bound()

    def _drop_bound(self) -> float | None:
        bound = self.budget.max_metric_drop
        if bound is None and self.metric is not None and self.metric.name == "top1":
            bound = self.budget.max_accuracy_drop
        return bound

    def _metric_bound(self) -> str | None:
        if self.kind is None:
            return None
        total, rest = self.baseline.samples, self.baseline.samples - self.seen
        name, drop_bound, limit = self.metric.name, self._drop_bound(), self.budget.metric_limit
        if self.kind == "hits":  # every remaining sample a hit at best
            best = 100.0 * float(np.float64(self.hits + rest) / total)
            facts = f"even if the remaining {rest} samples were all right"
        else:
            count = float(np.sum(self.baseline.before["count"])) if "count" in self.baseline.before else 0.0
            if not count:
                count = float(self.baseline.before["y"].size)
            least_mse = self.sse / count * (1 - _REL)  # every remaining error zero at best
            facts = f"even if the remaining {rest} samples were exact"
            if self.kind == "sse" and self.metric.reference_based:  # psnr: at most, from the least MSE
                rows = self.baseline.before
                peak = float(rows["max"].max() - rows["min"].min())
                peak = peak if peak > 0.0 else 1.0
                best = math.inf if least_mse <= 0.0 else 10.0 * math.log10(peak * peak / least_mse)
                if limit is not None and not best + SLACK >= limit:
                    return f"{name} at most {best:.4g} ({facts}) is below the limit {limit:g}"
                return None
            best = least_mse
        if drop_bound is not None and self.baseline.before_score is not None:
            before = self.baseline.before_score
            least_drop = before - best if self.metric.higher_is_better else best - before
            if not least_drop <= drop_bound + SLACK:
                return f"{name} drop at least {least_drop:.4g} ({facts}) > {drop_bound:g}"
        if limit is not None:
            within = best >= limit if self.metric.higher_is_better else best <= limit
            if not within:
                side = "below" if self.metric.higher_is_better else "above"
                return f"{name} at best {best:.4g} ({facts}) is {side} the limit {limit:g}"
        return None

    # -- statistical --------------------------------------------------------------------------------------------
    def subset(self, indices: list[int], after_rows: list[metrics_mod.Rows]) -> str | None:
        """The statistical stop on the batches ``indices`` (candidate rows ``after_rows``); see the module docstring."""
        if not self.statistical or not indices:
            return None
        base, metric = self.baseline, self.metric
        unit = 2 if metric.pair else 1
        rows = np.concatenate([np.arange(base.offsets[i], base.offsets[i + 1]) for i in indices])
        after = metrics_mod.concatenate(after_rows)
        whole = np.isin(rows // unit * unit, rows) & np.isin(rows // unit * unit + unit - 1, rows)
        keep = whole  # whole pairs only
        if keep.sum() // unit < MIN_UNITS:
            return None
        rows = rows[keep]
        after = {k: v[keep] for k, v in after.items()}
        before = {k: v[rows] for k, v in base.before.items()}
        labels = None
        if base.labels is not None:
            labels = base.labels[rows[0::unit] // unit] if metric.pair else base.labels[rows]
        try:
            result = metric.evaluate(before, after, labels, confidence=CONFIDENCE)
        except Exception:  # the full check reports the metric's failure
            return None
        bound = self._drop_bound()
        if result.interval is None or result.drop is None or not math.isfinite(result.interval[0]):
            return None
        if result.interval[0] > bound + SLACK:
            units = len(rows) // unit
            what = "pairs" if metric.pair else "samples"
            return (
                f"{metric.name} drop {result.drop:.4g} on {units} {what} of every {STRIDE}th batch, at least "
                f"{result.interval[0]:.4g} at {100 * CONFIDENCE:g}% confidence > {bound:g}"
            )
        return None


class SearchCost:
    """What the budget checks of one pass cost: candidates checked, how many stopped early or were repeats of a
    candidate checked before (not scored again), the time saved.

    ``seconds_saved`` is an estimate: each early-stopped check's scoring time, extrapolated at its own rate to
    the samples it did not score (session creation excluded, which stopping does not save).
    """

    def __init__(self) -> None:
        self.take()

    def record(self, report, seconds: float, repeated: bool = False) -> None:
        """Count one check (its report, and its wall time including the session's creation); ``repeated``: the
        report of an identical candidate checked before, not scored again."""
        self.candidates += 1
        self.seconds += seconds
        stop = report.early_stop
        if repeated:
            self.repeated += 1
            self.full += report.samples if stop is None else stop.total
            return
        if stop is None:
            self.samples += report.samples
            self.full += report.samples
            return
        self.stopped[stop.kind] += 1
        self.samples += stop.samples
        self.full += stop.total
        if stop.samples:
            self.saved += stop.seconds * (stop.total - stop.samples) / stop.samples

    def take(self) -> dict | None:
        """The tally so far as JSON-ready details (``None`` when nothing was checked), and start again."""
        tally = None
        if getattr(self, "candidates", 0):
            tally = {
                "candidates": self.candidates,
                "stopped_early": self.stopped["exact"] + self.stopped["statistical"],
                "stopped_exact": self.stopped["exact"],
                "stopped_statistical": self.stopped["statistical"],
                "repeated": self.repeated,
                "samples_scored": self.samples,
                "samples_if_full": self.full,
                "check_seconds": round(self.seconds, 3),
                "seconds_saved_estimate": round(self.saved, 3),
            }
        self.candidates, self.repeated, self.samples, self.full, self.seconds, self.saved = 0, 0, 0, 0, 0.0, 0.0
        self.stopped = {"exact": 0, "statistical": 0}
        return tally
