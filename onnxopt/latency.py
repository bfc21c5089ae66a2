"""Deterministic latency comparisons for passes that choose by speed (``quant``'s recipes, ``prune``'s guard).

A pass that keeps or drops a candidate by its speed times it the same way every time:

- on the first batch of the run's data (evaluation data first, else calibration data, else seeded random inputs),
  so latency is measured at the batch and input size the user runs (:func:`run_feeds`);
- in onnxruntime with full optimizations and 1 thread, every model warmed up, then in interleaved rounds whose
  order rotates, the median per model (:func:`onnxopt.runtime.measure_latency`);
- through the record of :mod:`onnxopt.latency_cache`, keyed by the models' bytes, the feeds' shapes and the timing
  settings, so the same command on the same CPU reuses the first run's figures and makes the same choice
  (:func:`recorded`);
- and one model counts as faster than another only by a margin (:func:`faster`): two models a few percent apart
  are within the noise of a shared CPU;
- a model whose batch is dynamic is also timed on one sample (:func:`single_sample`) when the data's batch is larger:
  a device usually runs one input at a time, and int8 that wins at batch 16 can lose there (a small MNIST CNN:
  0.90x float at batch 16, 1.13x at batch 1). A candidate :func:`clearly_slower` than its reference there is out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir

__all__ = ["run_feeds", "single_sample", "recorded", "faster", "clearly_slower", "compare", "slower"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def run_feeds(context, model: ir.Model | str | os.PathLike) -> dict[str, np.ndarray]:
    """The first batch of the run's data in ``context`` (a :class:`~onnxopt.pass_base.PassContext` or ``None``):
    its evaluation data, else its calibration data, else seeded random inputs for ``model`` (a model or a path)."""
    source = None
    if context is not None:
        source = context.eval_data or context.data
    if source is None:
        from onnxopt import data as data_mod
        from onnxopt import graph as graph_io

        model = model if isinstance(model, ir.Model) else graph_io.load(model)
        source = data_mod.random_source(model)
    return dict(next(iter(source)).feeds)


def single_sample(feeds: Mapping[str, np.ndarray], model: ir.Model | str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The first sample of ``feeds`` as a batch of one, or ``None`` when the batch already is one or ``model`` (a
    model or a path) fixes its inputs' first dimension."""
    if not feeds or all(np.ndim(a) == 0 or len(a) <= 1 for a in feeds.values()):
        return None
    if isinstance(model, ir.Model):
        inputs = {v.name: v.shape for v in model.graph.inputs}
    else:
        import onnx

        proto = onnx.load(str(model), load_external_data=False)
        inputs = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in proto.graph.input
        }
    for name, array in feeds.items():
        shape = inputs.get(name)
        if np.ndim(array) == 0 or shape is None or len(shape) == 0 or isinstance(shape[0], int):
            return None
    return {name: np.ascontiguousarray(array[:1]) for name, array in feeds.items()}


def recorded(
    paths: Sequence[str | os.PathLike],
    feeds: Mapping[str, np.ndarray],
    measure: Callable[[], T],
    *,
    remeasure: bool = False,
    valid: Callable[[Any], bool] = lambda value: value is not None,
    **settings: Any,
) -> tuple[T, bool]:
    """``measure()``'s result for the models at ``paths`` timed on ``feeds``, or the one an earlier run recorded.

    The record is keyed by the models' bytes, the feeds' shapes and dtypes, ``settings`` (the timing settings and
    what the figures are for), the CPU and onnxruntime's version. A recorded value that ``valid`` rejects, or any
    value with ``remeasure``, is measured again and the record replaced. Returns ``(value, reused)``.
    """
    from onnxopt import latency_cache

    digest = latency_cache.key(paths, feeds, **settings)
    value = None if remeasure else latency_cache.lookup(digest)
    if value is not None and valid(value):
        return value, True
    value = measure()
    latency_cache.store(digest, value)
    return value, False


def faster(candidate_us: float, reference_us: float, margin: float) -> bool:
    """Whether ``candidate_us`` beats ``reference_us`` by at least the relative ``margin`` (0.05: 5% faster)."""
    return candidate_us <= reference_us * (1 - margin)


def clearly_slower(candidate: Sequence[float], reference_us: float, margin: float) -> bool:
    """Whether a candidate timed as (median, fastest round, ...) is clearly slower than a reference's median: its
    median slower by more than ``margin``, and even its fastest round slower (on a model that runs in microseconds a
    loaded CPU moves medians by 15%, never that)."""
    return faster(reference_us, candidate[0], margin) and candidate[1] > reference_us


def compare(
    paths: Sequence[str | os.PathLike],
    feeds: Mapping[str, np.ndarray],
    *,
    rounds: int = 15,
    remeasure: bool = False,
    purpose: str = "",
    settled: Callable[[list[list[float]]], bool] | None = None,
) -> tuple[list[tuple[float, float, float]], bool]:
    """Median, fastest and slowest round (microseconds) of each model at ``paths``, timed together on ``feeds``
    (1 thread, interleaved ``rounds``, fewer when ``settled`` says the question is decided) or taken from the
    record (:func:`recorded`; ``purpose`` is part of its key). Returns the figures in the order of ``paths`` and
    whether they come from the record."""
    from onnxopt import runtime

    def measure() -> list[list[float]]:
        measured = runtime.measure_latency(paths, feeds, rounds=rounds, threads=1, settled=settled)
        return [[m.median_us, m.min_us, m.max_us] for m in measured]

    def complete(value) -> bool:
        return isinstance(value, list) and len(value) == len(paths) and all(len(v) == 3 for v in value)

    value, reused = recorded(
        paths, feeds, measure, remeasure=remeasure, valid=complete, rounds=rounds, threads=1, purpose=purpose
    )
    return [(float(a), float(b), float(c)) for a, b, c in value], reused


