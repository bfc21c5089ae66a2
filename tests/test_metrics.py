"""Task metrics (onnxopt.metrics) against hand computations, and their budgets through validation and searches."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import data, graph, metrics
from onnxopt.errors import DataError, UsageError
from onnxopt.manager import PassManager
from onnxopt.validate import Budget, validate
from tests import builders


def _perturbed(path, tmp_path, scale=0.3, seed=5):
    model = onnx.load(path)
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        init.CopyFrom(
            numpy_helper.from_array(array + scale * rng.standard_normal(array.shape).astype(array.dtype), init.name)
        )
    return builders.save(model, tmp_path / "perturbed.onnx")


@pytest.fixture()
def classifier(tmp_path):
    """An MLP with 6 classes, a perturbed twin, and 60 labelled samples."""
    path = builders.save(builders.mlp(sizes=(8, 16, 6), seed=0), tmp_path / "mlp.onnx")
    x = np.random.default_rng(1).standard_normal((60, 8)).astype(np.float32)
    labels = builders.run(onnx.load(path), {"x": x})["y"].argmax(axis=1)  # the original is right...
    labels[:12] = np.random.default_rng(2).integers(0, 6, 12)  # ...mostly
    return path, _perturbed(path, tmp_path), x, labels


def test_top5_on_a_hand_example():
    metric = metrics.resolve("top5")
    scores = np.array([[0.0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 0, 9, 0, 0, 0]], np.float32)
    metric.bind({"y": scores}, None)
    rows = metric.rows({"y": scores}, {})
    # sample 0: label 0 has the lowest score (rank 6): miss; sample 1: label 4 is 5th: hit; sample 2: label 2: hit
    assert metric.score(rows, np.array([0, 4, 2]), rows) == pytest.approx(100 * 2 / 3)
    top1 = metrics.resolve("top1")
    top1.bind({"y": scores}, None)
    assert top1.score(top1.rows({"y": scores}, {}), np.array([5, 0, 2]), None) == pytest.approx(100.0)


@pytest.mark.parametrize("name, k", [("top1", 1), ("top5", 5)])
def test_topk_through_validation_matches_onnxruntime(classifier, name, k):
    path, perturbed, x, labels = classifier
    model = graph.load(path)
    source = data.as_source({"x": x, "labels": labels}, model, batch_size=16)
    report = validate(path, perturbed, source, Budget(max_metric_drop=100), metric=name)
    hits = {}
    for side, file in (("before", path), ("after", perturbed)):
        y = builders.run(onnx.load(file), {"x": x}, optimize=True)["y"]
        top = np.argsort(-y, axis=1)[:, :k]
        hits[side] = 100 * np.mean([labels[i] in top[i] for i in range(len(x))])
    m = report.metric
    assert (m.name, m.output, m.higher_is_better) == (name, "y", True)
    assert m.before == pytest.approx(hits["before"]) and m.after == pytest.approx(hits["after"])
    assert m.drop == pytest.approx(hits["before"] - hits["after"])
    if name == "top1":
        assert report.accuracy["before"] == pytest.approx(m.before)  # today's accuracy is top1


def test_mse_by_hand(classifier):
    path, perturbed, x, _ = classifier
    model = graph.load(path)
    targets = np.random.default_rng(7).standard_normal((60, 6)).astype(np.float32)
    source = data.as_source({"x": x, "labels": targets}, model, batch_size=16)
    report = validate(path, perturbed, source, Budget(max_metric_drop=1e9), metric="mse")
    before = np.mean((builders.run(onnx.load(path), {"x": x}, optimize=True)["y"].astype(np.float64) - targets) ** 2)
    after = np.mean(
        (builders.run(onnx.load(perturbed), {"x": x}, optimize=True)["y"].astype(np.float64) - targets) ** 2
    )
    m = report.metric
    assert not m.higher_is_better
    assert m.before == pytest.approx(before, rel=1e-6) and m.after == pytest.approx(after, rel=1e-6)
    assert m.drop == pytest.approx(after - before, rel=1e-6)  # for lower-is-better, the drop is the increase


def test_psnr_by_formula(classifier):
    path, perturbed, x, _ = classifier
    model = graph.load(path)
    source = data.as_source({"x": x}, model, batch_size=16)
    report = validate(path, perturbed, source, Budget(metric_limit=0.0), metric="psnr")
    ref = builders.run(onnx.load(path), {"x": x}, optimize=True)["y"].astype(np.float64)
    got = builders.run(onnx.load(perturbed), {"x": x}, optimize=True)["y"].astype(np.float64)
    expected = 10 * math.log10((ref.max() - ref.min()) ** 2 / np.mean((got - ref) ** 2))
    m = report.metric
    assert m.before is None and m.drop is None and m.after == pytest.approx(expected, rel=1e-9)
    lo, hi = m.interval
    assert lo <= m.after <= hi
    strict = validate(path, perturbed, source, Budget(metric_limit=expected + 1), metric="psnr")
    assert not strict.ok and "below the limit" in strict.failures[0]
    assert validate(path, path, source, Budget(metric_limit=60), metric="psnr").metric.after == math.inf


def _pair_model(hidden=6, tokens=5, seed=0):
    """Token embeddings tanh(x @ W), x (N, tokens, hidden), with an attention_mask input the graph ignores."""
    w = np.random.default_rng(seed).standard_normal((hidden, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["t"]),
        helper.make_node("Tanh", ["t"], ["tokens"]),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
    ]
    return builders.make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", tokens, hidden]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", tokens]),
        ],
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", tokens, hidden]),
            helper.make_tensor_value_info("mask_shape", TensorProto.INT64, [2]),
        ],
        [numpy_helper.from_array(w, "w")],
    )


def _pair_data(pairs=30, tokens=5, hidden=6, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2 * pairs, tokens, hidden)).astype(np.float32)
    lengths = rng.integers(1, tokens + 1, 2 * pairs)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    gold = rng.integers(0, 6, pairs).astype(np.float32)  # 0-5 in whole steps: many ties, as in STS-B
    return x, mask, gold


def test_spearman_matches_scipy_with_ties_and_mask(tmp_path):
    scipy_stats = pytest.importorskip("scipy.stats")
    path = builders.save(_pair_model(), tmp_path / "pairs.onnx")
    perturbed = _perturbed(path, tmp_path, scale=0.5)
    x, mask, gold = _pair_data()
    model = graph.load(path)
    source = data.as_source({"x": x, "attention_mask": mask, "labels": gold}, model, batch_size=8, pair_labels=True)
    report = validate(
        path, perturbed, source, Budget(max_metric_drop=100), metric=metrics.resolve("spearman", "tokens")
    )
    expected = {}
    for side, file in (("before", path), ("after", perturbed)):
        tokens = builders.run(onnx.load(file), {"x": x, "attention_mask": mask})["tokens"].astype(np.float64)
        pooled = np.stack([tokens[i, : mask[i].sum()].mean(axis=0) for i in range(len(x))])  # by hand, row by row
        a, b = pooled[0::2], pooled[1::2]
        cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        expected[side] = 100 * scipy_stats.spearmanr(cosine, gold).statistic
    m = report.metric
    assert m.output == "tokens" and m.higher_is_better
    assert m.before == pytest.approx(expected["before"], abs=1e-6)
    assert m.after == pytest.approx(expected["after"], abs=1e-6)
    assert expected["before"] != pytest.approx(expected["after"], abs=1e-3)  # the perturbation matters
    rng = np.random.default_rng(0)
    u, v = rng.integers(0, 4, 40).astype(float), rng.standard_normal(40).round(1)  # ties in both
    assert metrics.spearman_rho(u, v) == pytest.approx(scipy_stats.spearmanr(u, v).statistic, abs=1e-12)


def test_mean_pool_ignores_masked_positions():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(metrics.mean_pool(hidden, mask), [[1.0, 2.0], [6.0, 7.0]])


def test_bootstrap_interval_contains_the_drop_and_confidence_fails_a_borderline_case(classifier):
    path, perturbed, x, labels = classifier
    model = graph.load(path)
    source = data.as_source({"x": x, "labels": labels}, model, batch_size=16)
    first = validate(path, perturbed, source, Budget(max_metric_drop=100), metric="top1").metric
    again = validate(path, perturbed, source, Budget(max_metric_drop=100), metric="top1").metric
    lo, hi = first.interval
    assert lo <= first.drop <= hi and lo < hi
    assert again.interval == first.interval  # a fixed seed: the same interval every time
    assert first.drop > 0, "the perturbation should cost accuracy"
    borderline = Budget(max_metric_drop=(first.drop + hi) / 2)
    assert validate(path, perturbed, source, borderline, metric="top1").ok
    confident = Budget(max_metric_drop=(first.drop + hi) / 2, confidence=0.95)
    report = validate(path, perturbed, source, confident, metric="top1")
    assert not report.ok and "95% interval's worse end" in report.failures[0]
    # --max-accuracy-drop is top1's spelling: the same verdict
    as_accuracy = validate(path, perturbed, source, Budget(max_accuracy_drop=(first.drop + hi) / 2, confidence=0.95))
    assert not as_accuracy.ok and as_accuracy.metric.name == "top1"


def _svd_pair_model():
    """Embedding x @ W (N, 32) -> (N, 32) with 4 strong directions and 28 weak ones."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    v, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    s = np.array([10.0] * 4 + [0.6] * 28)
    w = (u * s) @ v.T
    nodes = [helper.make_node("MatMul", ["x", "w"], ["embedding"], name="proj")]
    model = builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    strong = (u[:, :4] * s[:4]) @ v[:, :4].T  # the rank-4 model: gold scores are its pair cosines
    return model, strong


