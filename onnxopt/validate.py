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
  the task's mean squared error of both models (``task_mse``).

The optimized model must also pass ``onnx.checker.check_model(full_check=True)``, whose strict shape
inference catches stale shapes that onnxruntime only warns about. Both models run as they would be
deployed, with onnxruntime's graph optimizations on: a QDQ int8 model then runs onnxruntime's integer
kernels, which round differently from the float simulation of its Quantize/Dequantize pairs (measured:
int8 models judged within 0.5 pp with optimizations off lost 0.52-1.06 pp with them on).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.data import DataSource
from onnxopt.errors import ValidationError, first_line
from onnxopt.runtime import Session

__all__ = ["Budget", "OutputDiff", "ValidationReport", "Reference", "validate"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Budget:
    """How far an optimized model may drift from the original. ``None`` means "not checked".

    Attributes:
        max_accuracy_drop: accuracy loss allowed, in percentage points (needs class labels).
        max_mse_increase: relative task-MSE increase allowed, 0.01 = 1% (needs regression targets).
        min_cosine: lowest allowed per-sample cosine similarity, for every output.
        max_rel_l2: highest allowed per-sample relative L2 error, for every output.
        max_abs: highest allowed ``max|Δ| / max(1, max|y|)``, for every output.
    """

    max_accuracy_drop: float | None = None
    max_mse_increase: float | None = None
    min_cosine: float | None = None
    max_rel_l2: float | None = None
    max_abs: float | None = None

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
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

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
        return ", ".join(parts) or "no budget"


@dataclasses.dataclass(frozen=True)
class OutputDiff:
    """Differences on one output; see the module docstring for the definitions."""

    max_abs: float
    max_rel: float
    scaled_abs: float
    cosine: float
    rel_l2: float
    top1_agreement: float | None


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
        }


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

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
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

    def result(self) -> OutputDiff:
        return OutputDiff(
            max_abs=self.max_abs,
            max_rel=self.max_abs / self.ref_max if self.ref_max else (0.0 if self.max_abs == 0 else math.inf),
            scaled_abs=self.max_abs / max(1.0, self.ref_max),
            cosine=self.worst_cosine,
            rel_l2=self.worst_rel_l2,
            top1_agreement=self.top1_same / self.top1_total if self.classes and self.top1_total else None,
        )


class Reference:
    """The original model's session, with its outputs on one data source cached (up to ``cache_bytes``).

    A pass that searches its strength validates many candidates against the same original on the same
    data; the original then runs once per batch instead of once per candidate.
    """

    def __init__(self, original: ir.Model | str | os.PathLike, cache_bytes: int = 256 << 20) -> None:
        self.session = Session(original, optimize=True)
        self.output_names = self.session.output_names
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._room = cache_bytes

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


def validate(
    original: ir.Model | str | os.PathLike | Reference,
    optimized: ir.Model | str | os.PathLike | Session,
    data: DataSource,
    budget: Budget,
    *,
    check: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
) -> ValidationReport:
    """Compare ``optimized`` with ``original`` on ``data`` and judge the result by ``budget``."""
    report = ValidationReport(ok=False, samples=0, data=data.description, budget=budget)
    reference = original if isinstance(original, Reference) else Reference(original, cache_bytes=0)
    try:
        candidate = optimized if isinstance(optimized, Session) else Session(optimized, optimize=True)
    except Exception as e:
        report.failures.append(f"onnxruntime cannot load the optimized model: {first_line(e)}")
        return report
    if check:
        try:
            onnx.checker.check_model(str(candidate.path), full_check=True)
        except Exception as e:
            report.checker_error = first_line(e)
            report.failures.append(f"checker: {report.checker_error}")
    missing = [name for name in reference.output_names if name not in candidate.output_names]
    if missing:
        report.failures.append(f"outputs missing from the optimized model: {missing}")
        return report
    accumulators = {name: _OutputAccumulator() for name in reference.output_names}
    correct = {"before": 0, "after": 0}
    labelled = 0
    squared, targets = {"before": 0.0, "after": 0.0}, 0
    score_output = None
    for index, batch in enumerate(data):
        ref_out = reference.run(index, batch.feeds)
        got_out = candidate.run(batch.feeds, reference.output_names)
        for name, acc in accumulators.items():
            if ref_out[name].shape != got_out[name].shape:
                report.failures.append(
                    f"output '{name}' has shape {got_out[name].shape}, the original {ref_out[name].shape}"
                )
                return report
            acc.update(ref_out[name], got_out[name])
        if batch.labels is not None and batch.labels.dtype.kind == "f" and batch.labels.ndim > 1:
            target_output = _target_output(ref_out, batch.labels)
            if target_output is not None:
                target = batch.labels.reshape(ref_out[target_output].shape).astype(np.float64)
                squared["before"] += float(np.sum((ref_out[target_output] - target) ** 2))
                squared["after"] += float(np.sum((got_out[target_output] - target) ** 2))
                targets += target.size
        elif batch.labels is not None:
            score_output = score_output or _score_output(ref_out, batch.labels)
            if score_output is not None:
                labels = _label_indices(batch.labels)
                correct["before"] += int((ref_out[score_output].argmax(axis=1) == labels).sum())
                correct["after"] += int((got_out[score_output].argmax(axis=1) == labels).sum())
                labelled += len(labels)
        report.samples += batch.size
        if progress is not None:
            progress(report.samples, data.samples)
    report.outputs = {name: acc.result() for name, acc in accumulators.items()}
    if labelled:
        report.accuracy = {k: 100.0 * v / labelled for k, v in correct.items()}
    if targets:
        report.task_mse = {k: v / targets for k, v in squared.items()}
    report.failures.extend(_judge(report, budget))
    report.ok = not report.failures and report.samples > 0
    if report.samples == 0:
        report.failures.append(f"no validation batch arrived from {data.description}")
    logger.info("validation on %d samples: %s", report.samples, "ok" if report.ok else "; ".join(report.failures))
    return report


def _judge(report: ValidationReport, budget: Budget) -> list[str]:
    failures = []
    for name, diff in report.outputs.items():
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
    if budget.max_accuracy_drop is not None:
        if report.accuracy is None:
            failures.append("an accuracy budget was given but the data has no labels for a class-score output")
        else:
            drop = report.accuracy["before"] - report.accuracy["after"]
            if not drop <= budget.max_accuracy_drop + 1e-9:
                failures.append(
                    f"accuracy {report.accuracy['after']:.2f}% vs {report.accuracy['before']:.2f}%: "
                    f"drop {drop:.2f} pp > {budget.max_accuracy_drop:g} pp"
                )
    return failures


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
