"""onnxruntime sessions for ``ir.Model`` objects and model files, and latency measurement.

Sessions are always opened from a file path (a model with external data opened from bytes fails
"External data path validation failed"); an in-memory model is saved into a temporary directory that
lives as long as the session does. Comparisons and statistics use ``ORT_DISABLE_ALL`` so onnxruntime's
own fusions neither hide nor add differences; latency uses the full optimization level users get.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io

__all__ = ["Session", "Latency", "measure_latency"]


class Session:
    """An onnxruntime ``InferenceSession`` plus the temporary file it was opened from (if any)."""

    def __init__(self, source: ir.Model | str | os.PathLike, *, optimize: bool = False, threads: int = 1):
        import onnxruntime as ort

        self._tmp_dir: Path | None = None
        if isinstance(source, ir.Model):
            self._tmp_dir = Path(tempfile.mkdtemp(prefix="onnxopt-session-"))
            weakref.finalize(self, shutil.rmtree, self._tmp_dir, True)
            path = graph_io.save(source, self._tmp_dir / "model.onnx")
        else:
            path = Path(source)
        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.path = path
        self.inner = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.inner.get_inputs()]
        self.output_names = [o.name for o in self.inner.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch; returns ``{output name: array}``."""
        names = list(outputs) if outputs is not None else self.output_names
        results = self.inner.run(names, {k: feeds[k] for k in self.input_names})
        return dict(zip(names, results, strict=True))


@dataclasses.dataclass(frozen=True)
class Latency:
    """Latency of one model in microseconds over interleaved rounds."""

    median_us: float
    min_us: float
    max_us: float
    rounds: int


def measure_latency(
    models: Sequence[ir.Model | str | os.PathLike],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int = 1,
    rounds: int = 15,
    runs_per_round: int = 0,
    warmup: int = 3,
) -> list[Latency]:
    """Median latency of each model, measured in interleaved rounds so their ratios hold on a noisy machine.

    Each round runs every model ``runs_per_round`` times (chosen so one round of the first model takes
    about 20 ms when 0), in an order rotated by one each round, and records the mean; the median over rounds
    is reported, with the fastest and slowest round as its spread.
    """
    sessions = [Session(m, optimize=True, threads=threads) for m in models]
    for session in sessions:
        for _ in range(warmup):
            session.run(feeds)
    if runs_per_round <= 0:
        start = time.perf_counter()
        sessions[0].run(feeds)
        once = max(time.perf_counter() - start, 1e-6)
        runs_per_round = int(min(max(0.02 / once, 1), 200))
    samples: list[list[float]] = [[] for _ in sessions]
    for round_ in range(rounds):
        # the order rotates each round, so no model always runs right after the same one (cache, turbo state)
        for index in (np.arange(len(sessions)) + round_) % len(sessions):
            session = sessions[index]
            start = time.perf_counter()
            for _ in range(runs_per_round):
                session.run(feeds)
            samples[index].append((time.perf_counter() - start) / runs_per_round * 1e6)
    return [Latency(statistics.median(s), min(s), max(s), rounds) for s in samples]