def _svd_pair_data(strong, pairs, seed):
    x = np.random.default_rng(seed).standard_normal((2 * pairs, 32)).astype(np.float32)
    e = x.astype(np.float64) @ strong
    a, b = e[0::2], e[1::2]
    gold = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"x": x, "labels": gold.astype(np.float32)}


def test_svd_search_judged_by_spearman_accepts_what_cosine_refuses(tmp_path):
    model, strong = _svd_pair_model()
    path = builders.save(model, tmp_path / "enc.onnx")
    calib, held_out = _svd_pair_data(strong, 40, 1), _svd_pair_data(strong, 50, 2)
    by_cosine = PassManager(["svd"], data={"x": calib["x"]}, budget=Budget(min_cosine=0.999),
                            eval_data={"x": held_out["x"]}).run(path)  # fmt: skip
    by_metric = PassManager(
        ["svd"], data={"x": calib["x"]}, eval_data=held_out, budget=Budget(max_metric_drop=0.5), metric="spearman"
    ).run(path)
    assert by_metric.ok and by_metric.validation.metric.drop <= 0.5
    assert by_metric.validation.outputs["embedding"].cosine < 0.999  # cosine would have refused this model
    ranks = [c.what for r in by_metric.passes if r.name == "svd" for c in r.changes]
    assert len(ranks) == 1 and int(ranks[0].split("rank ")[1].split()[0]) <= 4, ranks  # the 4 strong directions
    cosine_svd = [r for r in by_cosine.passes if r.name == "svd"][0]
    assert not cosine_svd.modified  # no rank that saves work keeps cosine 0.999
    assert by_metric.after.macs < by_cosine.after.macs


