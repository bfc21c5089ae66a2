"""Task metrics: one number per model over the whole evaluation set, and its drop with a bootstrap interval.

``--metric NAME`` (``PassManager(..., metric=NAME or callable)``) judges an optimized model by the task instead of
by output similarity. Built in:

- ``top1``, ``top5``: classification accuracy in % on a class-score output (N, C); labels are class indices (or
  one-hot rows). ``top1`` is what ``--max-accuracy-drop`` measures.
- ``mse``: mean squared error against float targets shaped like the output (regression, reconstruction); lower
  is better.
- ``psnr``: PSNR in dB of the optimized model's output against the *original* model's output (no labels).
  The peak is the original output's range (max - min) over the whole evaluation set, so the score does not
  depend on whether images are in [0, 1] or [0, 255]; the mean squared error is over every element of every
  sample. The original against itself is +inf, so a ``psnr`` budget is a floor (``--metric-limit DB``), not a drop.
- ``spearman``: sentence-pair similarity. Samples come in pairs (rows 2k and 2k+1) and ``labels`` holds one gold
  score per pair. The embedding is the metric's output, mean-pooled over the positions where the input named
  ``attention_mask`` is 1 when the output is 3-D (N, tokens, hidden); the score is Spearman's rho x 100 between
  the pairs' cosine similarities and the gold scores, ties given their average rank (as ``scipy.stats.spearmanr``).
- ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION``: the user's own. It is called once per model with every
  output over the whole evaluation set (``dict[name, np.ndarray]``, samples on axis 0), the labels (or ``None``)
  and the evaluation inputs (``dict[name, np.ndarray]``), and returns a finite float. Higher is better unless the
  function has the attribute ``higher_is_better = False``. A user metric gets no bootstrap interval (it is not
  re-run on resamples), so ``--budget-confidence`` does not apply to it.

The built-in metrics read one output: ``--metric-output NAME``, else the first output that fits (2-D with at
least two columns for ``top1``/``top5``, the size of the labels for ``mse``, 2-D or 3-D for ``spearman``, any
floating-point output for ``psnr``). During validation only that output is kept (``spearman`` keeps the pooled
(N, hidden) embeddings), for both models; the metric is then computed once. The drop is ``before - after`` for
higher-is-better metrics and ``after - before`` otherwise, so a positive drop is always a loss; its interval is a
paired percentile bootstrap (1000 resamples of the evaluation samples, of the pairs for ``spearman``, seed 0).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.errors import DataError, UsageError, first_line

__all__ = ["BUILTIN", "Metric", "MetricResult", "resolve", "concatenate", "rankdata", "spearman_rho", "mean_pool"]

logger = logging.getLogger(__name__)

BUILTIN = ("top1", "top5", "mse", "psnr", "spearman")
RESAMPLES = 1000
MASK_INPUT = "attention_mask"
Rows = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class MetricResult:
    """A metric measured on both models. ``interval`` bounds ``drop`` (``after`` when ``before`` is ``None``)."""

    name: str
    output: str | None
    higher_is_better: bool
    before: float | None
    after: float
    drop: float | None
    interval: tuple[float, float] | None
    confidence: float

    @property
    def worst_drop(self) -> float | None:
        """The interval's worse end of the drop (the point drop without an interval)."""
        if self.drop is None:
            return None
        return self.interval[1] if self.interval is not None else self.drop

    @property
    def worst_after(self) -> float:
        """The interval's worse end of ``after`` for a reference-based metric (else ``after``)."""
        if self.drop is not None or self.interval is None:
            return self.after
        return self.interval[0] if self.higher_is_better else self.interval[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "output": self.output,
            "higher_is_better": self.higher_is_better,
            "before": _json_float(self.before),
            "after": _json_float(self.after),
            "drop": _json_float(self.drop),
            "interval": None if self.interval is None else [_json_float(v) for v in self.interval],
            "interval_of": "drop" if self.drop is not None else "after",
            "confidence": self.confidence,
        }


