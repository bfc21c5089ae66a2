"""Validation: run the original and the optimized model on the same inputs and judge them by an error budget.

Per output, over all samples (streamed, nothing kept but running extremes and counts):

- ``max_abs``: max |y' − y|; ``max_rel``: ``max_abs / max|y|``; ``scaled_abs``: ``max_abs / max(1, max|y|)``,
  the absolute error relative to the output's scale when that scale is large;
- ``cosine``: the worst (lowest) cosine similarity between y and y' of one sample, flattened;
- ``rel_l2``: the worst ‖y' − y‖ / ‖y‖ of one sample;
- ``top1_agreement``: for class-score outputs (shape (N, C), C ≥ 2), the fraction of samples whose argmax
  is unchanged;
- with integer (or one-hot) labels, task accuracy (in %) of both models on the first class-score output;
  with floating-point labels shaped like an output (regression targets, or the input for an autoencoder),
  the task's mean squared error of both models (``task_mse``);
- integer and boolean outputs are compared exactly: ``mismatch`` is the fraction of their elements that differ,
  and any mismatch fails unless the budget's ``max_mismatch`` allows it (cosine and the other float measures are
  still reported for them, but not judged);
- non-finite values (NaN, +Inf, -Inf) must match position for position and kind for kind
  (``nonfinite_mismatch`` counts the positions that do not; any fails); the finite rest is compared as above.

With a task metric (:mod:`onnxopt.metrics`), only the metric's output is kept per sample for both models and the
metric is computed once over the whole set; its drop (with a paired bootstrap interval) is judged by the budget's
``max_metric_drop`` / ``metric_limit`` (at the interval's worse end with ``confidence``), and output similarity
is reported but not judged unless a similarity budget is given too.

Early stop (``validate(..., early_stop="exact" | "on")``; the searches' budget checks, :mod:`onnxopt.early_stop`):
after every batch, a check whose failure is already certain stops there and fails, with ``report.early_stop``
saying where. A passing candidate is always scored on every sample, so a passing verdict, and the final
validation (which never stops early), are what they are without early stopping. What the samples not yet
scored could at best do is bounded with facts about the whole set taken from the original model once per data
source (its metric rows, its largest |y|, its element counts):

- exact (the bound cannot be wrong; a search chooses exactly what it chooses without early stopping):
  - NaN/Inf at places the original has none (or the reverse): final once seen.
  - ``min_cosine`` / ``max_rel_l2``: the worst sample so far is final (a later sample can only make it worse).
  - ``max_abs`` (scaled): the error so far over ``max(1, max|y|)`` of the *whole* set (the scale may still grow).
  - integer outputs: differing elements so far over all elements of the set exceed ``max_mismatch``.
  - ``top1`` / ``top5`` (and ``--max-accuracy-drop``): even if every remaining sample were a hit, the whole-set
    drop would exceed the budget (or the accuracy stay under ``metric_limit``).
  - ``mse``: even if every remaining error were zero, the whole-set MSE misses; ``psnr``: even then, the PSNR
    (the peak from the original over the whole set) stays under the floor.
  With ``confidence`` the verdict is at the bootstrap interval's worse end, and the metric bounds above are on
  the point estimate: exact as long as the worse end is at least as bad as the point estimate, which a
  percentile bootstrap (1000 resamples) breaks only if fewer than 2.5% of resamples were at or beyond it.
- statistical (mode ``"on"``: only for a bootstrapped metric without an exact bound, i.e. ``spearman``; mode
  ``"fast"``, opt-in: for ``top1``/``top5``/``mse`` too): every 4th batch is scored first (a quarter spread over
  the set as ordered, the data read twice); when the 99% bootstrap interval of the drop on that quarter lies
  wholly above the budget (at least 32 samples, or pairs), the check stops. It can be wrong, so a search's choice
  may differ from a full check's (rarely: it needs the quarter to be misleading at 99%). The exact top-k bound
  must allow for the candidate getting right every remaining sample the original gets wrong, so on a model with
  20% errors a candidate 6 pp over the budget is only decided after about 80% of the set; "fast" decides it on
  the quarter.
- never early: user metrics (one call over the whole set), the legacy task-MSE budget (``max_mse_increase``).

The optimized model must also pass ``onnx.checker.check_model(full_check=True)``, whose strict shape
inference catches stale shapes that onnxruntime only warns about. Both models run as they would be
deployed, with onnxruntime's graph optimizations on: a QDQ int8 model then runs onnxruntime's integer
kernels, which round differently from the float simulation of its Quantize/Dequantize pairs (measured:
int8 models judged within 0.5 pp with optimizations off lost 0.52-1.06 pp with them on).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import early_stop as early_stopping
from onnxopt import graph as graph_io
from onnxopt import metrics as metrics_mod
from onnxopt.budget import Budget, judge
from onnxopt.data import DataSource
from onnxopt.errors import DataError, UsageError, ValidationError, first_line
from onnxopt.executor import Executor, Job, SessionOpenError, ShardCache
from onnxopt.runtime import Session

__all__ = [
    "Budget",
    "OutputDiff",
    "ValidationReport",
    "Reference",
    "validate",
    "validate_many",
    "metric_baseline",
    "run_checker",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OutputDiff:
    """Differences on one output; see the module docstring for the definitions."""

    max_abs: float
    max_rel: float
    scaled_abs: float
    cosine: float
    rel_l2: float
    top1_agreement: float | None
    mismatch: float | None = None  # integer and boolean outputs: fraction of elements that differ
    nonfinite: int = 0  # NaN/Inf positions in the original's output
    nonfinite_mismatch: int = 0  # positions where the two models' NaN/Inf do not match


@dataclasses.dataclass
class ValidationReport:
    """The verdict of :func:`validate`."""

    ok: bool
    samples: int
    data: str
    budget: Budget
    outputs: dict[str, OutputDiff] = dataclasses.field(default_factory=dict)
    accuracy: dict[str, float] | None = None
    task_mse: dict[str, float] | None = None
    checker_error: str | None = None
    failures: list[str] = dataclasses.field(default_factory=list)
    metric: metrics_mod.MetricResult | None = None
    early_stop: early_stopping.Stopped | None = None  # the check stopped before the whole set (a clear failure)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise ValidationError("validation failed: " + "; ".join(self.failures), self)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "samples": self.samples,
            "data": self.data,
            "budget": {k: v for k, v in dataclasses.asdict(self.budget).items() if v is not None},
            "outputs": {name: _finite(dataclasses.asdict(diff)) for name, diff in self.outputs.items()},
            "accuracy": self.accuracy,
            "task_mse": self.task_mse,
            "checker_error": self.checker_error,
            "failures": list(self.failures),
            "metric": None if self.metric is None else self.metric.to_json(),
        } | ({} if self.early_stop is None else {"early_stop": self.early_stop.to_json()})


class _OutputAccumulator:
    """Streaming comparison of one output."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.ref_max = 0.0
        self.worst_cosine = 1.0
        self.worst_rel_l2 = 0.0
        self.top1_same = 0
        self.top1_total = 0
        self.classes = True
        self.exact = False
        self.mismatched = 0
        self.elements = 0
        self.nonfinite = 0
        self.nonfinite_mismatch = 0

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        if ref.dtype.kind in "biu" or got.dtype.kind in "biu":
            self.exact = True
            self.mismatched += int(np.count_nonzero(ref != got))
            self.elements += int(ref.size)
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        bad_ref, bad_got = ~np.isfinite(ref64), ~np.isfinite(got64)
        if bad_ref.any() or bad_got.any():
            # NaN/Inf must match position for position (NaN with NaN, +Inf with +Inf); the finite rest is compared
            either = bad_ref | bad_got
            same = (bad_ref == bad_got) & ((ref64 == got64) | (np.isnan(ref64) & np.isnan(got64)))
            self.nonfinite += int(np.count_nonzero(bad_ref))
            self.nonfinite_mismatch += int(np.count_nonzero(either & ~same))
            ref64, got64 = np.where(either, 0.0, ref64), np.where(either, 0.0, got64)
        diff = got64 - ref64
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.nanmax(np.abs(diff))) if np.isfinite(diff).all() else math.inf)
            self.ref_max = max(self.ref_max, float(np.abs(ref64).max()))
        samples = ref64.reshape(ref64.shape[0], -1) if ref64.ndim >= 1 and ref64.shape[0] else ref64.reshape(1, -1)
        gots = got64.reshape(samples.shape)
        for r, g in zip(samples, gots, strict=True):
            r_norm, g_norm = float(np.linalg.norm(r)), float(np.linalg.norm(g))
            d_norm = float(np.linalg.norm(g - r))
            if not np.isfinite(d_norm):
                self.worst_cosine, self.worst_rel_l2 = -1.0, math.inf
                continue
            if r_norm == 0.0 and g_norm == 0.0:
                cosine, rel = 1.0, 0.0
            elif r_norm == 0.0 or g_norm == 0.0:
                cosine, rel = 0.0, (d_norm / r_norm if r_norm else math.inf)
            else:
                cosine, rel = float(np.dot(r, g) / (r_norm * g_norm)), d_norm / r_norm
            self.worst_cosine = min(self.worst_cosine, cosine)
            self.worst_rel_l2 = max(self.worst_rel_l2, rel)
        if ref.ndim == 2 and ref.shape[1] >= 2:
            self.top1_same += int((ref.argmax(axis=1) == got.argmax(axis=1)).sum())
            self.top1_total += ref.shape[0]
        else:
            self.classes = False

    def merge(self, other: _OutputAccumulator) -> None:
        """Fold in the accumulator of the batches that follow (extremes, counts: exact in any grouping)."""
        self.max_abs = max(self.max_abs, other.max_abs)
        self.ref_max = max(self.ref_max, other.ref_max)
        self.worst_cosine = min(self.worst_cosine, other.worst_cosine)
        self.worst_rel_l2 = max(self.worst_rel_l2, other.worst_rel_l2)
        self.top1_same += other.top1_same
        self.top1_total += other.top1_total
        self.classes = self.classes and other.classes
        self.exact = self.exact or other.exact
        self.mismatched += other.mismatched
        self.elements += other.elements
        self.nonfinite += other.nonfinite
        self.nonfinite_mismatch += other.nonfinite_mismatch

    def result(self) -> OutputDiff:
        return OutputDiff(
            max_abs=self.max_abs,
            max_rel=self.max_abs / self.ref_max if self.ref_max else (0.0 if self.max_abs == 0 else math.inf),
            scaled_abs=self.max_abs / max(1.0, self.ref_max),
            cosine=self.worst_cosine,
            rel_l2=self.worst_rel_l2,
            top1_agreement=self.top1_same / self.top1_total if self.classes and self.top1_total else None,
            mismatch=self.mismatched / self.elements if self.exact and self.elements else (0.0 if self.exact else None),
            nonfinite=self.nonfinite,
            nonfinite_mismatch=self.nonfinite_mismatch,
        )