def test_user_metric_callable_and_its_direction(classifier):
    path, perturbed, x, labels = classifier
    calls = []

    def worst_margin(outputs, labels, inputs):
        calls.append((sorted(outputs), len(labels), sorted(inputs)))
        return float(np.abs(outputs["y"]).mean())

    worst_margin.higher_is_better = False
    model = graph.load(path)
    source = data.as_source({"x": x, "labels": labels}, model, batch_size=16)
    report = validate(path, perturbed, source, Budget(max_metric_drop=1e9), metric=worst_margin)
    assert calls == [(["y"], 60, ["x"])] * 2  # once per model, with the whole set
    ref = builders.run(onnx.load(path), {"x": x}, optimize=True)["y"]
    assert report.metric.before == pytest.approx(float(np.abs(ref).mean()), rel=1e-6)
    assert report.metric.higher_is_better is False and report.metric.interval is None


@pytest.mark.parametrize(
    "spec, error, fragment",
    [
        ("top7", UsageError, "unknown metric"),
        ("no_such_module_xyz:fn", UsageError, "does not import"),
        ("math:no_such_function", UsageError, "has no function"),
    ],
)
def test_bad_metric_names(spec, error, fragment):
    with pytest.raises(error, match=fragment):
        metrics.resolve(spec)