class Metric:
    """A task metric; see the module docstring. Subclasses define :meth:`pick`, :meth:`rows` and :meth:`score`.

    Attributes:
        name: the name given by the user.
        higher_is_better: the direction of the metric.
        pair: samples come in pairs (rows 2k, 2k+1) with one label per pair.
        needs_labels: the metric reads ``labels``.
        reference_based: the metric scores the optimized model's output against the original's (``psnr``).
        bootstrap: the drop gets a bootstrap interval.
    """

    name = ""
    higher_is_better = True
    pair = False
    needs_labels = True
    reference_based = False
    bootstrap = True

    def __init__(self, output: str | None = None) -> None:
        self.requested_output = output
        self.output: str | None = output

    # -- which output -----------------------------------------------------------------------------------------
    def bind(self, outputs: Mapping[str, np.ndarray], labels: np.ndarray | None) -> None:
        """Choose the output this metric reads from the first batch of the original's outputs.

        Raises:
            UsageError: ``--metric-output`` is not an output, or no output fits the metric.
        """
        if self.requested_output is not None:
            if self.requested_output not in outputs:
                raise UsageError(
                    f"--metric-output '{self.requested_output}' is not an output of the model "
                    f"(outputs: {', '.join(outputs)})"
                )
            self.output = self.requested_output
            problem = self.unfit(outputs[self.output], labels)
            if problem:
                raise UsageError(f"metric '{self.name}': output '{self.output}' {problem}")
            return
        for name, array in outputs.items():
            if not self.unfit(array, labels):
                self.output = name
                return
        raise UsageError(f"metric '{self.name}': no output of the model fits it; name one with --metric-output")

    def unfit(self, array: np.ndarray, labels: np.ndarray | None) -> str | None:
        """Why ``array`` (one batch of an output) cannot be this metric's output; ``None`` when it can."""
        return None

    # -- per batch ----------------------------------------------------------------------------------------------
    def rows(
        self, outputs: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray], reference=None, labels=None
    ) -> Rows:
        """What to keep of one batch, one row per sample (``reference``: the original's outputs, or ``None``;
        ``labels``: the batch's labels, when the data has them per sample)."""
        raise NotImplementedError

    # -- whole set ----------------------------------------------------------------------------------------------
    def score(self, rows: Rows, labels: np.ndarray | None, reference: Rows) -> float:
        """The metric on the kept rows (``reference``: the original's rows, for reference-based metrics)."""
        raise NotImplementedError

    def per_sample(self, rows: Rows, labels: np.ndarray | None) -> np.ndarray | None:
        """For a metric that is a function of the mean of one value per sample (:meth:`from_per_sample`), those
        values; the bootstrap then resamples them instead of re-scoring the rows. ``None``: not such a metric."""
        return None

    def from_per_sample(self, values: np.ndarray) -> float | np.ndarray:
        """The score from the per-sample values of :meth:`per_sample` (of any subset; on the last axis: a score per
        row of a 2-D array)."""
        raise NotImplementedError

    def check_labels(self, labels: np.ndarray | None, samples: int) -> None:
        """Raises DataError when ``labels`` cannot serve this metric on ``samples`` evaluation samples."""
        if self.pair and samples % 2:
            raise DataError(f"metric '{self.name}' reads sentence pairs (rows 2k, 2k+1): {samples} samples is odd")
        if not self.needs_labels:
            return
        if labels is None:
            raise DataError(f"metric '{self.name}' needs 'labels' in the evaluation data")
        expected = samples // 2 if self.pair else samples
        if len(labels) != expected:
            per = "one per pair" if self.pair else "one per sample"
            raise DataError(
                f"metric '{self.name}': 'labels' has {len(labels)} entries, expected {expected} ({per} of {samples})"
            )
        if labels.dtype.kind in "fc" and not np.isfinite(labels).all():
            raise DataError(f"metric '{self.name}': 'labels' contains NaN or Inf values")

    def evaluate(
        self,
        before: Rows,
        after: Rows,
        labels: np.ndarray | None,
        confidence: float = 0.95,
        seed: int = 0,
        before_score: float | None = None,
    ) -> MetricResult:
        """Score both models and bootstrap the drop (pairs of samples for a pair metric).

        ``before_score``: the original's score when already known (a user function is called once per model).
        """
        after_score = self.score(after, labels, before)
        if self.reference_based:
            before_score, drop = None, None
        else:
            if before_score is None:
                before_score = self.score(before, labels, before)
            drop = before_score - after_score if self.higher_is_better else after_score - before_score
        interval = None
        if self.bootstrap and math.isfinite(after_score):
            interval = self._bootstrap(before, after, labels, confidence, seed)
        return MetricResult(
            self.name, self.output, self.higher_is_better, before_score, after_score, drop, interval, confidence
        )

    def _bootstrap(self, before: Rows, after: Rows, labels, confidence: float, seed: int) -> tuple[float, float]:
        samples = len(next(iter(after.values())))
        unit = 2 if self.pair else 1
        units = samples // unit
        rng = np.random.default_rng(seed)
        values = np.empty(RESAMPLES)
        offsets = np.arange(unit)
        # per-sample values resampled directly, a block of resamples at once (the same draws, the same numbers as
        # scoring the resampled rows one by one, far fewer steps)
        fast = None if self.pair or self.reference_based else self.per_sample(after, labels)
        fast_before = None if fast is None else self.per_sample(before, labels)
        block: list[np.ndarray] = []
        for index in range(RESAMPLES):
            chosen = rng.integers(0, units, units)
            if fast is not None:
                block.append(chosen)
                if len(block) * units >= 1 << 20 or index == RESAMPLES - 1:
                    drawn = np.stack(block)
                    got, ref = self.from_per_sample(fast[drawn]), self.from_per_sample(fast_before[drawn])
                    values[index + 1 - len(block) : index + 1] = ref - got if self.higher_is_better else got - ref
                    block = []
                continue
            rows = (chosen[:, None] * unit + offsets).reshape(-1)
            sub_labels = None if labels is None else labels[chosen if self.pair else rows]
            sub_before = {k: v[rows] for k, v in before.items()}
            sub_after = {k: v[rows] for k, v in after.items()}
            got = self.score(sub_after, sub_labels, sub_before)
            if self.reference_based:
                values[index] = got
            else:
                ref = self.score(sub_before, sub_labels, sub_before)
                values[index] = ref - got if self.higher_is_better else got - ref
        values = values[np.isfinite(values)]
        if not len(values):
            return (math.nan, math.nan)
        tail = 100 * (1 - confidence) / 2
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return float(lo), float(hi)


