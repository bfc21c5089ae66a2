"""`onnxopt bench`: size, parameters, MACs, onnxruntime latency and accuracy of one or more models, side by side.

Latency: onnxruntime with full optimizations, for each intra-op thread count asked, after a warm-up; models that
take the same inputs are measured in interleaved rounds (median and spread over rounds), so their ratios hold on
a noisy machine. Inputs come from ``data`` (its first batch) or seeded random data of the model's shape.
Accuracy with labelled data; agreement (top-1, or cosine for other outputs) of every model with the first.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt import cost
from onnxopt import data as data_mod
from onnxopt import graph as graph_io
from onnxopt.runtime import Session, measure_latency

__all__ = ["ModelBench", "bench_models"]


@dataclasses.dataclass
class ModelBench:
    path: str
    bytes: int
    params: int
    macs: int
    latency_us: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    accuracy: float | None = None
    agreement: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bench_models(
    paths: Sequence[str | os.PathLike],
    *,
    data: str | os.PathLike | None = None,
    threads: Sequence[int] = (1, 2),
    rounds: int = 15,
    input_shapes: dict[str, list[int]] | None = None,
) -> list[ModelBench]:
    models = [graph_io.load(p) for p in paths]
    results = [
        ModelBench(str(p), Path(p).stat().st_size, c.params, c.macs)
        for p, c in ((p, cost.estimate(m, input_shapes=input_shapes)) for p, m in zip(paths, models, strict=True))
    ]
    source = (
        data_mod.as_source(data, models[0], what="data")
        if data
        else data_mod.random_source(models[0], seed=0, shapes=input_shapes)
    )
    feeds = next(iter(source)).feeds
    signature = [_signature(m) for m in models]
    for count in threads:
        groups: dict[tuple, list[int]] = {}
        for index, sig in enumerate(signature):
            groups.setdefault(sig, []).append(index)
        for indices in groups.values():
            group_feeds = feeds if signature[indices[0]] == signature[0] else _random_feeds(models[indices[0]])
            stats = measure_latency([paths[i] for i in indices], group_feeds, threads=count, rounds=rounds)
            for i, latency in zip(indices, stats, strict=True):
                results[i].latency_us[count] = {
                    "median": round(latency.median_us, 2), "min": round(latency.min_us, 2),
                    "max": round(latency.max_us, 2),
                }  # fmt: skip
    if data:
        _quality(paths, source, results)
    return results


def _signature(model) -> tuple:
    return tuple((s.name, str(s.dtype), s.shape) for s in data_mod.input_specs(model))


def _random_feeds(model) -> dict[str, np.ndarray]:
    return next(iter(data_mod.random_source(model, seed=0))).feeds


def _quality(paths, source, results) -> None:
    sessions = [Session(p) for p in paths]
    correct = [0] * len(paths)
    agree = [0.0] * len(paths)
    labelled = samples = 0
    for batch in source:
        outputs = [s.run(batch.feeds)[s.output_names[0]] for s in sessions]
        for i, out in enumerate(outputs):
            if out.ndim == 2 and out.shape[1] > 1:
                agree[i] += float((out.argmax(1) == outputs[0].argmax(1)).sum())
                if batch.labels is not None and batch.labels.dtype.kind in "iu":
                    correct[i] += int((out.argmax(1) == batch.labels.reshape(-1)).sum())
            else:
                a, b = out.reshape(len(out), -1), outputs[0].reshape(len(out), -1)
                cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
                agree[i] += float(cos.sum())
        samples += batch.size
        labelled += batch.size if batch.labels is not None and batch.labels.dtype.kind in "iu" else 0
    for i, result in enumerate(results):
        result.agreement = agree[i] / samples if samples else None
        result.accuracy = 100.0 * correct[i] / labelled if labelled else None
