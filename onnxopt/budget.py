"""The error budget: how far an optimized model may drift from the original, and the verdict on a validation.

:class:`Budget` holds the bounds (task metric drop or limit, accuracy drop, task-MSE increase, output similarity,
integer mismatch, at a confidence); :func:`judge` reads a :class:`~onnxopt.validate.ValidationReport` against it
and gives one failure message per bound broken (none: the budget holds). :mod:`onnxopt.validate` measures;
this module decides.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["Budget", "judge", "judge_metric", "has_task_budget", "spent"]

TOLERANCE = 1e-9  # a drop at the bound (up to float rounding) holds


@dataclasses.dataclass(frozen=True)
class Budget:
    """How far an optimized model may drift from the original. ``None`` means "not checked".

    Attributes:
        max_accuracy_drop: accuracy loss allowed, in percentage points (needs class labels).
        max_mse_increase: relative task-MSE increase allowed, 0.01 = 1% (needs regression targets).
        min_cosine: lowest allowed per-sample cosine similarity, for every output.
        max_rel_l2: highest allowed per-sample relative L2 error, for every output.
        max_abs: highest allowed ``max|Δ| / max(1, max|y|)``, for every output.
        max_metric_drop: task-metric loss allowed, in the metric's units (for a lower-is-better metric, the
            increase allowed); needs a metric (``--max-accuracy-drop`` is this for ``top1``).
        metric_limit: the worst value the metric may take after optimization (a floor when higher is better,
            a ceiling otherwise); the bar for ``psnr``, whose value before is +inf.
        confidence: judge the metric at this confidence's interval end (0.95: the worse end of the 95%
            bootstrap interval must be within the budget) instead of at the point estimate.
        max_mismatch: fraction of the elements of integer and boolean outputs allowed to differ (default 0).
    """

    max_accuracy_drop: float | None = None
    max_mse_increase: float | None = None
    min_cosine: float | None = None
    max_rel_l2: float | None = None
    max_abs: float | None = None
    max_metric_drop: float | None = None
    metric_limit: float | None = None
    confidence: float | None = None
    max_mismatch: float | None = None

    @classmethod
    def exact(cls) -> Budget:
        """For runs whose passes are all output-preserving up to float rounding."""
        return cls(max_abs=1e-5)

    @classmethod
    def default(cls, *, exact: bool, has_labels: bool) -> Budget:
        """The budget used when the user gives none."""
        if exact:
            return cls.exact()
        if has_labels:
            return cls(max_accuracy_drop=0.5)
        return cls(min_cosine=0.999)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self) if f.name != "confidence")

    def share(self, fraction: float) -> Budget:
        """The part ``fraction`` (0-1] of this budget: every allowed drop, increase or error times ``fraction``,
        the allowed cosine loss ``1 − min_cosine`` too. ``metric_limit`` (a bar, not an amount) and
        ``confidence`` stay."""
        if not 0 < fraction <= 1:
            raise ValueError(f"a budget share is in (0, 1], got {fraction}")
        scaled = {
            name: None if getattr(self, name) is None else getattr(self, name) * fraction
            for name in ("max_accuracy_drop", "max_mse_increase", "max_rel_l2", "max_abs", "max_metric_drop",
                         "max_mismatch")
        }  # fmt: skip
        cosine = None if self.min_cosine is None else 1 - (1 - self.min_cosine) * fraction
        return dataclasses.replace(self, min_cosine=cosine, **scaled)

    @property
    def has_similarity(self) -> bool:
        """The budget bounds output similarity (cosine, relative L2 or max abs)."""
        return self.min_cosine is not None or self.max_rel_l2 is not None or self.max_abs is not None

    def describe(self) -> str:
        parts = []
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop:g} pp")
        if self.max_mse_increase is not None:
            parts.append(f"task MSE increase <= {100 * self.max_mse_increase:g}%")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.max_rel_l2 is not None:
            parts.append(f"relative L2 <= {self.max_rel_l2:g}")
        if self.max_abs is not None:
            parts.append(f"max abs error (scaled) <= {self.max_abs:g}")
        if self.max_metric_drop is not None:
            parts.append(f"metric drop <= {self.max_metric_drop:g}")
        if self.metric_limit is not None:
            parts.append(f"metric limit {self.metric_limit:g}")
        if self.max_mismatch is not None:
            parts.append(f"integer mismatch <= {self.max_mismatch:g}")
        if self.confidence is not None and parts:
            parts.append(f"at {100 * self.confidence:g}% confidence")
        return ", ".join(parts) or "no budget"


def _metric_drop_bound(budget: Budget, metric) -> float | None:
    """The drop allowed to the task metric: ``max_metric_drop``, else ``max_accuracy_drop`` when it is top-1."""
    if budget.max_metric_drop is None and metric is not None and metric.name == "top1":
        return budget.max_accuracy_drop
    return budget.max_metric_drop


def _accuracy_judged_by_metric(report, budget: Budget) -> bool:
    """``max_accuracy_drop`` is judged on the top-1 metric (:func:`judge_metric`), not on the labels' accuracy."""
    return report.metric is not None and report.metric.name == "top1" and budget.max_metric_drop is None