class _TopK(Metric):
    def __init__(self, k: int, output: str | None = None) -> None:
        super().__init__(output)
        self.k = k
        self.name = f"top{k}"

    def unfit(self, array, labels):
        if array.ndim != 2 or array.shape[1] < max(2, self.k):
            return f"is not a class-score output (N, C) with C >= {max(2, self.k)} (shape {array.shape})"
        return None

    def rows(self, outputs, feeds, reference=None, labels=None):
        scores = outputs[self.output]
        top = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        return {"top": top}

    def per_sample(self, rows, labels):
        labels = np.asarray(labels)
        indices = labels.argmax(axis=1) if labels.ndim == 2 else labels.reshape(-1).astype(np.int64)
        return (rows["top"] == indices[:, None]).any(axis=1)  # a hit per sample

    def from_per_sample(self, values):
        if not values.shape[-1]:
            return math.nan
        means = values.mean(axis=-1)  # hits counted exactly, then divided: the same in any grouping
        return 100.0 * means if means.ndim else 100.0 * float(means)

    def score(self, rows, labels, reference):
        return self.from_per_sample(self.per_sample(rows, labels))

    def check_labels(self, labels, samples):
        super().check_labels(labels, samples)
        if labels.dtype.kind == "f" and labels.ndim == 1 and not np.array_equal(labels, np.round(labels)):
            raise DataError(f"metric '{self.name}': 'labels' must be class indices (or one-hot rows)")