def test_bad_labels_for_a_metric(classifier):
    path, _, x, labels = classifier
    model = graph.load(path)
    with pytest.raises(DataError, match="one per pair"):
        data.as_source({"x": x[:6], "labels": labels[:6]}, model, pair_labels=True)
    with pytest.raises(DataError, match="odd"):
        data.as_source({"x": x[:5], "labels": labels[:2]}, model, pair_labels=True)
    with pytest.raises(DataError, match="NaN"):
        data.as_source({"x": x[:4], "labels": np.array([1.0, np.nan, 0, 2])}, model)


# --- the command line -------------------------------------------------------------------------------------------

USER_METRICS = """
from pathlib import Path

import numpy as np


def accuracy(outputs, labels, inputs):
    return 100.0 * float(np.mean(outputs["y"].argmax(axis=1) == labels))


def mean_abs(outputs, labels, inputs):
    return float(np.abs(outputs["y"]).mean())


mean_abs.higher_is_better = False


def boom(outputs, labels, inputs):
    raise ValueError("kaput")


def nan(outputs, labels, inputs):
    return float("nan")


def vector(outputs, labels, inputs):
    return outputs["y"].mean(axis=0)
"""


@pytest.fixture()
def cli_case(tmp_path):
    """An MLP with 6 classes, 40 labelled calibration and 40 labelled evaluation samples, a metric file."""
    path = builders.save(builders.mlp(sizes=(8, 32, 6), seed=0), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(4)
    for name in ("calib", "eval"):
        x = rng.standard_normal((40, 8)).astype(np.float32)
        labels = builders.run(onnx.load(path), {"x": x})["y"].argmax(axis=1)
        np.savez(tmp_path / f"{name}.npz", x=x, labels=labels)
    (tmp_path / "my_metric.py").write_text(USER_METRICS)
    (tmp_path / "broken_metric.py").write_text("import no_such_module_for_onnxopt\n")
    return tmp_path, path


def _npz(d, name, **arrays):
    np.savez(d / name, **arrays)
    return d / name


def _x(n):
    return np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)


METRIC_BAD_INPUTS = {
    "unknown metric": (["--metric", "top7"], "unknown metric"),
    "module does not import": (["--metric", "no_such_module_for_onnxopt:fn"], "does not import"),
    "file does not import": (["--metric", "{d}/broken_metric.py:fn"], "does not import"),
    "file missing": (["--metric", "{d}/nope.py:fn"], "no such file"),
    "function missing": (["--metric", "{d}/my_metric.py:nope"], "has no function 'nope'"),
    "function raises": (["--metric", "{d}/my_metric.py:boom"], "kaput"),
    "function returns NaN": (["--metric", "{d}/my_metric.py:nan"], "is nan"),
    "function returns a vector": (["--metric", "{d}/my_metric.py:vector"], "not a scalar"),
    "metric output missing": (["--metric", "top1", "--metric-output", "nope"], "'nope' is not an output"),
    "metric output unfit": (["--metric", "top5", "--metric-output", "y"], "C >= 5"),  # 6 classes: fits...
    "no labels": (["--metric", "top1", "--eval", "{unlabelled}"], "needs 'labels'"),
    "labels per sample for spearman": (["--metric", "spearman"], "expected 20 (one per pair"),
    "spearman odd samples": (["--metric", "spearman", "--eval", "{odd}"], "odd"),
    "drop without a metric": (["--max-metric-drop", "1"], "needs --metric"),
    "psnr with a drop": (["--metric", "psnr", "--max-metric-drop", "1"], "--metric-limit"),
    "confidence out of range": (["--metric", "top1", "--max-metric-drop", "1", "--budget-confidence", "95"], "between 0 and 1"),  # noqa: E501
    "confidence for a user metric": (["--metric", "{d}/my_metric.py:accuracy", "--max-metric-drop", "1", "--budget-confidence", "0.9"], "bootstrap"),  # noqa: E501
    "NaN labels": (["--eval", "{nan_labels}"], "NaN"),
    "zero-sample eval": (["--eval", "{empty}"], "no samples"),
}  # fmt: skip
METRIC_BAD_INPUTS["metric output unfit"] = (
    ["--metric", "top5", "--metric-output", "y", "--eval", "{three_classes}"],
    "C >= 5",
)  # noqa: E501


