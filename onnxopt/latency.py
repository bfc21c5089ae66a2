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
  are within the noise of a shared CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir

__all__ = ["run_feeds", "recorded", "faster", "compare"]

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


def compare(
    paths: Sequence[str | os.PathLike],
    feeds: Mapping[str, np.ndarray],
    *,
    rounds: int = 15,
    remeasure: bool = False,
    purpose: str = "",
) -> tuple[list[tuple[float, float, float]], bool]:
    """Median, fastest and slowest round (microseconds) of each model at ``paths``, timed together on ``feeds``
    (1 thread, interleaved ``rounds``) or taken from the record (:func:`recorded`; ``purpose`` is part of its key).
    Returns the figures in the order of ``paths`` and whether they come from the record."""
    from onnxopt import runtime

    def measure() -> list[list[float]]:
        measured = runtime.measure_latency(paths, feeds, rounds=rounds, threads=1)
        return [[m.median_us, m.min_us, m.max_us] for m in measured]

    def complete(value) -> bool:
        return isinstance(value, list) and len(value) == len(paths) and all(len(v) == 3 for v in value)

    value, reused = recorded(
        paths, feeds, measure, remeasure=remeasure, valid=complete, rounds=rounds, threads=1, purpose=purpose
    )
    return [(float(a), float(b), float(c)) for a, b, c in value], reused