class _MSE(Metric):
    name = "mse"
    higher_is_better = False

    def unfit(self, array, labels):
        if array.dtype.kind != "f":
            return f"is not a floating-point output (dtype {array.dtype})"
        if labels is not None and labels.size != array.size:
            return f"has {array.size // max(1, len(array))} values per sample, 'labels' {labels.size // max(1, len(labels))}"  # noqa: E501
        return None

    def rows(self, outputs, feeds, reference=None, labels=None):
        y = np.asarray(outputs[self.output], np.float64)
        y = y.reshape(len(y), -1)
        if labels is None or np.asarray(labels).size != y.size:  # checked against all labels later
            return {"y": y.astype(np.float32)}
        squared = (y - np.asarray(labels, np.float64).reshape(y.shape)) ** 2  # keep two numbers per sample
        return {"sse": squared.sum(axis=1), "count": np.full(len(y), y.shape[1], np.float64)}

    def score(self, rows, labels, reference):
        if "sse" in rows:
            return float(rows["sse"].sum() / rows["count"].sum()) if rows["count"].sum() else math.nan
        y = rows["y"].astype(np.float64)
        target = np.asarray(labels, np.float64).reshape(y.shape)
        return float(np.mean((y - target) ** 2)) if y.size else math.nan

    def check_labels(self, labels, samples):
        super().check_labels(labels, samples)
        if labels.dtype.kind not in "fiu":
            raise DataError(f"metric 'mse': 'labels' must be numeric targets (dtype {labels.dtype})")


class _PSNR(Metric):
    name = "psnr"
    needs_labels = False
    reference_based = True

    def unfit(self, array, labels):
        return None if array.dtype.kind == "f" else f"is not a floating-point output (dtype {array.dtype})"

    def rows(self, outputs, feeds, reference=None, labels=None):
        y = np.asarray(outputs[self.output], np.float64)
        flat = y.reshape(len(y), -1)
        rows = {"min": flat.min(axis=1), "max": flat.max(axis=1), "count": np.full(len(y), flat.shape[1], np.float64)}
        ref = flat if reference is None else np.asarray(reference[self.output], np.float64).reshape(flat.shape)
        rows["sse"] = np.sum((flat - ref) ** 2, axis=1)
        return rows

    def score(self, rows, labels, reference):
        peak = float(reference["max"].max() - reference["min"].min()) if len(reference["max"]) else 0.0
        mse = float(rows["sse"].sum() / rows["count"].sum()) if rows["count"].sum() else math.nan
        if mse == 0.0:
            return math.inf
        if not peak > 0.0:
            peak = 1.0  # a constant reference output: fall back to data in [0, 1]
        return 10.0 * math.log10(peak * peak / mse)


def mean_pool(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean of ``hidden`` (N, T, H) over the positions where ``mask`` (N, T) is nonzero (all positions without one)."""
    hidden = np.asarray(hidden, np.float64)
    if mask is None:
        return hidden.mean(axis=1)
    weights = (np.asarray(mask) != 0).astype(np.float64)[:, :, None]
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (``scipy.stats.rankdata(method='average')``)."""
    values = np.asarray(values)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average = ends - (counts - 1) / 2.0
    return average[inverse.reshape(-1)]


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (NaN when either is constant)."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(np.dot(rx, rx)) * float(np.dot(ry, ry)))
    return float(np.dot(rx, ry)) / denominator if denominator else math.nan


class _Spearman(Metric):
    name = "spearman"
    pair = True

    def unfit(self, array, labels):
        if array.dtype.kind != "f" or array.ndim not in (2, 3):
            return f"is not an embedding (N, hidden) or token embeddings (N, tokens, hidden) (shape {array.shape})"
        return None

    def rows(self, outputs, feeds, reference=None, labels=None):
        y = outputs[self.output]
        pooled = mean_pool(y, feeds.get(MASK_INPUT)) if y.ndim == 3 else np.asarray(y, np.float64)
        return {"embedding": pooled}

    def score(self, rows, labels, reference):
        e = rows["embedding"]
        a, b = e[0::2], e[1::2]
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)
        return 100.0 * spearman_rho(cosine, np.asarray(labels, np.float64).reshape(-1))

    def check_labels(self, labels, samples):
        super().check_labels(labels, samples)
        if labels.ndim != 1:
            raise DataError(f"metric 'spearman': 'labels' must hold one gold score per pair (shape {labels.shape})")


