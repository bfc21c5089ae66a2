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


def test_spent_is_the_largest_used_fraction_of_the_budget(mlp_file):
    """budget.spent: how much of a budget a validated model uses, from the report's own figures; 0 where nothing is
    lost, above 1 where a bound breaks, None where a bound was not measured."""
    from onnxopt.budget import judge, spent

    model = graph.load(mlp_file)
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    labels = builders.run(onnx.load(mlp_file), {"x": x})["y"].argmax(1)
    source = data.as_source({"x": x, "labels": labels}, model, batch_size=16)
    small = validate(mlp_file, _perturbed(mlp_file, 0.05), source, Budget(min_cosine=0.9))
    loss = 1 - small.outputs["y"].cosine
    assert 0 < loss < 0.1
    assert spent(small, Budget(min_cosine=0.9)) == pytest.approx(loss / 0.1)
    assert spent(small, Budget(min_cosine=1 - loss / 2)) == pytest.approx(2.0)  # broken: above 1
    assert judge(small, Budget(min_cosine=1 - loss / 2))  # and judge says so
    both = Budget(min_cosine=0.9, max_rel_l2=small.outputs["y"].rel_l2 * 4)
    assert spent(small, both) == pytest.approx(max(loss / 0.1, 0.25))
    big = validate(mlp_file, _perturbed(mlp_file, 5.0), source, Budget(max_accuracy_drop=50))
    drop = big.accuracy["before"] - big.accuracy["after"]
    assert drop > 0 and spent(big, Budget(max_accuracy_drop=50)) == pytest.approx(drop / 50)
    same = validate(mlp_file, model, source, Budget(max_accuracy_drop=0.5))
    assert spent(same, Budget(max_accuracy_drop=0.5)) == 0.0
    assert spent(same, Budget(max_mse_increase=0.1)) is None  # no regression targets: not measured
    assert spent(same, Budget()) is None  # nothing bounded


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


