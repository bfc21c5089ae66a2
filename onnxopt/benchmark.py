"""`onnxopt bench`: size, parameters, MACs, onnxruntime latency and accuracy of one or more models, side by side.

Latency: onnxruntime with full optimizations, for each intra-op thread count asked, after a warm-up; models that
take the same inputs are measured in interleaved rounds (median and spread over rounds), so their ratios hold on
a noisy machine. Inputs come from ``data`` (its first batch, at the data's own shapes) or seeded random data
of ``input_shapes``; MACs are counted per sample at the same shapes.
Accuracy with labelled data; agreement (top-1, or cosine for other outputs) of every model with the first.
With ``profile_runs``, each model is also profiled on its latency inputs (:mod:`onnxopt.profile`: where the time
goes, by kind of kernel).
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
from onnxopt.profile import Profile, profile
from onnxopt.runtime import Session, latency_feeds, measure_latency

__all__ = ["ModelBench", "bench_models"]


@dataclasses.dataclass
class ModelBench:
    """One model's figures. MACs are per sample at ``input_shapes`` (the data's first batch with a dynamic
    batch axis 1, else the given shapes); latency is timed on inputs of ``latency_inputs``."""

    path: str
    bytes: int
    params: int
    macs: int
    latency_us: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    accuracy: float | None = None
    agreement: float | None = None
    macs_partial: bool = False
    uncounted: list[dict[str, str]] = dataclasses.field(default_factory=list)
    input_shapes: dict[str, list[int | None] | None] = dataclasses.field(default_factory=dict)
    latency_inputs: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    profile: Profile | None = None

    def to_json(self) -> dict[str, Any]:
        result = dataclasses.asdict(dataclasses.replace(self, profile=None))
        result["profile"] = None if self.profile is None else self.profile.to_json()
        return result


def bench_models(
    paths: Sequence[str | os.PathLike],
    *,
    data: str | os.PathLike | None = None,
    threads: Sequence[int] = (1, 2),
    rounds: int = 15,
    input_shapes: dict[str, list[int]] | None = None,
    profile_runs: int | None = None,
) -> list[ModelBench]:
    """Size, parameters, MACs, latency (and with labelled data, accuracy) of each model in ``paths``.

    Latency is timed on the first batch of ``data`` as it is (its batch size and, for dynamic dims, its
    sequence length or image size), else on seeded random inputs of ``input_shapes``; MACs are counted
    per sample at the same shapes. A model whose inputs do not take those feeds gets its own random ones.
    """
    models = [graph_io.load(p) for p in paths]
    timing = latency_feeds(models[0], data, input_shapes=input_shapes)
    feeds = timing.feeds
    fits = [_fits(m, feeds) for m in models]
    results = []
    for path, model, fit in zip(paths, models, fits, strict=True):
        shapes = cost.shapes_from_feeds(model, feeds) if data and fit else input_shapes
        counted = cost.estimate(model, input_shapes=shapes)
        results.append(
            ModelBench(
                str(path), Path(path).stat().st_size, counted.params, counted.macs,
                macs_partial=counted.macs_partial, uncounted=[dataclasses.asdict(u) for u in counted.uncounted],
                input_shapes={k: None if v is None else list(v) for k, v in counted.input_shapes.items()},
            )
        )  # fmt: skip
    own = {i: feeds if fit else _random_feeds(models[i], input_shapes) for i, fit in enumerate(fits)}
    for index, result in enumerate(results):
        result.latency_inputs = {name: list(np.shape(a)) for name, a in own[index].items()}
    for count in threads:
        groups: dict[tuple, list[int]] = {}
        for index, fit in enumerate(fits):
            groups.setdefault(("data",) if fit else ("own", index), []).append(index)
        for indices in groups.values():
            stats = measure_latency([paths[i] for i in indices], own[indices[0]], threads=count, rounds=rounds)
            for i, latency in zip(indices, stats, strict=True):
                results[i].latency_us[count] = {
                    "median": round(latency.median_us, 2), "min": round(latency.min_us, 2),
                    "max": round(latency.max_us, 2),
                }  # fmt: skip
    if profile_runs:
        for index, result in enumerate(results):
            result.profile = profile(paths[index], own[index], runs=profile_runs, threads=threads[0])
    if data:
        source = data_mod.as_source(data, models[0], what="data")
        _quality(paths, source, results)
    return results


def _fits(model, feeds: dict[str, np.ndarray]) -> bool:
    """Whether ``model`` takes ``feeds``: the same input names, dtypes, ranks and fixed dims."""
    specs = data_mod.input_specs(model)
    if {s.name for s in specs} != set(feeds):
        return False
    for spec in specs:
        array = feeds[spec.name]
        if array.dtype != spec.dtype:
            return False
        if spec.shape is not None and (
            array.ndim != len(spec.shape)
            or any(d is not None and d != a for d, a in zip(spec.shape, array.shape, strict=True))
        ):
            return False
    return True


def _random_feeds(model, shapes) -> dict[str, np.ndarray]:
    return latency_feeds(model, None, input_shapes=shapes).feeds


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