class _UserMetric(Metric):
    """``MODULE:FUNCTION`` or ``file.py:FUNCTION``, or a Python callable."""

    bootstrap = False

    def __init__(self, fn: Callable[..., Any], name: str, output: str | None = None) -> None:
        super().__init__(output)
        self.fn = fn
        self.name = name
        self.higher_is_better = bool(getattr(fn, "higher_is_better", True))
        self.needs_labels = False

    def bind(self, outputs, labels):
        if self.requested_output is not None and self.requested_output not in outputs:
            super().bind(outputs, labels)  # the one-line error naming the outputs
        self.output = self.requested_output

    def rows(self, outputs, feeds, reference=None, labels=None):
        rows = {f"o:{name}": np.asarray(value) for name, value in outputs.items()}
        return rows | {f"i:{name}": np.asarray(value) for name, value in feeds.items()}

    def score(self, rows, labels, reference):
        outputs = {k[2:]: v for k, v in rows.items() if k.startswith("o:")}
        inputs = {k[2:]: v for k, v in rows.items() if k.startswith("i:")}
        value = self.fn(outputs, labels, inputs)
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"returned {type(value).__name__}, not a number") from None
        if array.ndim != 0 and array.size != 1:
            raise ValueError(f"returned an array of shape {array.shape}, not a scalar")
        return float(array.reshape(()))

    def check_labels(self, labels, samples):
        if labels is not None and labels.dtype.kind in "fc" and not np.isfinite(labels).all():
            raise DataError(f"metric '{self.name}': 'labels' contains NaN or Inf values")


def resolve(spec: str | Callable[..., Any] | Metric, output: str | None = None) -> Metric:
    """The metric named by ``spec`` (a built-in name, ``MODULE:FUNCTION``, ``file.py:FUNCTION``, a callable).

    Raises:
        UsageError: an unknown name, a module or file that does not import, a missing or non-callable function.
    """
    if isinstance(spec, Metric):
        return spec
    if callable(spec):
        return _UserMetric(spec, getattr(spec, "__name__", "user metric"), output)
    text = str(spec).strip()
    if text in ("top1", "top5"):
        return _TopK(int(text[3]), output)
    builtin = {"mse": _MSE, "psnr": _PSNR, "spearman": _Spearman}
    if text in builtin:
        return builtin[text](output)
    module_name, sep, function = text.rpartition(":")
    if not sep or not module_name or not function:
        raise UsageError(
            f"--metric '{text}': unknown metric; built in: {', '.join(BUILTIN)}, or MODULE:FUNCTION / file.py:FUNCTION"
        )
    module = _import(module_name, text)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UsageError(f"--metric '{text}': {module_name} has no function '{function}'")
    return _UserMetric(fn, text, output)


def _import(module_name: str, text: str):
    path = Path(module_name)
    try:
        if module_name.endswith(".py") or path.is_file():
            if not path.is_file():
                raise UsageError(f"--metric '{text}': {module_name}: no such file")
            spec = importlib.util.spec_from_file_location(f"onnxopt_user_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        # MODULE:FUNCTION as `python -m` finds it: the current directory first
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(module_name)
        finally:
            if added:
                sys.path.remove(os.getcwd())
    except UsageError:
        raise
    except BaseException as e:  # a user module may raise anything, SystemExit included, while importing
        if isinstance(e, KeyboardInterrupt):
            raise
        raise UsageError(
            f"--metric '{text}': {module_name} does not import ({type(e).__name__}: {first_line(e)})"
        ) from e


def concatenate(batches: Sequence[Rows]) -> Rows:
    """Join per-batch rows into arrays over the whole evaluation set."""
    if not batches:
        return {}
    return {key: np.concatenate([b[key] for b in batches], axis=0) for key in batches[0]}


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    return value if math.isfinite(value) else str(value)