# --- early stop (onnxopt.early_stop): a clear failure decided on the first batches --------------------------------
def _scores_model(path, swap: tuple[int, int] | None = None, classes: int = 6) -> str:
    """y = x @ P: P the identity, or the permutation swapping two classes (their samples then score wrong)."""
    p = np.eye(classes, dtype=np.float32)
    if swap is not None:
        p[list(swap)] = p[list(reversed(swap))]
    model = builders.make_model(
        [helper.make_node("MatMul", ["x", "p"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", classes])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        [onnx.numpy_helper.from_array(p, "p")],
    )
    return builders.save(model, path)


def _class_data(model_path, classes_of_samples, batch_size=16):
    """Scores whose argmax is the given class (margin 1), labels the same: the original is 100% right."""
    labels = np.asarray(classes_of_samples, np.int64)
    rng = np.random.default_rng(0)
    x = rng.random((len(labels), 6)).astype(np.float32)
    x[np.arange(len(labels)), labels] += 1.0
    return data.as_source({"x": x, "labels": labels}, graph.load(model_path), batch_size=batch_size)


def _reference(path):
    from onnxopt.validate import Reference

    return Reference(path)


@pytest.mark.parametrize("wrong, budget, stops", [(3, 4.6, True), (3, 3 / 64 * 100, False)])
def test_early_stop_top1_bound_is_exact(tmp_path, wrong, budget, stops):
    # class 0 only in the first batch (`wrong` samples): swapping classes 0 and 1 costs exactly 100 * wrong / 64 pp,
    # all of it visible on the first 16 samples; the bound stops there iff the final drop misses the budget
    original = _scores_model(tmp_path / "o.onnx")
    candidate = graph.load(_scores_model(tmp_path / "c.onnx", swap=(0, 1)))
    classes = [0] * wrong + [2 + i % 4 for i in range(64 - wrong)]
    source = _class_data(original, classes)
    full = validate(original, candidate, source, Budget(max_accuracy_drop=budget), check=False)
    early = validate(_reference(original), candidate, source, Budget(max_accuracy_drop=budget), check=False,
                     early_stop="exact")  # fmt: skip
    assert full.metric.drop == pytest.approx(100 * wrong / 64) and full.samples == 64 and full.early_stop is None
    assert full.ok is (not stops) and early.ok is full.ok
    if stops:
        assert early.early_stop.kind == "exact" and early.samples == early.early_stop.samples == 16
        assert early.early_stop.total == 64 and "remaining 48 samples were all right" in early.failures[0]
        assert "decided on 16 of 64 samples" in early.failures[0]
    else:  # exactly at the budget: a pass, scored on every sample like the full check
        assert early.early_stop is None and early.samples == 64
        assert early.metric.drop == full.metric.drop and early.outputs == full.outputs


def test_early_stop_top1_waits_while_the_rest_could_still_pass(tmp_path):
    # 3 wrong in the first batch, budget 1 pp (0.64 samples of 64): not decided before the bound says so
    original = _scores_model(tmp_path / "o.onnx")
    candidate = graph.load(_scores_model(tmp_path / "c.onnx", swap=(0, 1)))
    classes = [2 + i % 4 for i in range(60)] + [0] * 4  # the wrong ones come last
    source = _class_data(original, classes)
    report = validate(_reference(original), candidate, source, Budget(max_accuracy_drop=1.0), check=False,
                      early_stop="on")  # fmt: skip
    assert not report.ok and report.early_stop is not None and report.early_stop.samples == 64
    assert report.metric is None  # stopped after the last batch's bound, before the whole-set metric


def test_early_stop_cosine_is_final_once_a_sample_is_below(tmp_path):
    original = _scores_model(tmp_path / "o.onnx")
    candidate = graph.load(_scores_model(tmp_path / "c.onnx", swap=(0, 1)))
    classes = [0] + [2 + i % 4 for i in range(63)]  # one sample far off, in the first batch
    source = _class_data(original, classes)
    full = validate(original, candidate, source, Budget(min_cosine=0.99), check=False)
    early = validate(_reference(original), candidate, source, Budget(min_cosine=0.99), check=False, early_stop="on")
    assert not full.ok and full.samples == 64
    assert not early.ok and early.samples == 16 and early.early_stop.kind == "exact"
    assert early.outputs["y"].cosine == full.outputs["y"].cosine < 0.99  # the worst is the final worst
    assert "cosine" in early.failures[0] and "decided on 16 of 64" in early.failures[0]


def test_early_stop_passing_candidate_scored_on_all_samples(tmp_path):
    original = _scores_model(tmp_path / "o.onnx")
    candidate = graph.load(_scores_model(tmp_path / "c.onnx", swap=(0, 1)))
    classes = [2 + i % 4 for i in range(64)]  # no sample of class 0 or 1: the swap changes nothing that counts
    source = _class_data(original, classes)
    budget = Budget(max_accuracy_drop=0.5, min_cosine=0.5)
    full = validate(original, candidate, source, budget, check=False)
    early = validate(_reference(original), candidate, source, budget, check=False, early_stop="on")
    assert full.ok and early.ok and early.samples == full.samples == 64 and early.early_stop is None
    assert early.outputs == full.outputs and early.metric == full.metric


def _hard_last(model_path, extra=None):
    """64 samples the original gets right: 56 by a margin of 1, then 8 of class 0 by a margin of 0.1 (class 1 is
    second), which a model swapping classes 0 and 1 gets wrong."""
    labels = np.array([2 + i % 4 for i in range(56)] + [0] * 8, np.int64)
    x = np.zeros((64, 6), np.float32)
    x[np.arange(64), labels] = 1.0
    x[56:, 0], x[56:, 1] = 0.2, 0.1
    return data.as_source({"x": x, "labels": labels, **(extra or {})}, graph.load(model_path), batch_size=16)


def test_checks_read_the_originals_near_misses_first_and_report_the_same(tmp_path):
    from onnxopt.validate import check_order

    original = _scores_model(tmp_path / "o.onnx")
    swapped = graph.load(_scores_model(tmp_path / "c.onnx", swap=(0, 1)))
    source = _hard_last(original)
    tight, loose = Budget(max_accuracy_drop=5.0), Budget(max_accuracy_drop=15.0)  # the swap costs 12.5 pp
    reference = _reference(original)
    validate(reference, graph.load(original), source, loose, check=False)  # the original's outputs, cached
    ordered_ref, ordered = check_order(reference, source, tight, early_stop="exact")
    assert ordered is not source and ordered.samples == 64 and ordered.batch_sizes == source.batch_sizes
    assert sorted(ordered.order[:8]) == list(range(56, 64)) and sorted(ordered.order) == list(range(64))
    assert (ordered.labels == source.labels[ordered.order]).all()
    # the reordered set's baseline is given with it (its data is not read for it) and is the one computed afresh
    from onnxopt import early_stop
    from onnxopt.validate import _auto_metric

    factory, ordered._factory = ordered._factory, None  # reading the data now would raise
    given = early_stop.baseline(ordered_ref, ordered, None, tight, "exact", _auto_metric(tight))
    ordered._factory = factory
    fresh = early_stop.baseline(_reference(original), ordered, None, tight, "exact", _auto_metric(tight))
    assert given.offsets == fresh.offsets and given.before_score == fresh.before_score
    assert (given.before["top"] == fresh.before["top"]).all() and (given.labels == fresh.labels).all()
    assert given.ref_max == fresh.ref_max and given.elements == fresh.elements
    plain = validate(reference, swapped, source, tight, check=False, early_stop="exact")
    early = validate(ordered_ref, swapped, ordered, tight, check=False, early_stop="exact")
    assert not plain.ok and plain.early_stop.samples == 64  # the misses come last in the set's order
    assert not early.ok and early.early_stop.kind == "exact" and early.samples == 16  # ... first in the checks'
    # a passing check reads the whole set: the same metric, interval and comparison as in the set's own order
    same = validate(reference, swapped, source, loose, check=False, early_stop="exact")
    moved = validate(ordered_ref, swapped, ordered, loose, check=False, early_stop="exact")
    assert same.ok and moved.ok and moved.metric == same.metric and moved.metric.interval is not None
    assert moved.accuracy == same.accuracy and moved.outputs == same.outputs


def test_check_order_keeps_data_it_cannot_reorder(tmp_path):
    from onnxopt.validate import check_order

    original = _scores_model(tmp_path / "o.onnx")
    source = _hard_last(original)
    reference = _reference(original)
    budget = Budget(max_accuracy_drop=5.0)
    assert check_order(reference, source, budget, early_stop="off") == (reference, source)  # no early stop
    assert check_order(reference, source, Budget(min_cosine=0.9), early_stop="on") == (reference, source)  # no bound
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i in range(4):
        np.savez(folder / f"{i}.npz", x=np.eye(6, dtype=np.float32)[i : i + 1], labels=np.array([i]))
    files = data.as_source(str(folder), graph.load(original))
    assert data.reordered(files, np.arange(4)[::-1]) is None  # read from files in order
    assert check_order(_reference(original), files, budget, early_stop="on")[1] is files


def test_early_stop_max_abs_uses_the_whole_sets_scale(tmp_path):
    # the scaled error divides by max(1, max|y|) over all samples: a large output in the last batch lowers it,
    # so the early bound divides by the whole set's scale (not the scale seen so far) and does not stop here
    original = _scores_model(tmp_path / "o.onnx")
    candidate = graph.load(_scores_model(tmp_path / "c.onnx", swap=(0, 1)))
    x = np.random.default_rng(0).random((64, 6)).astype(np.float32)
    x[0, 0] += 1.0  # the swap's error: |x0 - x1| < 2, in the first batch
    x[63] = [0, 0, 100, 0, 0, 0]  # the last batch sets the scale (its error is 0)
    source = data.as_source({"x": x}, graph.load(original), batch_size=16)
    budget = Budget(max_abs=0.05)
    full = validate(original, candidate, source, budget, check=False)
    early = validate(_reference(original), candidate, source, budget, check=False, early_stop="exact")
    assert full.ok and early.ok and early.samples == 64 and early.outputs == full.outputs
    assert full.outputs["y"].max_abs > 0.05 * 2  # judged on the first batch's own scale, it would have failed


def test_early_stop_psnr_and_mse_bounds(tmp_path):
    from onnxopt import metrics

    original = _scores_model(tmp_path / "o.onnx")
    candidate = graph.load(_scores_model(tmp_path / "c.onnx", swap=(0, 1)))
    rng = np.random.default_rng(0)
    x = rng.random((64, 6)).astype(np.float32)
    x[:16, 0] += 5.0  # the error is all in the first batch
    source = data.as_source({"x": x, "labels": x.copy()}, graph.load(original), batch_size=16)
    for name, budget in [("psnr", Budget(metric_limit=30.0)), ("mse", Budget(max_metric_drop=0.1))]:
        full = validate(original, candidate, source, budget, check=False, metric=metrics.resolve(name))
        early = validate(_reference(original), candidate, source, budget, check=False,
                         metric=metrics.resolve(name), early_stop="exact")  # fmt: skip
        assert not full.ok and full.samples == 64, name
        assert not early.ok and early.samples == 16 and early.early_stop.kind == "exact", name
        loose = {"psnr": Budget(metric_limit=full.metric.after), "mse": Budget(max_metric_drop=full.metric.drop)}
        again = validate(_reference(original), candidate, source, loose[name], check=False,
                         metric=metrics.resolve(name), early_stop="exact")  # fmt: skip
        assert again.ok and again.samples == 64, name  # exactly at the bar: no early stop


def test_early_stop_mode_is_checked():
    from onnxopt import early_stop
    from onnxopt.errors import UsageError

    assert early_stop.mode("EXACT") == "exact" and early_stop.mode("off") == "off"
    with pytest.raises(UsageError, match="one of off, exact, on"):
        early_stop.mode("sometimes")


def test_early_stop_spearman_is_statistical_on_a_spread_quarter(tmp_path):
    from onnxopt import metrics

    def encoder(path, w):
        model = builders.make_model(
            [helper.make_node("MatMul", ["x", "w"], ["e"], name="mm")],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
            [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 8])],
            [onnx.numpy_helper.from_array(w.astype(np.float32), "w")],
        )
        return builders.save(model, path)

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8))
    original = encoder(tmp_path / "o.onnx", w)
    x = rng.standard_normal((320, 16)).astype(np.float32)  # 160 pairs; batches of 8: 40 batches, a quarter is 10
    e = x.astype(np.float64) @ w
    gold = (e[0::2] * e[1::2]).sum(1) / np.linalg.norm(e[0::2], axis=1) / np.linalg.norm(e[1::2], axis=1)
    source = data.as_source({"x": x, "labels": gold}, graph.load(original), batch_size=8, pair_labels=True)
    budget = Budget(max_metric_drop=0.5)
    spearman = metrics.resolve("spearman")
    unrelated = graph.load(encoder(tmp_path / "c.onnx", rng.standard_normal((16, 8))))  # rho ~ 0: drop ~ 100
    full = validate(original, unrelated, source, budget, check=False, metric=metrics.resolve("spearman"))
    exact = validate(_reference(original), unrelated, source, budget, check=False, metric=spearman, early_stop="exact")
    early = validate(_reference(original), unrelated, source, budget, check=False, metric=spearman, early_stop="on")
    assert not full.ok and full.metric.drop > 10 and not exact.ok and exact.early_stop is None  # no exact bound
    assert not early.ok and early.early_stop.kind == "statistical" and early.samples == 80
    assert "40 pairs of every 4th batch" in early.failures[0] and "99% confidence" in early.failures[0]
    same = validate(_reference(original), graph.load(original), source, budget, check=False, metric=spearman,
                    early_stop="on")  # fmt: skip
    assert same.ok and same.samples == 320 and same.metric.drop == 0  # scored on every sample
    near = graph.load(encoder(tmp_path / "n.onnx", w + 0.3 * rng.standard_normal((16, 8))))
    loose = Budget(max_metric_drop=50)
    full = validate(original, near, source, loose, check=False, metric=metrics.resolve("spearman"))
    early = validate(_reference(original), near, source, loose, check=False, metric=spearman, early_stop="on")
    assert full.ok and early.ok and full.metric.drop > 0.1  # scored in two sweeps, judged in data order:
    assert early.metric == full.metric and early.outputs == full.outputs  # the same numbers as one pass