def _max_mismatch(budget: Budget) -> float | None:
    """The fraction of integer output elements allowed to differ: exact unless allowed, or unless a task budget is
    the bar for them (as for float outputs)."""
    if budget.max_mismatch is None and not has_task_budget(budget):
        return 0.0
    return budget.max_mismatch


def judge_metric(report, budget: Budget) -> list[str]:
    """Failures of the task-metric bounds (drop, limit; at the interval's worse end with ``confidence``)."""
    result = report.metric
    drop_bound = _metric_drop_bound(budget, result)
    if drop_bound is None and budget.metric_limit is None:
        return []
    if result is None:
        return [] if report.failures else ["a metric budget was given but no metric was measured (give --metric)"]
    failures = []
    at = f" ({100 * budget.confidence:g}% interval's worse end)" if budget.confidence is not None else ""
    if drop_bound is not None:
        if result.drop is None:
            failures.append(
                f"metric '{result.name}' compares with the original's output: bound it with a metric limit, not a drop"
            )
        else:
            drop = result.worst_drop if budget.confidence is not None else result.drop
            if not drop <= drop_bound + TOLERANCE and result.name == "top1" and budget.max_metric_drop is None:
                failures.append(  # --max-accuracy-drop: the message it always had
                    f"accuracy {result.after:.2f}% vs {result.before:.2f}%: drop {drop:.2f} pp{at} > {drop_bound:g} pp"
                )
            elif not drop <= drop_bound + TOLERANCE:
                failures.append(
                    f"{result.name} {result.after:.4g} vs {result.before:.4g}: drop {drop:.4g}{at} > {drop_bound:g}"
                )
    if budget.metric_limit is not None:
        value = result.worst_after if budget.confidence is not None else result.after
        within = value >= budget.metric_limit if result.higher_is_better else value <= budget.metric_limit
        if not within:
            side = "below" if result.higher_is_better else "above"
            failures.append(f"{result.name} {value:.4g}{at} is {side} the limit {budget.metric_limit:g}")
    return failures


def has_task_budget(budget: Budget) -> bool:
    """The budget bounds the task (metric, accuracy or task MSE), not only the outputs' similarity."""
    task = (budget.max_accuracy_drop, budget.max_mse_increase, budget.max_metric_drop, budget.metric_limit)
    return any(v is not None for v in task)


