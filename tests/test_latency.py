"""Timing helpers (onnxopt/latency.py, onnxopt/runtime.measure_latency): the guard's early stop never changes its
verdict."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt import latency, runtime
from tests import builders


def _full_verdict(reference: list[float], candidate: list[float], margin: float) -> bool:
    ref, cand = np.asarray(reference), np.asarray(candidate)
    return latency.clearly_slower((float(np.median(cand)), float(cand.min())), float(np.median(ref)), margin)


@pytest.mark.parametrize("rounds", [15, 14, 9])
def test_an_early_stop_never_changes_the_guards_verdict(rounds):
    """Whenever the test says settled after k rounds, the full timing is not clearly slower, even when every round
    still to come is the worst case: the input as fast as can be, the candidate as slow."""
    rng = np.random.default_rng(rounds)
    margin, stopped = 0.05, 0
    for trial in range(3000):
        speed = rng.uniform(0.8, 1.25)  # the candidate against the input
        noise = rng.uniform(0.01, 0.3)
        reference = list(100 * (1 + noise * rng.standard_normal(rounds)).clip(0.2))
        candidate = list(100 * speed * (1 + noise * rng.standard_normal(rounds)).clip(0.2))
        settled = latency.not_slower_whatever_follows(rounds, margin)
        for seen in range(1, rounds):
            if settled([reference[:seen], candidate[:seen]]):
                stopped += 1
                worst_ref = reference[:seen] + [1e-3] * (rounds - seen)
                worst_cand = candidate[:seen] + [1e9] * (rounds - seen)
                assert not _full_verdict(worst_ref, worst_cand, margin), (trial, seen)
                assert not _full_verdict(reference, candidate, margin), (trial, seen)
                assert not latency.clearly_slower(
                    (float(np.median(candidate[:seen])), min(candidate[:seen])),
                    float(np.median(reference[:seen])), margin)  # fmt: skip
                break
    assert stopped > 300  # it does stop early in a good share of the cases


def test_a_clearly_faster_candidate_settles_after_about_half_the_rounds_and_a_slower_one_never():
    settled = latency.not_slower_whatever_follows(15, 0.05)
    fast = [[100.0 + i for i in range(15)], [60.0 + i for i in range(15)]]
    first = next(k for k in range(1, 15) if settled([fast[0][:k], fast[1][:k]]))
    assert first == 8
    slow = [[100.0 + i for i in range(15)], [130.0 + i for i in range(15)]]
    assert not any(settled([slow[0][:k], slow[1][:k]]) for k in range(1, 15))


def test_measure_latency_stops_when_settled(tmp_path):
    path = builders.save(builders.mlp(), tmp_path / "m.onnx")
    feeds = {"x": np.zeros((4, 8), np.float32)}
    calls = []

    def settled(samples):
        calls.append([len(s) for s in samples])
        return len(samples[0]) >= 4

    timed = runtime.measure_latency([path, path], feeds, rounds=15, warmup=1, runs_per_round=1, settled=settled)
    assert [t.rounds for t in timed] == [4, 4]
    assert calls == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert [t.rounds for t in runtime.measure_latency([path], feeds, rounds=5, warmup=1, runs_per_round=1)] == [5]