def not_slower_whatever_follows(rounds: int, margin: float) -> Callable[[list[list[float]]], bool]:
    """For timing (input, candidate) in ``rounds`` rounds: a test, after each round, of whether
    :func:`clearly_slower` on all ``rounds`` must say no, whatever the rounds still to come measure.

    With ``k`` of ``n`` rounds seen, the input's final median is at least its ``(m - (n - k))``-th fastest round so
    far (``m = (n + 1) // 2``, the lower middle round: the remaining rounds could all be faster than every one
    seen), the candidate's fastest round can only get faster, and its final median is at most its ``n // 2 + 1``-th
    fastest so far (the upper middle round). So the verdict
    is settled once the candidate's fastest round is no slower than that bound of the input's median (the second
    condition of :func:`clearly_slower` fails), or its median bound is within the margin of the input's (the first
    fails). A clearly faster candidate settles after about half the rounds; a slower one is always timed in full.
    The figures then come from fewer rounds, and give the same verdict again when read from the latency record."""
    lower, upper = (rounds + 1) // 2, rounds // 2 + 1  # the median's rounds (1-based), one round when n is odd

    def settled(samples: list[list[float]]) -> bool:
        reference, candidate = sorted(samples[0]), sorted(samples[1])
        seen = min(len(reference), len(candidate))
        rank = lower - (rounds - seen)  # 1-based rank of the input's median's lower bound among the rounds seen
        if rank < 1:
            return False
        floor = reference[rank - 1]
        return candidate[0] <= floor or (seen >= upper and not faster(floor, candidate[upper - 1], margin))

    return settled


def slower(
    context, model: ir.Model, candidate: ir.Model, *, margin: float, rounds: int, purpose: str, label: str
) -> tuple[str | None, dict]:
    """Time ``candidate`` (a pass's result) against its input ``model``, on the run's data (:func:`run_feeds`) and on
    one sample (:func:`single_sample`): why to keep the input (or ``None``: not clearly slower), and the figures for
    the report (both medians and round ranges in microseconds, the ratio, the feeds' shapes, whether the figures come
    from the latency record; ``{label}_us`` names the candidate's). ``purpose`` keys the record."""
    import tempfile
    from pathlib import Path

    from onnxopt import graph as graph_io

    with tempfile.TemporaryDirectory(prefix="onnxopt-guard-") as tmp:
        source = getattr(context, "original", None)  # both timed as the run writes them
        paths = [graph_io.save_as_written(m, Path(tmp) / f"{n}.onnx", source)
                 for m, n in ((model, "input"), (candidate, label))]  # fmt: skip
        feeds = run_feeds(context, paths[0])
        settled = not_slower_whatever_follows(rounds, margin)
        (before, after), reused = compare(paths, feeds, rounds=rounds, purpose=purpose, settled=settled)
        one = single_sample(feeds, model)  # the input's shapes, from the model in hand
        if one is not None:  # a device runs one input at a time: not slower there either
            (one_before, one_after), _ = compare(paths, one, rounds=rounds, purpose=purpose, settled=settled)
    ratio = after[0] / before[0] if before[0] > 0 else 1.0
    figures = {
        "input_us": round(before[0], 1),
        f"{label}_us": round(after[0], 1),
        "input_rounds_us": [round(before[1], 1), round(before[2], 1)],  # the fastest and the slowest round
        f"{label}_rounds_us": [round(after[1], 1), round(after[2], 1)],
        "ratio": round(ratio, 4),
        "feeds": {name: list(array.shape) for name, array in feeds.items()},
        "recorded": reused,
    }
    if one is not None:
        one_ratio = one_after[0] / one_before[0] if one_before[0] > 0 else 1.0
        figures["one_sample"] = {"input_us": round(one_before[0], 1), f"{label}_us": round(one_after[0], 1),
                                 "ratio": round(one_ratio, 4)}  # fmt: skip
    logger.info("%s: %s %.0f us, input %.0f us (%.3fx)%s", purpose, label, after[0], before[0], ratio,
                " (from the latency record)" if reused else "")  # fmt: skip
    if clearly_slower(after, before[0], margin):
        why = (
            f"the {label} model is slower than its input: median {after[0]:.0f} us against {before[0]:.0f} us "
            f"({ratio:.2f}x; its rounds {after[1]:.0f}-{after[2]:.0f} us, the input's "
            f"{before[1]:.0f}-{before[2]:.0f} us)"
        )
        return why, figures
    if one is not None and clearly_slower(one_after, one_before[0], margin):
        why = (
            f"the {label} model is slower than its input on one sample: median {one_after[0]:.0f} us against "
            f"{one_before[0]:.0f} us ({one_ratio:.2f}x; at the data's batch {ratio:.2f}x)"
        )
        return why, figures
    return None, figures