class Reference:
    """The original model's session, with its outputs on one data source cached (up to ``cache_bytes``).

    A pass that searches its strength validates many candidates against the same original on the same
    data; the original then runs once per batch instead of once per candidate. On an executor (Ray) the
    outputs are kept per shard in ``shards`` (Ray's object store; the driver holds only references), and this
    process never opens a session of the original.
    """

    def __init__(self, original: ir.Model | str | os.PathLike, cache_bytes: int = 256 << 20) -> None:
        self.original = original
        self._session: Session | None = None
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._room = cache_bytes
        self.shards = ShardCache(cache_bytes)

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = Session(self.original, optimize=True)
        return self._session

    @property
    def output_names(self) -> list[str]:
        if self._session is None and not isinstance(self.original, ir.Model):
            return _output_names(self.original)  # no session for a sharded run
        return self.session.output_names

    def run(self, index: int, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        outputs = self.session.run(feeds)
        size = sum(a.nbytes for a in outputs.values())
        if size <= self._room:
            self._cache[index] = outputs
            self._room -= size
        return outputs

    def cached(self, batches: int) -> list[dict[str, np.ndarray]] | None:
        """The original's outputs on batches ``0 .. batches-1`` from the cache (no run), or ``None`` when one of
        them is not cached."""
        if any(i not in self._cache for i in range(batches)):
            return None
        return [self._cache[i] for i in range(batches)]

    def reordered(self, data: DataSource, taken: DataSource) -> Reference | None:
        """The original on ``taken`` (``data``'s samples read in ``taken.order``, :func:`onnxopt.data.reordered`),
        from this reference's cached outputs on ``data``: a reference that runs nothing for those batches (it
        shares this one's session). ``None`` when a batch of ``data`` is not cached, or an output has no batch axis.
        """
        sizes = data.batch_sizes
        outputs = self.cached(len(sizes)) if sizes and taken.order is not None else None
        if outputs is None:
            return None
        names = list(outputs[0])
        for batch, size in zip(outputs, sizes, strict=True):
            if any(np.ndim(batch[n]) == 0 or len(batch[n]) != size for n in names):
                return None
        whole = {name: np.concatenate([batch[name] for batch in outputs]) for name in names}
        other = Reference(self.original, cache_bytes=0)
        other._session = self._session
        start = 0
        for index, size in enumerate(taken.batch_sizes):
            rows = taken.order[start : start + size]
            other._cache[index] = {name: array[rows] for name, array in whole.items()}
            start += size
        return other


class _Fold:
    """Validation's per-batch quantities over consecutive batches (see :func:`validate`).

    Extremes and counts are folded; what depends on every sample (the metric's rows, the labels, per-batch
    squared errors) is kept per batch, keyed by the batch's index, and taken in index order at the end: the folds
    of consecutive shards, merged in batch order, and a local pass that visits the batches out of order (the
    early stop's sweeps) give the report of one pass over all batches in order exactly.
    """

    def __init__(self, output_names: list[str], metric: metrics_mod.Metric | None, auto_top1: bool) -> None:
        self.output_names = list(output_names)
        self.metric = metric  # bound on the first batch
        self.auto_top1 = auto_top1  # an accuracy budget on labelled class scores is top1's
        self.accumulators = {name: _OutputAccumulator() for name in output_names}
        self.correct = {"before": 0, "after": 0}
        self.labelled = 0
        self.squared: dict[int, tuple[float, float]] = {}  # per batch with regression targets, summed in batch order
        self.targets = 0
        self.score_output: str | None = None
        self.kept: dict[str, dict[int, dict[str, np.ndarray]]] = {"before": {}, "after": {}}
        self.batch_labels: dict[int, np.ndarray] = {}
        self.samples = 0
        self.batches = 0
        self.failure: str | None = None

    def add(
        self, ref_out: dict[str, np.ndarray], got_out: dict[str, np.ndarray], batch, index: int | None = None
    ) -> bool:
        """Fold batch ``index`` (default: the next in order) in; ``False`` (and ``failure``) when an output's shape
        differs: validation stops there."""
        first = self.batches == 0
        index = self.batches if index is None else index
        self.batches += 1
        if first and self.metric is None and self.auto_top1 and batch.labels is not None:
            if _score_output(ref_out, batch.labels) is not None:
                self.metric = metrics_mod.resolve("top1")
        if self.metric is not None:
            if first:
                self.metric.bind(ref_out, batch.labels)
            self.kept["before"][index] = self.metric.rows(ref_out, batch.feeds, labels=batch.labels)
            self.kept["after"][index] = self.metric.rows(got_out, batch.feeds, reference=ref_out, labels=batch.labels)
            if batch.labels is not None:
                self.batch_labels[index] = np.asarray(batch.labels)
        for name, acc in self.accumulators.items():
            if ref_out[name].shape != got_out[name].shape:
                self.failure = f"output '{name}' has shape {got_out[name].shape}, the original {ref_out[name].shape}"
                return False
            acc.update(ref_out[name], got_out[name])
        if batch.labels is not None and batch.labels.dtype.kind == "f" and batch.labels.ndim > 1:
            target_output = _target_output(ref_out, batch.labels)
            if target_output is not None:
                target = batch.labels.reshape(ref_out[target_output].shape).astype(np.float64)
                self.squared[index] = (
                    float(np.sum((ref_out[target_output] - target) ** 2)),
                    float(np.sum((got_out[target_output] - target) ** 2)),
                )
                self.targets += target.size
        elif batch.labels is not None:
            self.score_output = self.score_output or _score_output(ref_out, batch.labels)
            if self.score_output is not None:
                labels = _label_indices(batch.labels)
                self.correct["before"] += int((ref_out[self.score_output].argmax(axis=1) == labels).sum())
                self.correct["after"] += int((got_out[self.score_output].argmax(axis=1) == labels).sum())
                self.labelled += len(labels)
        self.samples += batch.size
        return True

    def merge(self, other: _Fold) -> None:
        """Fold in the fold of the batches that follow (nothing after a failure, as one pass stops there).

        Raises:
            DataError: the shards' first batches chose different metric outputs (batches of different layouts).
        """
        if self.failure is not None or other.batches == 0:
            return
        if self.batches == 0:
            self.__dict__.update(other.__dict__)
            return
        mine = None if self.metric is None else (self.metric.name, self.metric.output)
        theirs = None if other.metric is None else (other.metric.name, other.metric.output)
        if mine != theirs:
            raise DataError(f"the evaluation batches differ in layout: metric {mine} on the first, {theirs} later")
        for name, acc in self.accumulators.items():
            acc.merge(other.accumulators[name])
        offset = self.batches  # the other fold's batches follow these: its indices start at 0
        for side in ("before", "after"):
            self.correct[side] += other.correct[side]
            self.kept[side].update({offset + i: rows for i, rows in other.kept[side].items()})
        self.labelled += other.labelled
        self.squared.update({offset + i: parts for i, parts in other.squared.items()})
        self.targets += other.targets
        self.score_output = self.score_output or other.score_output
        self.batch_labels.update({offset + i: labels for i, labels in other.batch_labels.items()})
        self.samples += other.samples
        self.batches += other.batches
        self.failure = other.failure

    def finish(
        self, report: ValidationReport, data: DataSource, budget: Budget, metric: metrics_mod.Metric | None
    ) -> None:
        """Fill ``report`` (``metric``: the caller's metric, which scores; the fold's copy only kept rows)."""
        report.samples = self.samples
        if self.failure is not None:
            report.failures.append(self.failure)
            return
        report.outputs = {name: acc.result() for name, acc in self.accumulators.items()}
        if self.labelled:
            report.accuracy = {k: 100.0 * v / self.labelled for k, v in self.correct.items()}
        if self.targets:
            squared = {"before": 0.0, "after": 0.0}
            for index in sorted(self.squared):  # in batch order: the sums of one pass
                squared["before"] += self.squared[index][0]
                squared["after"] += self.squared[index][1]
            report.task_mse = {k: v / self.targets for k, v in squared.items()}
        if metric is not None and self.metric is not None:
            metric.output = self.metric.output
        metric = metric or self.metric
        if metric is not None and report.samples:
            labels = getattr(data, "labels", None)
            if labels is None and self.batch_labels:
                labels = np.concatenate([self.batch_labels[i] for i in sorted(self.batch_labels)], axis=0)
            kept = {side: [rows[i] for i in sorted(rows)] for side, rows in self.kept.items()}
            order = getattr(data, "order", None)
            if order is not None and len(order) == report.samples:  # read out of order: score in the set's order
                inverse = np.argsort(order)
                kept = {side: [{k: v[inverse] for k, v in metrics_mod.concatenate(rows).items()}]
                        for side, rows in kept.items()}  # fmt: skip
                labels = None if labels is None else np.asarray(labels)[inverse]
            report.metric = _measure(metric, kept, labels, report, budget)
        report.failures.extend(judge(report, budget))


def run_checker(report: ValidationReport, model: ir.Model | str | os.PathLike) -> None:
    """onnx's full checker on ``model`` (a file, or an ``ir.Model`` saved to a temporary one); a failure goes into
    ``report`` (its ``checker_error`` and a line of ``failures``)."""
    try:
        if isinstance(model, ir.Model):
            with graph_io.temporary_model_file(model) as path:
                onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(str(model), full_check=True)
    except Exception as e:
        report.checker_error = first_line(e)
        report.failures.append(f"checker: {report.checker_error}")


def validate_many(
    original: ir.Model | str | os.PathLike | Reference,
    candidates: Sequence[ir.Model | str | os.PathLike | Session],
    data: DataSource,
    budget: Budget,
    *,
    check: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
    metric: metrics_mod.Metric | str | Callable[..., Any] | None = None,
    executor: Executor | None = None,
) -> list[ValidationReport]:
    """:func:`validate` for several candidates against one original: their reports, in order.

    On a sharded executor (Ray) every candidate's shards are tasks submitted together (at most the executor's
    tasks in flight), each shard's data read once for all of them: a search scores its independent candidates
    at once. Otherwise they are validated one after the other.
    """
    if metric is not None:
        metric = metrics_mod.resolve(metric)
    if not _sharded(executor):
        return [validate(original, c, data, budget, check=check, progress=progress, metric=metric) for c in candidates]
    reference = original if isinstance(original, Reference) else Reference(original, cache_bytes=0)
    names = reference.output_names
    with contextlib.ExitStack() as stack:
        reports, jobs = [], []
        for candidate in candidates:
            report = ValidationReport(ok=False, samples=0, data=data.description, budget=budget)
            reports.append(report)
            if isinstance(candidate, Session):
                candidate = candidate.path if candidate.path is not None else candidate.model
            if check:
                if isinstance(candidate, ir.Model):
                    candidate = stack.enter_context(graph_io.temporary_model_file(candidate))
                run_checker(report, candidate)
            missing = [name for name in names if name not in _output_names(candidate)]
            if missing:
                report.failures.append(f"outputs missing from the optimized model: {missing}")
                continue
            auto_top1 = metric is None and budget.max_accuracy_drop is not None
            init = (_rows_only(metric), auto_top1)
            jobs.append((report, Job((reference.original, candidate), _validate_shard, init, True, reference.shards)))
        if not jobs:
            return _judged(reports, data)
        try:
            folds = executor.map_many([job for _, job in jobs], data, progress=progress)
        except SessionOpenError as e:
            if e.index == 0:  # the original's own problem raises, as validate's session does
                raise
            if len(jobs) == 1:  # as validate: that failure alone
                jobs[0][0].checker_error = None
                jobs[0][0].failures[:] = [f"onnxruntime cannot load the optimized model: {e}"]
                return _judged(reports, data)
            # one candidate onnxruntime cannot load: score them one at a time to say which
            return [
                validate(reference, c, data, budget, check=check, progress=progress, metric=metric, executor=executor)
                for c in candidates
            ]
        for (report, _), shards in zip(jobs, folds, strict=True):
            fold = _Fold(names, None, False)
            for part in shards:
                fold.merge(part)
            fold.finish(report, data, budget, metric)
    return _judged(reports, data)


def _sharded(executor: Executor | None) -> bool:
    return executor is not None and executor.name != "local"


def _judged(reports: list[ValidationReport], data: DataSource) -> list[ValidationReport]:
    for report in reports:
        report.ok = not report.failures and report.samples > 0
        if report.samples == 0 and not report.failures:
            report.failures.append(f"no validation batch arrived from {data.description}")
        logger.info("validation on %d samples: %s", report.samples, "ok" if report.ok else "; ".join(report.failures))
    return reports


def _validate_shard(sessions, batches, init_args, cached):
    """An executor's shard: the original's outputs (``cached``, else computed and kept) and the candidate's,
    folded into a fresh :class:`_Fold`."""
    reference, candidate = sessions
    metric, auto_top1 = init_args
    names = reference.output_names
    fold = _Fold(names, metric, auto_top1)
    keep: list[dict[str, np.ndarray]] | None = [] if cached is None else None
    for index, batch in enumerate(batches):
        ref_out = cached[index] if cached is not None else reference.run(batch.feeds)
        if keep is not None:
            keep.append(ref_out)
        if not fold.add(ref_out, candidate.run(batch.feeds, names), batch):
            return fold, None  # a partial shard is not kept
    return fold, keep


def _rows_only(metric: metrics_mod.Metric | None) -> metrics_mod.Metric | None:
    """A copy of ``metric`` for a worker, which only keeps rows: a user function (perhaps imported from a file
    the worker cannot import) stays here, where the metric is scored."""
    if metric is None or not hasattr(metric, "fn"):
        return metric
    rows_only = copy.copy(metric)
    rows_only.fn = None
    return rows_only


def _output_names(model: ir.Model | str | os.PathLike) -> list[str]:
    """The graph outputs' names, in order (onnxruntime's), without reading the weights."""
    if isinstance(model, ir.Model):
        return [value.name for value in model.graph.outputs]
    return [value.name for value in onnx.load(str(model), load_external_data=False).graph.output]


def validate(
    original: ir.Model | str | os.PathLike | Reference,
    optimized: ir.Model | str | os.PathLike | Session,
    data: DataSource,
    budget: Budget,
    *,
    check: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
    metric: metrics_mod.Metric | str | Callable[..., Any] | None = None,
    early_stop: str | None = None,
    executor: Executor | None = None,
) -> ValidationReport:
    """Compare ``optimized`` with ``original`` on ``data`` and judge the result by ``budget``.

    ``metric`` (a :class:`onnxopt.metrics.Metric`, a built-in name, ``MODULE:FUNCTION`` or a callable) is measured
    on both models and judged by the budget's metric bounds; without one, an accuracy budget on labelled data
    is measured as ``top1``.

    ``early_stop`` (``"off"``, the default; ``"exact"``; ``"on"``): stop scoring as soon as the failure is certain
    (see the module docstring); the report then says so in ``early_stop`` and holds what was measured so far. A
    passing verdict is the same in every mode.

    ``executor`` (:mod:`onnxopt.executor`; ``None`` or local: this process) shards the batches over Ray workers:
    each shard's fold comes back and they merge, in batch order, into the report of one pass (the same numbers;
    ``early_stop`` does not apply there). A :class:`Reference` then keeps the original's outputs per shard in
    Ray's object store.

    Raises:
        UsageError, DataError: the metric cannot be computed on the original model's outputs (an output that
            does not exist or fit, labels that do not fit, a user function that raises or returns NaN).
    """
    if metric is not None:
        metric = metrics_mod.resolve(metric)
    if _sharded(executor):
        return validate_many(original, [optimized], data, budget, check=check, progress=progress, metric=metric,
                             executor=executor)[0]  # fmt: skip
    stop_mode = early_stopping.mode(early_stop or "off")
    report = ValidationReport(ok=False, samples=0, data=data.description, budget=budget)
    reference = original if isinstance(original, Reference) else Reference(original, cache_bytes=0)
    try:
        candidate = optimized if isinstance(optimized, Session) else Session(optimized, optimize=True)
    except Exception as e:
        report.failures.append(f"onnxruntime cannot load the optimized model: {first_line(e)}")
        return report
    if check:
        run_checker(report, candidate.path if candidate.path is not None else candidate.model)  # None: from memory
    missing = [name for name in reference.output_names if name not in candidate.output_names]
    if missing:
        report.failures.append(f"outputs missing from the optimized model: {missing}")
        return report
    stopper = None
    if stop_mode != "off" and not report.failures:
        baseline = early_stopping.baseline(reference, data, metric, budget, stop_mode, _auto_metric(budget))
        if baseline is not None:
            metric = baseline.metric
            stopper = early_stopping.Stopper(budget, baseline, stop_mode)
    elif stop_mode != "off":  # the checker already failed it: nothing the samples say can pass it
        report.early_stop = early_stopping.Stopped(report.failures[0], "exact", 0, data.samples or 0)
        return report
    fold = _Fold(reference.output_names, metric, budget.max_accuracy_drop is not None)
    started = time.perf_counter()
    first_sweep: list[int] = []  # the statistical subset: the batches of the first sweep
    for sweep, index, batch in _sweeps(data, early_stopping.STRIDE if stopper and stopper.statistical else 1):
        if stopper is not None and sweep == 1 and first_sweep:
            reason = stopper.subset(first_sweep, [fold.kept["after"][i] for i in first_sweep])
            first_sweep = []
            if reason is not None:
                return _stopped(report, fold.accumulators, stopper, reason, "statistical", started)
        if sweep == 0:
            first_sweep.append(index)
        ref_out = reference.run(index, batch.feeds)
        if not fold.add(ref_out, candidate.run(batch.feeds, reference.output_names), batch, index):
            fold.finish(report, data, budget, None)  # the samples so far and the shape failure
            return report
        report.samples = fold.samples
        if progress is not None:
            progress(report.samples, data.samples)
        if stopper is not None:
            stopper.add(index, fold.kept["after"].get(index))
            reason = stopper.exact(fold.accumulators)
            if reason is not None:
                return _stopped(report, fold.accumulators, stopper, reason, "exact", started)
    fold.finish(report, data, budget, None)  # its metric: the caller's, or top1 for an accuracy budget
    report.ok = not report.failures and report.samples > 0
    if report.samples == 0:
        report.failures.append(f"no validation batch arrived from {data.description}")
    logger.info("validation on %d samples: %s", report.samples, "ok" if report.ok else "; ".join(report.failures))
    return report


def check_order(
    reference: Reference,
    data: DataSource,
    budget: Budget,
    *,
    metric: metrics_mod.Metric | None = None,
    early_stop: str | None = None,
    executor: Executor | None = None,
) -> tuple[Reference, DataSource]:
    """The reference and data that repeated checks of candidates against ``reference`` on ``data`` read: ``data``
    reordered so that early stops come soonest where that applies (:func:`onnxopt.early_stop.ordered`; top-k
    budgets on array data, run locally), else as given. Validating on either gives the same report."""
    if _sharded(executor):
        return reference, data
    stop_mode = early_stopping.mode(early_stop or "off")
    return early_stopping.ordered(reference, data, metric, budget, stop_mode, _auto_metric(budget))


def _auto_metric(budget: Budget):
    """What an accuracy budget measures when no metric is given: ``top1`` on labelled class scores."""

    def auto(outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> metrics_mod.Metric | None:
        if budget.max_accuracy_drop is not None and _score_output(outputs, labels) is not None:
            return metrics_mod.resolve("top1")
        return None

    return auto


def _sweeps(data: DataSource, stride: int):
    """``(sweep, index, batch)``: with ``stride`` 1 the batches in order; else every ``stride``-th batch first
    (sweep 0: a subset spread over the set as it is ordered), then the others (sweep 1), reading the data twice."""
    if stride <= 1:
        for index, batch in enumerate(data):
            yield 0, index, batch
        return
    for index, batch in enumerate(data):
        if index % stride == 0:
            yield 0, index, batch
    for index, batch in enumerate(data):
        if index % stride:
            yield 1, index, batch


def _stopped(report: ValidationReport, accumulators, stopper, reason: str, kind: str, started: float):
    """End a check early: its failure, what was measured so far, and how far it got."""
    total = stopper.baseline.samples
    seconds = time.perf_counter() - started
    report.early_stop = early_stopping.Stopped(reason, kind, report.samples, total, seconds)
    report.failures.append(f"{reason} (decided on {report.samples} of {total} samples, {kind})")
    report.outputs = {name: acc.result() for name, acc in accumulators.items()}
    logger.info("validation stopped early: %s", report.failures[-1])
    return report


def metric_baseline(
    original: ir.Model | str | os.PathLike | Reference,
    data: DataSource,
    metric: metrics_mod.Metric,
    *,
    executor: Executor | None = None,
) -> float:
    """The metric of the original model on ``data``: a check, before any pass runs, that it can be computed.

    ``executor``: as :func:`validate` (the rows come from Ray workers, the metric is scored here).

    Raises:
        UsageError, DataError: an output that does not exist or fit, labels that do not fit the metric, a
            function that raises or returns NaN, Inf or a non-scalar.
    """
    reference = original if isinstance(original, Reference) else Reference(original, cache_bytes=0)
    if _sharded(executor):
        parts = executor.map_batches(reference.original, data, _baseline_shard, _rows_only(metric), optimize=True)
        parts = [part for part in parts if part[3]]
        metric.output = parts[0][0] if parts else metric.output  # as bound on the first batch
        rows = [r for part in parts for r in part[1]]
        batch_labels = [b for part in parts for b in part[2]]
        samples = sum(part[3] for part in parts)
    else:
        rows, batch_labels, samples = _baseline_rows(metric, data, reference.run)
    if not samples:
        raise DataError(f"{data.description}: no evaluation samples")
    labels = getattr(data, "labels", None)
    if labels is None and batch_labels:
        labels = np.concatenate(batch_labels, axis=0)
    metric.check_labels(labels, samples)
    kept = metrics_mod.concatenate(rows)
    try:
        value = metric.score(kept, labels, kept)
    except Exception as e:
        raise UsageError(f"metric '{metric.name}' failed on the original model's outputs: {first_line(e)}") from e
    if math.isnan(value) or (not metric.reference_based and not math.isfinite(value)):
        raise DataError(f"metric '{metric.name}' is {value} on the original model's outputs")
    return value


def _baseline_rows(metric: metrics_mod.Metric, batches, run) -> tuple[list, list, int]:
    """The metric's rows of the original's outputs (``run(index, feeds)``), the batches' labels, the samples."""
    rows, batch_labels, samples = [], [], 0
    for index, batch in enumerate(batches):
        outputs = run(index, batch.feeds)
        if index == 0:
            metric.bind(outputs, batch.labels)
        rows.append(metric.rows(outputs, batch.feeds, labels=batch.labels))
        if batch.labels is not None:
            batch_labels.append(np.asarray(batch.labels))
        samples += batch.size
    return rows, batch_labels, samples


def _baseline_shard(session: Session, batches, metric: metrics_mod.Metric):
    """An executor's shard of :func:`metric_baseline`: the chosen output, rows, labels and samples."""
    rows, batch_labels, samples = _baseline_rows(metric, batches, lambda index, feeds: session.run(feeds))
    return metric.output, rows, batch_labels, samples


def _measure(
    metric: metrics_mod.Metric,
    kept: dict[str, list[dict[str, np.ndarray]]],
    labels: np.ndarray | None,
    report: ValidationReport,
    budget: Budget,
) -> metrics_mod.MetricResult | None:
    """The metric on both models; errors on the original's side raise, on the optimized side fail the report."""
    metric.check_labels(labels, report.samples)
    before = metrics_mod.concatenate(kept["before"])
    after = metrics_mod.concatenate(kept["after"])
    value = None
    if not metric.reference_based:
        try:
            value = metric.score(before, labels, before)
        except Exception as e:
            raise UsageError(f"metric '{metric.name}' failed on the original model's outputs: {first_line(e)}") from e
        if not math.isfinite(value):
            raise DataError(f"metric '{metric.name}' is {value} on the original model's outputs")
    try:
        result = metric.evaluate(before, after, labels, confidence=budget.confidence or 0.95, before_score=value)
    except Exception as e:
        report.failures.append(f"metric '{metric.name}' failed on the optimized model's outputs: {first_line(e)}")
        return None
    if math.isnan(result.after):
        report.failures.append(f"metric '{metric.name}' is NaN on the optimized model's outputs")
    return result


def _score_output(outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> str | None:
    for name, array in outputs.items():
        if array.ndim == 2 and array.shape[1] >= 2 and array.shape[0] == len(labels):
            return name
    return None


def _target_output(outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> str | None:
    for name, array in outputs.items():
        if array.size == labels.size and array.shape[0] == labels.shape[0]:
            return name
    return None


def _label_indices(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.argmax(axis=1)
    return labels.reshape(-1).astype(np.int64)


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no Infinity/NaN: write them as strings."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
