"""Validation metrics and verdicts against onnxruntime on the unmodified model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import data, graph
from onnxopt.validate import Budget, validate
from tests import builders


@pytest.fixture()
def mlp_file(tmp_path):
    return builders.save(builders.mlp(sizes=(8, 16, 4), seed=0), tmp_path / "mlp.onnx")


def _perturbed(path, scale):
    model = graph.load(path)
    w = model.graph.initializers["w2"]
    array = w.const_value.numpy().copy()
    array[0] += scale
    w.const_value = ir.tensor(array, name="w2")
    return model


def _source(model, n=40, seed=1, labels=None):
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    arrays = {"x": x} if labels is None else {"x": x, "labels": labels}
    return data.as_source(arrays, model, batch_size=16)


def test_identical_model_passes_exact_budget(mlp_file):
    model = graph.load(mlp_file)
    report = validate(mlp_file, model, _source(model), Budget.exact())
    assert report.ok and report.samples == 40 and report.checker_error is None
    diff = report.outputs["y"]
    assert diff.max_abs == 0 and diff.rel_l2 == 0 and diff.cosine == pytest.approx(1.0)
    assert diff.top1_agreement == 1.0


def test_perturbed_model_fails_and_metrics_match_numpy(mlp_file):
    model = graph.load(mlp_file)
    source = _source(model)
    candidate = _perturbed(mlp_file, 0.5)
    report = validate(mlp_file, candidate, source, Budget(min_cosine=0.999999, max_abs=1e-5))
    assert not report.ok
    assert any("cosine" in f for f in report.failures) and any("max abs" in f for f in report.failures)
    x = np.concatenate([b.feeds["x"] for b in source])
    ref = builders.run(onnx.load(mlp_file), {"x": x})["y"].astype(np.float64)
    got = builders.run(ir.to_proto(candidate), {"x": x})["y"].astype(np.float64)
    diff = report.outputs["y"]
    assert diff.max_abs == pytest.approx(np.abs(got - ref).max(), rel=1e-6)
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert diff.rel_l2 == pytest.approx(rel.max(), rel=1e-6)
    assert diff.cosine == pytest.approx(cos.min(), rel=1e-6)
    assert diff.top1_agreement == pytest.approx((ref.argmax(1) == got.argmax(1)).mean())


def test_accuracy_budget_uses_labels(mlp_file):
    model = graph.load(mlp_file)
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    labels = builders.run(onnx.load(mlp_file), {"x": x})["y"].argmax(1)  # the original is 100% right
    source = data.as_source({"x": x, "labels": labels}, model, batch_size=16)
    report = validate(mlp_file, _perturbed(mlp_file, 5.0), source, Budget(max_accuracy_drop=0.5))
    assert report.accuracy["before"] == 100.0
    assert report.accuracy["after"] < 100.0
    assert not report.ok and "accuracy" in report.failures[0]
    same = validate(mlp_file, model, source, Budget(max_accuracy_drop=0.0))
    assert same.ok and same.accuracy == {"before": 100.0, "after": 100.0}


def test_stale_shapes_fail_the_checker(mlp_file):
    """onnxruntime only warns about a stale shape; the full checker rejects it and so must validation."""
    model = graph.load(mlp_file)
    h1 = next(v for n in model.graph for v in n.outputs if v.name == "h1")
    h1.dtype = ir.DataType.FLOAT
    h1.shape = ir.Shape(["N", 15])  # the real width is 16
    report = validate(mlp_file, model, _source(model), Budget.exact())
    assert not report.ok and report.checker_error


def test_missing_output_is_a_failure(mlp_file):
    model = graph.load(mlp_file)
    model.graph.outputs[0] = next(v for n in model.graph for v in n.outputs if v.name == "h1")
    report = validate(mlp_file, model, _source(model), Budget.exact())
    assert not report.ok and "missing" in report.failures[0]


def test_default_budgets():
    assert Budget.default(exact=True, has_labels=True) == Budget(max_abs=1e-5)
    assert Budget.default(exact=False, has_labels=True) == Budget(max_accuracy_drop=0.5)
    assert Budget.default(exact=False, has_labels=False) == Budget(min_cosine=0.999)


def test_regression_targets_give_task_mse_and_its_budget(mlp_file):
    model = graph.load(mlp_file)
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    y = builders.run(onnx.load(mlp_file), {"x": x})["y"]
    target = (y + np.random.default_rng(2).standard_normal(y.shape) * 0.1).astype(np.float32)
    source = data.as_source({"x": x, "labels": target}, model, batch_size=16)
    same = validate(mlp_file, model, source, Budget(max_mse_increase=0.0))
    expected = float(np.mean((y.astype(np.float64) - target) ** 2))
    assert same.ok and same.accuracy is None
    assert same.task_mse["before"] == pytest.approx(expected, rel=1e-6) == same.task_mse["after"]
    worse = validate(mlp_file, _perturbed(mlp_file, 0.5), source, Budget(max_mse_increase=0.01))
    assert not worse.ok and "task MSE" in worse.failures[0]
    assert worse.task_mse["after"] > 1.01 * worse.task_mse["before"]
