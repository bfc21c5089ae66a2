"""bench/real.py's pure helpers: the stratified split, the metrics it computes itself, the table and the summary."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import real  # noqa: E402
from _real_tasks import Task, psnr, spearman_pairs, stratified_split, worst_cosine  # noqa: E402


def _task(metric: str = "top1", budget: float = 0.5, batches=(1, 16)) -> Task:
    empty: dict[str, np.ndarray] = {}
    return Task("m", Path("m.onnx"), "image", metric, budget, empty, empty, empty, None, {b: {} for b in batches}, "")


def _row(tool: str, metric: float, b16: float, within: bool = True, **kw) -> real.Row:
    return real.Row(tool, Path("x.onnx"), metric=metric, latency={1: (b16, 0.01), 16: (b16, 0.02)}, within=within, **kw)


def test_stratified_split_takes_every_nth_per_class_in_order():
    labels = np.array([0, 1, 0, 0, 1, 1, 0, 1, 2, 2, 0, 0])
    taken, rest = stratified_split(labels, 2)
    assert taken.tolist() == [0, 1, 3, 5, 8, 10]  # class 0: 0,2,3,6,10,11 -> 0,3,10; class 1: 1,4,5,7 -> 1,5; 2: 8
    assert sorted(taken.tolist() + rest.tolist()) == list(range(len(labels)))
    # the test2000 layout: 10 classes x 200 images, every 4th calibrates -> 50 per class, 1,500 left
    labels = np.repeat(np.arange(10), 200)
    calib, evaluation = stratified_split(labels, 4)
    assert len(calib) == 500 and len(evaluation) == 1500
    assert np.bincount(labels[calib]).tolist() == [50] * 10
    assert np.array_equal(stratified_split(labels, 4)[0], calib)  # deterministic


def test_spearman_pairs_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    gold = np.array([1.0, 2.0, 2.0, 3.0, 0.5] * 4)  # ties: average ranks
    a, b = emb[0::2].astype(np.float64), emb[1::2].astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert spearman_pairs(emb, gold) == pytest.approx(100 * spearmanr(cos, gold).statistic, abs=1e-6)


def test_psnr_and_worst_cosine_against_hand_computation():
    ref = {"y": np.zeros((2, 1, 4, 4), np.float32)}
    out = {"y": np.full((2, 1, 4, 4), 0.1, np.float32)}
    ref["y"][1] = 2.0  # peak: the reference's range, 2
    out["y"][1] = 2.1
    assert psnr(out, ref) == pytest.approx(10 * np.log10(4 / 0.01), abs=1e-4)  # mse 0.01 everywhere
    assert psnr(ref, ref) == float("inf")
    ref = {"a": np.array([[1.0, 0.0], [1.0, 1.0]]), "b": np.ones((2, 3))}
    got = {"a": np.array([[1.0, 1.0], [2.0, 2.0]]), "b": np.ones((2, 3))}
    assert worst_cosine(got, ref) == pytest.approx(1 / np.sqrt(2))


def test_within_budget_by_metric_kind():
    assert _task("top1", 0.5).within(80.0, 79.5) and not _task("top1", 0.5).within(80.0, 79.49)
    assert _task("psnr", 40.0).within(float("inf"), 40.0) and not _task("psnr", 40.0).within(float("inf"), 39.9)
    assert not _task("cosine", 0.999).within(1.0, 0.9985)


def test_table_cells_for_base_result_error_and_fixed_batch():
    task = _task(batches=(1,))
    base = real.Row("original", Path("m.onnx"), metric=80.0, heldout=79.0, latency={1: (1.0, 0.05)}, note="1 ms")
    good = real.Row("ort static U8S8", Path("a.onnx"), seconds=3.2, peak_mb=180.4, size=0.3, macs=None,
                    metric=79.6, heldout=78.5, latency={1: (0.46, 0.031)}, within=True)  # fmt: skip
    bad = real.Row("onnxopt prune", seconds=900.2, peak_mb=512.0, error="timed out after 900 s")
    lines = real.table({"mnv2": (task, [base, good, bad])})
    assert lines[0] == real.HEADER and lines[1] == "|" + "---|" * 12
    assert lines[2] == "| mnv2 | original | 80.00 |  |  | 1.00 ±5% | — | 1.000 | 1.000 |  |  | 1 ms |"
    assert (
        lines[3] == "| mnv2 | ort static U8S8 | 79.60 (-0.40) | -0.50 | yes | 0.46 ±3% | — | 0.300 | ? | 3.2 | 180 |  |"
    )
    assert lines[4] == "| mnv2 | onnxopt prune | timed out after 900 s | | | | | | | 900.2 | 512 |  |"


def test_summary_line_compares_within_budget_at_equal_or_better_metric():
    task = _task()
    base = _row("original", 80.0, 1.0)
    rows = [
        base,
        _row("onnxopt quant", 79.8, 0.50),
        _row("onnxopt prune", 79.0, 0.30, within=False),  # faster but outside the budget: not the best
        _row("ort static U8S8", 79.6, 0.46),  # faster than onnxopt but a worse metric
        _row("ort static S8S8", 79.9, 0.90),
    ]
    line = real.summary_line("m", task, rows)
    assert "best onnxopt `onnxopt quant` 0.50×" in line
    assert "at equal or better metric: `ort static S8S8` 0.90× (79.90, Δ -0.10) — onnxopt faster (0.56×)" in line
    assert "fastest peer within the budget: `ort static U8S8` 0.46×" in line
    rows[4].latency[16] = (0.51, 0.0)
    assert "— a tie within 5% (0.98×)" in real.summary_line("m", task, rows)
    rows[4].latency[16] = (0.40, 0.0)
    assert "— the peer is faster (onnxopt 1.25×)" in real.summary_line("m", task, rows)
    rows[1].within = False
    assert real.summary_line("m", task, rows).startswith("- m: no onnxopt result within the budget; fastest peer")


OLD = {"--max-accuracy-drop", "--min-cosine"}
NEW = OLD | {"--metric", "--max-metric-drop", "--metric-limit", "--metric-output", "--allow-small-eval"}


def test_onnxopt_flags_fall_back_and_say_so():
    assert real.onnxopt_flags(_task("top1", 1.0), options=OLD)[0] == ["--max-accuracy-drop", "1"]
    flags, text = real.onnxopt_flags(_task("spearman", 0.5), options=OLD)
    assert flags == ["--min-cosine", "0.99"] and "no --metric spearman" in text
    flags, _ = real.onnxopt_flags(_task("spearman", 0.5), options=NEW)
    assert flags[:4] == ["--metric", "spearman", "--max-metric-drop", "0.5"] and "--metric-output" in flags
    flags = real.onnxopt_flags(_task("psnr", 40.0), options=NEW)[0]
    assert flags == ["--metric", "psnr", "--metric-limit", "40", "--allow-small-eval"]
    assert real.onnxopt_flags(_task("cosine", 0.999), options=OLD)[0] == ["--min-cosine", "0.999"]
    assert {"--metric", "--max-metric-drop", "--max-accuracy-drop", "--min-cosine"} <= real.cli_options()


def test_default_tools_by_kind_minus_the_cut():
    text = real.default_tools("minilm", "text")
    assert "ort dynamic" in text and "ort bert fusion+dynamic" in text and "onnxopt quant dynamic" in text
    assert "ort static U8S8" not in text and "onnxopt svd" not in text  # image-only; cut for time
    image = real.default_tools("resnet20", "image")
    assert "ort static U8S8" in image and "onnxopt quant" in image and "ort bert fusion" not in image
    assert all(kind in real.TOOLS[t][1] for kind, tools in (("text", text), ("image", image)) for t in tools)


def test_a_missing_peer_package_stops_the_run_before_it_starts(monkeypatch, tmp_path, capsys):
    import run

    assert run.missing_packages(["onnxopt quant", "ort static U8S8", "ort dynamic"]) == []  # the core's
    monkeypatch.setitem(run.PEER_PACKAGES, "onnxsim", "onnxopt_test_absent_package")
    assert run.missing_packages(["onnxsim int8", "onnxsim L2 30%", "onnxopt quant"]) == ["onnxopt_test_absent_package"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        real.main(["--shared", str(tmp_path), "--tools", "onnxsim int8;onnxopt quant", "--out-dir", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "onnxopt_test_absent_package, which is not installed" in err and "--tools" in err
    assert not out.exists()  # nothing written
    # the same run without that peer gets past the check (and finds no pair in the empty --shared)
    assert real.main(["--shared", str(tmp_path), "--tools", "onnxopt quant", "--out-dir", str(out)]) == 0


def _tiny_spec(tmp_path):
    from _real_tools import Spec

    models = Path(__file__).resolve().parents[1] / "models" / "tiny_mlp"
    return Spec("onnxopt goal", models / "tiny_mlp.onnx", "image", tmp_path, models / "calib.npz", models / "eval.npz",
                ["--min-cosine", "0.99"])  # fmt: skip


def test_the_goal_tool_runs_the_goal_and_names_the_chosen_pipeline(tmp_path):
    """The goal tool is `onnxopt run --target` with the task's budget flags: a reached target gives its model and
    says so (on the tiny MLP, int8 is at about 0.4x of float: latency=0.9 is reached by the first rung)."""
    import json

    from _real_tools import _onnxopt_goal

    assert "onnxopt goal latency=0.4" in real.default_tools("minilm", "text")
    assert "onnxopt goal latency=0.4" in real.default_tools("mobilenet_v2", "image")
    out, note = _onnxopt_goal("latency=0.9")(_tiny_spec(tmp_path), tmp_path)
    found = json.loads((tmp_path / "report.json").read_text())["goal"]
    assert out.exists() and found["reached"] and note == f"reached: {found['chosen']}"
    first = found["points"][0]
    assert first["within_budget"] and first["cosine"] >= 0.99


@pytest.mark.slow
def test_the_goal_tool_keeps_the_best_model_of_a_target_not_reached(tmp_path):
    """An unreachable target exits 1 with the best point within the budget written: that is the tool's result."""
    import json

    from _real_tools import _onnxopt_goal

    out, note = _onnxopt_goal("latency=0.01")(_tiny_spec(tmp_path), tmp_path)
    found = json.loads((tmp_path / "report.json").read_text())["goal"]
    assert out.exists() and not found["reached"] and note == f"not reached: {found['chosen']}"
    assert any(p["pipeline"] == found["chosen"] and p["within_budget"] for p in found["points"])
