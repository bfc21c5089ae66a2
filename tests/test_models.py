"""The committed reference models: each loads and reproduces its recorded figure on its committed eval slice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxopt import graph
from onnxopt.runtime import Session

MODELS = Path(__file__).resolve().parents[1] / "models"
CLASSIFIERS = ["mnist_cnn", "mnist_mlp", "breast_cancer_mlp", "mobile_cnn"]


def _eval(name):
    with np.load(MODELS / name / "eval.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_matches_its_recorded_accuracy(name):
    folder = MODELS / name
    if not (folder / "result.json").exists():
        pytest.skip(f"{name} not built")
    result = json.loads((folder / "result.json").read_text())
    session = Session(graph.load(folder / f"{name}.onnx"))
    arrays = _eval(name)
    labels = arrays.pop("labels")
    scores = session.run(arrays)[session.output_names[0]]
    accuracy = 100.0 * float((scores.argmax(axis=1) == labels).mean())
    assert accuracy == pytest.approx(result["accuracy_eval_slice"], abs=0.051)


def test_autoencoder_matches_its_recorded_mse():
    result = json.loads((MODELS / "mnist_autoencoder" / "result.json").read_text())
    session = Session(graph.load(MODELS / "mnist_autoencoder" / "mnist_autoencoder.onnx"))
    arrays = _eval("mnist_autoencoder")
    x = next(iter(arrays.values()))
    out = session.run(arrays)[session.output_names[0]]
    assert float(np.mean((out.astype(np.float64) - x) ** 2)) == pytest.approx(result["eval_mse_onnx"], rel=1e-3)


@pytest.mark.parametrize("variant", ["vanilla", "distorted", "l1"])
def test_fc_sum_variants_match_their_recorded_mse(variant):
    result = json.loads((MODELS / "fc_sum" / "result.json").read_text())[variant]
    session = Session(graph.load(MODELS / "fc_sum" / f"fc_sum_{variant}.onnx"))
    x = _eval("fc_sum")["input"]
    out = session.run({"input": x})[session.output_names[0]]
    mse = float(np.mean((out[:, 0].astype(np.float64) - x.sum(axis=1)) ** 2))
    assert mse == pytest.approx(result["eval_mse_onnx"], rel=1e-3)


def test_tiny_mlp_accuracy_on_its_slice():
    session = Session(graph.load(MODELS / "tiny_mlp" / "tiny_mlp.onnx"))
    arrays = _eval("tiny_mlp")
    labels = arrays.pop("labels")
    accuracy = 100.0 * float((session.run(arrays)["logits"].argmax(1) == labels).mean())
    assert accuracy == pytest.approx(97.30, abs=0.051)  # models/tiny_mlp/README.md: 97.30% on eval.npz


def test_a_build_script_runs_end_to_end_in_quick_mode(tmp_path):
    """CI does not retrain; one script (no MNIST needed: scikit-learn's breast-cancer data) runs quickly."""
    pytest.importorskip("sklearn")
    pytest.importorskip("tf2onnx")
    cmd = [sys.executable, str(MODELS / "apoz_mlp.py"), "--dataset", "breast_cancer", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "breast_cancer_mlp"
    model = graph.load(folder / "breast_cancer_mlp.onnx")
    assert json.loads((folder / "result.json").read_text())["accuracy_test"] > 80
    assert [v.name for v in graph.data_inputs(model)] == ["input"]
