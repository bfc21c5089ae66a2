"""The latency record (onnxopt/latency_cache.py): keyed by what a measurement depends on, written atomically,
ignored when unreadable; and quant reuses it, or times again with --quant-remeasure."""

from __future__ import annotations

import numpy as np

from onnxopt import latency_cache, registry
from onnxopt import runtime as runtime_mod
from onnxopt.manager import PassManager
from onnxopt.validate import Budget
from tests import builders


def test_key_depends_on_model_bytes_shapes_and_settings(tmp_path):
    a = builders.save(builders.mlp(seed=0), tmp_path / "a.onnx")
    b = builders.save(builders.mlp(seed=1), tmp_path / "b.onnx")
    feeds = {"x": np.zeros((4, 8), np.float32)}
    base = latency_cache.key([a], feeds, rounds=15)
    assert base == latency_cache.key([a], {"x": np.ones((4, 8), np.float32)}, rounds=15)  # values do not matter
    assert base != latency_cache.key([b], feeds, rounds=15)
    assert base != latency_cache.key([a], {"x": np.zeros((8, 8), np.float32)}, rounds=15)
    assert base != latency_cache.key([a], feeds, rounds=5)
    assert base != latency_cache.key([a, b], feeds, rounds=15)


def test_store_and_lookup_round_trip_and_a_broken_record_is_ignored():
    assert latency_cache.lookup("k") is None
    latency_cache.store("k", {"float_us": 1.5, "outcomes": [[1.0, 1.5, [0.9, 1.1], ""]]})
    assert latency_cache.lookup("k") == {"float_us": 1.5, "outcomes": [[1.0, 1.5, [0.9, 1.1], ""]]}
    latency_cache.cache_file().write_text("{not json")
    assert latency_cache.lookup("k") is None
    latency_cache.store("j", 2)
    assert latency_cache.lookup("j") == 2


def _quant_run(path, calib, held, calls, **options):
    report = PassManager(
        [registry.make_pass("quant", mode="static", **options)],
        data=calib,
        eval_data=held,
        budget=Budget(min_cosine=0.9),
    ).run(path)
    return next(r for r in report.passes if r.name == "quant"), calls


def test_quant_reuses_the_recorded_timing_and_remeasure_times_again(tmp_path, monkeypatch):
    """The first run times (the stub is called), the second reuses the record (not called) and decides the same,
    --quant-remeasure calls the timer again."""
    path = builders.save(builders.mlp(sizes=(32, 64, 10), seed=0), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((64, 32)).astype(np.float32)}
    held = {"x": rng.standard_normal((64, 32)).astype(np.float32)}
    calls = []

    def fake(models, feeds, **kw):
        calls.append(len(models))
        # float first, then each candidate: every int8 recipe 30% faster
        return [runtime_mod.Latency(100.0 if i == 0 else 70.0, 60.0, 110.0, kw.get("rounds", 15))
                for i in range(len(models))]  # fmt: skip

    monkeypatch.setattr(runtime_mod, "measure_latency", fake)
    first, _ = _quant_run(path, calib, held, calls)
    timed = len(calls)
    assert timed >= 1
    second, _ = _quant_run(path, calib, held, calls)
    assert len(calls) == timed  # reused
    assert [c.what for c in first.changes] == [c.what for c in second.changes]
    _quant_run(path, calib, held, calls, remeasure=True)
    assert len(calls) > timed
