"""Validation metrics and verdicts against onnxruntime on the unmodified model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxopt import cli, data, graph
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


# --- issue 18: validation that means what it says ---------------------------------------------------------------


def _unary_model(ops, dtype=TensorProto.FLOAT, out_dtype=TensorProto.FLOAT, axis_op=False):
    """x (N, 5) -> ops in a chain -> y (ArgMax/ArgMin keep no dims: y is (N,) int64)."""
    nodes, name = [], "x"
    for i, op in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"t{i}"
        attrs = {"axis": 1, "keepdims": 0} if op in ("ArgMax", "ArgMin") else {}
        nodes.append(helper.make_node(op, [name], [out], **attrs))
        name = out
    shape = ["N"] if ops[-1] in ("ArgMax", "ArgMin") else ["N", 5]
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", dtype, ["N", 5])],
        [helper.make_tensor_value_info("y", out_dtype, shape)],
        [],
    )


def test_integer_outputs_are_compared_exactly(tmp_path, capsys):
    argmax = builders.save(_unary_model(["Relu", "ArgMax"], out_dtype=TensorProto.INT64), tmp_path / "argmax.onnx")
    argmin = builders.save(_unary_model(["Relu", "ArgMin"], out_dtype=TensorProto.INT64), tmp_path / "argmin.onnx")
    x = np.random.default_rng(0).standard_normal((50, 5)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    expected = np.mean(x.clip(0).argmax(1) != x.clip(0).argmin(1))
    source = data.as_source({"x": x}, graph.load(argmax))
    report = validate(argmax, argmin, source, Budget(min_cosine=0.0))  # cosine alone would let it through
    assert not report.ok and "integer values differ" in report.failures[0]
    assert report.outputs["y"].mismatch == pytest.approx(expected)
    assert validate(argmax, argmax, source, Budget()).ok
    assert validate(argmax, argmin, source, Budget(max_mismatch=1.0)).ok  # allowed explicitly
    assert cli.main(["validate", argmax, argmin, "--data", str(tmp_path / "d.npz")]) == 1
    out = capsys.readouterr().out
    assert f"{100 * expected:.3g}% of values differ" in out


def test_nonfinite_outputs_must_match_position_for_position(tmp_path):
    log = builders.save(_unary_model(["Log"]), tmp_path / "log.onnx")
    log_abs = builders.save(_unary_model(["Abs", "Log"]), tmp_path / "log_abs.onnx")
    x = np.random.default_rng(0).standard_normal((20, 5)).astype(np.float32)
    x[:, 0] = 0.0  # Log(0) = -inf in both models; Log of a negative number is NaN in the first only
    source = data.as_source({"x": x}, graph.load(log))
    same = validate(log, log, source, Budget.exact())
    assert same.ok, same.failures  # a model validated against itself passes although its output holds -inf
    assert same.outputs["y"].nonfinite == int(np.sum(x <= 0)) and same.outputs["y"].cosine == pytest.approx(1.0)
    differ = validate(log, log_abs, source, Budget(min_cosine=-1.0))
    assert not differ.ok and differ.outputs["y"].nonfinite_mismatch == int(np.sum(x < 0))
    assert "NaN/Inf differ" in differ.failures[0]


def _cli_files(tmp_path, n):
    model = builders.save(builders.mlp(sizes=(8, 32, 4), seed=0), tmp_path / "mlp.onnx")
    x = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    return model, tmp_path / "d.npz"


def test_data_without_eval_is_split_for_lossy_passes(tmp_path, capsys):
    model, npz = _cli_files(tmp_path, 120)
    base = ["run", model, "--data", str(npz), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")]
    assert cli.main(base + ["--passes", "prune", "--prune-ratio", "0.25", "--min-cosine", "0.5"]) == 0
    validation = json.loads((tmp_path / "r.json").read_text())["validation"]
    assert validation["samples"] == 36 and "the last 36 of 120 samples of d.npz, held out" in validation["data"]
    assert "held out" in capsys.readouterr().out
    assert cli.main(base + ["--passes", "simplify"]) == 0  # exact passes learn nothing from the data: all of it
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["samples"] == 120


def test_too_few_evaluation_samples_for_a_lossy_pass(tmp_path, capsys):
    model, npz = _cli_files(tmp_path, 40)  # 12 held out
    argv = ["run", model, "--data", str(npz), "--passes", "prune", "--prune-ratio", "0.25", "--min-cosine", "0.5",
            "-o", str(tmp_path / "o.onnx")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "12 evaluation samples are too few" in err[0] and "--allow-small-eval" in err[0]
    assert not (tmp_path / "o.onnx").exists()
    assert cli.main(argv + ["--allow-small-eval"]) == 0


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"x": np.zeros((4, 8), np.float32), "labels": np.array([0.0, np.nan, 1, 2])}, "'labels' contains NaN"),
        ({"x": np.zeros((0, 8), np.float32)}, "holds no samples"),
    ],
)
def test_nan_labels_and_empty_eval_are_refused_up_front(tmp_path, capsys, arrays, fragment):
    model, npz = _cli_files(tmp_path, 40)
    np.savez(tmp_path / "bad.npz", **arrays)
    argv = ["run", model, "--data", str(npz), "--eval", str(tmp_path / "bad.npz"), "--passes", "prune",
            "-o", str(tmp_path / "o.onnx")]  # fmt: skip
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and fragment in err and "pass prune" not in out
    assert cli.main(["validate", model, model, "--data", str(tmp_path / "bad.npz")]) == 2