@pytest.mark.parametrize("case", sorted(METRIC_BAD_INPUTS))
def test_bad_metric_input_gets_one_line_exit_2_and_no_output(case, cli_case, capsys):
    from onnxopt import cli

    d, model = cli_case
    files = {
        "d": d,
        "unlabelled": _npz(d, "unlabelled.npz", x=_x(40)),
        "odd": _npz(d, "odd.npz", x=_x(41), labels=np.zeros(20, np.float32)),
        "nan_labels": _npz(d, "nan_labels.npz", x=_x(40), labels=np.where(np.arange(40) == 3, np.nan, 1.0)),
        "empty": _npz(d, "empty.npz", x=np.zeros((0, 8), np.float32)),
        "three_classes": d / "eval.npz",
    }
    if case == "metric output unfit":  # a 3-class model: top5 cannot read it
        model = builders.save(builders.mlp(sizes=(8, 16, 3), seed=0), d / "three.onnx")
    extra, fragment = METRIC_BAD_INPUTS[case]
    extra = [a.format(**files) for a in extra]
    if "--eval" not in extra:
        extra += ["--eval", str(d / "eval.npz")]
    before = sorted(os.listdir(d))
    argv = ["run", model, "--passes", "prune", "--data", d / "calib.npz", "-o", d / "o.onnx", "--report", d / "r.json"]
    try:
        code = cli.main([str(a) for a in argv + extra])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert "pass prune" not in out  # refused before any pass ran
    assert sorted(os.listdir(d)) == before  # no output, no report


def test_user_metric_file_end_to_end(cli_case, capsys):
    from onnxopt import cli

    d, model = cli_case
    code = cli.main([str(a) for a in [
        "run", model, "--passes", "prune", "--data", d / "calib.npz", "--eval", d / "eval.npz",
        "--metric", f"{d}/my_metric.py:accuracy", "--max-metric-drop", "20", "-o", d / "o.onnx",
        "--report", d / "r.json",
    ]])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, out + err
    m = json.loads((d / "r.json").read_text())["validation"]["metric"]
    assert m["name"] == f"{d}/my_metric.py:accuracy" and m["higher_is_better"] is True and m["interval"] is None
    assert m["before"] == 100.0  # labels are the original's argmax
    x, labels = np.load(d / "eval.npz")["x"], np.load(d / "eval.npz")["labels"]
    after = 100 * np.mean(builders.run(onnx.load(d / "o.onnx"), {"x": x}, optimize=True)["y"].argmax(1) == labels)
    assert m["after"] == pytest.approx(after) and m["drop"] == pytest.approx(100 - after) and m["drop"] <= 20
    assert "metric " + m["name"] in out
    pruned = [p for p in json.loads((d / "r.json").read_text())["passes"] if p["name"] == "prune"][0]
    assert pruned["modified"] and m["drop"] > 0  # the search took what the user's metric allows


def test_report_and_summary_of_a_builtin_metric(cli_case, capsys):
    from onnxopt import cli

    d, model = cli_case
    code = cli.main([str(a) for a in [
        "run", model, "--passes", "prune", "--data", d / "calib.npz", "--eval", d / "eval.npz", "--metric", "top1",
        "--max-metric-drop", "2.5", "--budget-confidence", "0.9", "-o", d / "o.onnx", "--report", d / "r.json",
    ]])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, out + err
    validation = json.loads((d / "r.json").read_text())["validation"]
    m = validation["metric"]
    assert set(m) == {"name", "output", "higher_is_better", "before", "after", "drop", "interval", "interval_of",
                      "confidence"}  # fmt: skip
    assert (m["name"], m["output"], m["confidence"], m["interval_of"]) == ("top1", "y", 0.9, "drop")
    assert m["interval"][0] <= m["drop"] <= m["interval"][1] <= 2.5  # the worse end is within the budget
    assert validation["budget"] == {"max_metric_drop": 2.5, "confidence": 0.9}
    assert "metric top1 on 'y' (higher is better)" in out and "90% interval of the drop" in out