def test_early_stop_fast_mode_stops_top1_on_the_quarter(tmp_path):
    # the original is right on half the samples (the other half's labels are off by 3): the exact bound must
    # allow for the candidate fixing those, so it waits past half the set; "fast" decides on every 4th batch
    original = _scores_model(tmp_path / "o.onnx")
    p = np.roll(np.eye(6, dtype=np.float32), 1, axis=1)  # every sample's argmax moves to the next class
    candidate = graph.load(builders.save(builders.make_model(
        [helper.make_node("MatMul", ["x", "p"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [onnx.numpy_helper.from_array(p, "p")],
    ), tmp_path / "c.onnx"))  # fmt: skip
    source = _class_data(original, [i % 6 for i in range(256)])
    labels = np.array([i % 6 if i % 2 else (i + 3) % 6 for i in range(256)])
    x = np.concatenate([b.feeds["x"] for b in source])
    source = data.as_source({"x": x, "labels": labels}, graph.load(original), batch_size=16)
    budget = Budget(max_accuracy_drop=1.0)
    full = validate(original, candidate, source, budget, check=False)
    exact = validate(_reference(original), candidate, source, budget, check=False, early_stop="exact")
    fast = validate(_reference(original), candidate, source, budget, check=False, early_stop="fast")
    assert not full.ok and full.metric.before == 50.0 and full.metric.after == 0.0
    assert not exact.ok and exact.early_stop.kind == "exact" and exact.samples > 128
    assert not fast.ok and fast.early_stop.kind == "statistical" and fast.samples == 64
    assert "64 samples of every 4th batch" in fast.failures[0]