def judge(report, budget: Budget) -> list[str]:
    """Every bound of ``budget`` that ``report`` (a ValidationReport) breaks, as one message each."""
    failures = []
    max_mismatch = _max_mismatch(budget)
    for name, diff in report.outputs.items():
        if diff.nonfinite_mismatch:
            failures.append(f"output '{name}': NaN/Inf differ from the original's at {diff.nonfinite_mismatch} places")
        if diff.mismatch is not None:
            if max_mismatch is not None and not diff.mismatch <= max_mismatch:
                failures.append(f"output '{name}': {100 * diff.mismatch:.3g}% of its integer values differ")
            continue
        if budget.min_cosine is not None and not diff.cosine >= budget.min_cosine:
            failures.append(f"output '{name}': cosine {diff.cosine:.6f} < {budget.min_cosine:g}")
        if budget.max_rel_l2 is not None and not diff.rel_l2 <= budget.max_rel_l2:
            failures.append(f"output '{name}': relative L2 {diff.rel_l2:.3g} > {budget.max_rel_l2:g}")
        if budget.max_abs is not None and not diff.scaled_abs <= budget.max_abs:
            failures.append(f"output '{name}': max abs error {diff.scaled_abs:.3g} (scaled) > {budget.max_abs:g}")
    if budget.max_mse_increase is not None:
        if report.task_mse is None:
            failures.append("a task-MSE budget was given but the data has no regression targets ('labels')")
        else:
            before, after = report.task_mse["before"], report.task_mse["after"]
            if not after <= before * (1 + budget.max_mse_increase) + 1e-30:
                failures.append(
                    f"task MSE {after:.4g} vs {before:.4g}: +{100 * (after / before - 1):.2f}% > "
                    f"{100 * budget.max_mse_increase:g}%"
                )
    failures.extend(judge_metric(report, budget))
    if budget.max_accuracy_drop is not None and not _accuracy_judged_by_metric(report, budget):
        if report.accuracy is None:
            failures.append("an accuracy budget was given but the data has no labels for a class-score output")
        else:
            drop = report.accuracy["before"] - report.accuracy["after"]
            if not drop <= budget.max_accuracy_drop + TOLERANCE:
                failures.append(
                    f"accuracy {report.accuracy['after']:.2f}% vs {report.accuracy['before']:.2f}%: "
                    f"drop {drop:.2f} pp > {budget.max_accuracy_drop:g} pp"
                )
    return failures


def spent(report, budget: Budget) -> float | None:
    """How much of ``budget`` the model of ``report`` (a ValidationReport) uses: the largest of its bounds' used
    fractions (a metric drop of 0.2 against 0.5 allowed: 0.4; cosine 0.9995 against 0.999: 0.5), 0 where it
    gains, above 1 where a bound breaks; ``None`` when a bound was not measured (no metric, no labels) or the budget
    bounds nothing. ``metric_limit`` counts from the original's value to the limit, as the room there was."""

    def used(loss: float | None, allowed: float | None) -> float | None:
        if allowed is None:
            return 0.0
        if loss is None:
            return None
        if allowed <= 0:
            return 0.0 if loss <= TOLERANCE else math.inf
        return max(loss, 0.0) / allowed

    fractions: list[float | None] = []
    metric = report.metric
    drop_bound = _metric_drop_bound(budget, metric)
    if drop_bound is not None:
        drop = None if metric is None else (metric.worst_drop if budget.confidence is not None else metric.drop)
        fractions.append(used(drop, drop_bound))
    if budget.metric_limit is not None:
        if metric is None or metric.before is None or not math.isfinite(metric.before):
            fractions.append(None)  # no room to count from (psnr's before is +inf)
        else:
            after = metric.worst_after if budget.confidence is not None else metric.after
            sign = 1 if metric.higher_is_better else -1
            fractions.append(used(sign * (metric.before - after), sign * (metric.before - budget.metric_limit)))
    if budget.max_accuracy_drop is not None and not _accuracy_judged_by_metric(report, budget):
        accuracy = report.accuracy
        drop = None if accuracy is None else accuracy["before"] - accuracy["after"]
        fractions.append(used(drop, budget.max_accuracy_drop))
    if budget.max_mse_increase is not None:
        mse = report.task_mse
        increase = None if mse is None or not mse["before"] else mse["after"] / mse["before"] - 1
        fractions.append(used(increase, budget.max_mse_increase))
    max_mismatch = _max_mismatch(budget)
    for diff in report.outputs.values():
        if diff.mismatch is not None:
            fractions.append(used(diff.mismatch, max_mismatch))
            continue
        if budget.min_cosine is not None:
            fractions.append(used(1 - diff.cosine, 1 - budget.min_cosine))
        fractions.append(used(diff.rel_l2, budget.max_rel_l2))
        fractions.append(used(diff.scaled_abs, budget.max_abs))
    if budget.is_empty() or any(f is None for f in fractions):
        return None
    return max(fractions, default=0.0)