@pytest.mark.shared
def test_stsb_data_keeps_each_pair_on_rows_2k_and_2k_plus_1(shared_dir, tmp_path):
    """models/stsb_data.py: sentence pairs tokenized one by one land on consecutive rows, gold scores per pair."""
    tokenizers = pytest.importorskip("tokenizers")
    import subprocess
    import sys

    stsb = shared_dir / "data" / "stsb"
    if not (stsb / "sts-dev.csv").is_file():
        pytest.skip("../shared/data/stsb is absent")
    script = Path(__file__).resolve().parents[1] / "models" / "stsb_data.py"
    out = tmp_path / "dev.npz"
    tokenizer_file = stsb / "bert_uncased_tokenizer.json"
    subprocess.run([sys.executable, str(script), "--stsb", str(stsb), "--tokenizer", str(tokenizer_file),
                    "--split", "dev", "--pairs", "5", "--out", str(out)], check=True, capture_output=True)  # fmt: skip
    arrays = np.load(out)
    assert sorted(arrays.files) == ["attention_mask", "input_ids", "labels"]
    assert arrays["input_ids"].dtype == arrays["attention_mask"].dtype == np.int64
    rows = [line.split("\t") for line in (stsb / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:5]]
    np.testing.assert_allclose(arrays["labels"], [float(r[4]) for r in rows], rtol=1e-6)
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()  # the file pads to a fixed length; the script pads to the longest sentence instead
    for k, row in enumerate(rows):
        for offset, sentence in enumerate((row[5], row[6])):
            ids = arrays["input_ids"][2 * k + offset]
            mask = arrays["attention_mask"][2 * k + offset]
            assert ids[mask == 1].tolist() == tokenizer.encode(sentence).ids
            assert (ids[mask == 0] == 0).all()


def test_held_out_split_keeps_pairs_and_their_labels_together():
    x = np.arange(10, dtype=np.float32)[:, None]
    first, last, held, total = data.holdout({"x": x, "labels": np.arange(5.0)}, 0.3, unit=2)
    assert (held, total) == (4, 10)  # the last 2 of 5 pairs
    np.testing.assert_array_equal(last["x"][:, 0], [6, 7, 8, 9])
    np.testing.assert_array_equal(last["labels"], [3, 4])
    np.testing.assert_array_equal(first["labels"], [0, 1, 2])
    first, last, held, _ = data.holdout({"x": x, "labels": np.arange(10)}, 0.3)
    assert held == 3 and last["labels"].tolist() == [7, 8, 9] and len(first["x"]) == 7
    assert data.holdout({"x": x, "labels": np.arange(4)}, 0.3) is None  # a count that fits nothing: as_source says so


@pytest.mark.parametrize("k, samples", [(1, 750), (5, 751), (1, 1)])
def test_topk_bootstrap_fast_path_equals_scoring_each_resample(k, samples):
    class Rescored(metrics._TopK):  # the generic path: every resample's rows scored anew
        def per_sample(self, rows, labels):
            return None

        def score(self, rows, labels, reference):
            indices = np.asarray(labels).reshape(-1).astype(np.int64)
            hit = (rows["top"] == indices[:, None]).any(axis=1)
            return 100.0 * float(hit.mean()) if len(hit) else float("nan")

    rng = np.random.default_rng(k)
    labels = rng.integers(0, 10, samples)
    before_scores = rng.standard_normal((samples, 10))
    after_scores = before_scores + 0.8 * rng.standard_normal((samples, 10))
    results = []
    for metric in (metrics.resolve(f"top{k}", "y"), Rescored(k, "y")):
        before, after = metric.rows({"y": before_scores}, {}), metric.rows({"y": after_scores}, {})
        results.append(metric.evaluate(before, after, labels, confidence=0.9))
    assert results[0].interval == results[1].interval and results[0].drop == results[1].drop
    assert samples == 1 or results[0].interval[0] < results[0].drop < results[0].interval[1]
