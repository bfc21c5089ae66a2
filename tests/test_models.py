"""The committed reference models: each loads and reproduces its recorded figure on its committed eval slice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import graph
from onnxopt.runtime import Session

MODELS = Path(__file__).resolve().parents[1] / "models"
CLASSIFIERS = ["mnist_cnn", "mnist_mlp", "breast_cancer_mlp", "mobile_cnn"]
AUTOENCODERS = ["mnist_autoencoder", "mnist_autoencoder_slim"]
# mnist_autoencoder_slim after prune --prune-criterion dead (models/README.md); the thesis's vanilla pruning got
# [16, 64, 22], which the slim model does not reach yet (issue #4)
SLIM_PRUNED_CHANNELS = [28, 53, 28]


def _built(name) -> tuple[Path, dict]:
    """The model's folder and its result.json; skips the test when the model has not been built."""
    folder = MODELS / name
    if not (folder / "result.json").exists():
        pytest.skip(f"{name} not built")
    return folder, json.loads((folder / "result.json").read_text())


def _eval(name):
    with np.load(MODELS / name / "eval.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_matches_its_recorded_accuracy(name):
    folder, result = _built(name)
    session = Session(graph.load(folder / f"{name}.onnx"))
    arrays = _eval(name)
    labels = arrays.pop("labels")
    scores = session.run(arrays)[session.output_names[0]]
    accuracy = 100.0 * float((scores.argmax(axis=1) == labels).mean())
    assert accuracy == pytest.approx(result["accuracy_eval_slice"], abs=0.051)


def _reconstruction_mse(model, arrays) -> float:
    """Task MSE of an autoencoder on its eval slice: ``labels`` names the input, which is the target."""
    x = arrays[str(arrays["labels"])]
    session = Session(model)
    out = session.run({session.input_names[0]: x})[session.output_names[0]]
    return float(np.mean((out.astype(np.float64) - x) ** 2))


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_autoencoder_matches_its_recorded_mse(name):
    folder, result = _built(name)
    arrays = _eval(name)
    assert arrays["labels"].ndim == 0 and str(arrays["labels"]) == result["input_name"]  # target = the input
    mse = _reconstruction_mse(graph.load(folder / f"{name}.onnx"), arrays)
    assert mse == pytest.approx(result["eval_mse_onnx"], rel=1e-3)


def test_slim_autoencoder_loses_its_dead_channels_at_under_1pct_mse():
    """The network-slimming variant (L1 on the BatchNorm scales and the ReLU outputs) leaves channels dead behind
    the ReLU; prune's ``dead`` criterion removes them. Channel counts at most the recorded ones, the task MSE
    (measured here on eval.npz against the targets, not taken from the report) at most 1% higher.
    """
    folder, _ = _built("mnist_autoencoder_slim")
    from onnxopt import Budget, PassManager
    from onnxopt.registry import make_pass

    path = folder / "mnist_autoencoder_slim.onnx"
    manager = PassManager(
        [make_pass("prune", criterion="dead")],
        data=str(folder / "calib.npz"),
        eval_data=str(folder / "eval.npz"),
        budget=Budget(max_mse_increase=0.01),
    )
    report = manager.run(path)
    assert report.ok
    proto = ir.serde.serialize_model(report.model)
    inits = {i.name: i for i in proto.graph.initializer}
    channels = [  # output channels of encoder 1, encoder 2, decoder 1, decoder 2 (ConvTranspose weights are IOHW)
        inits[n.input[1]].dims[0 if n.op_type == "Conv" else 1]
        for n in proto.graph.node
        if n.op_type in ("Conv", "ConvTranspose")
    ]
    assert len(channels) == 4 and channels[3] == 1
    assert all(got <= limit for got, limit in zip(channels[:3], SLIM_PRUNED_CHANNELS, strict=True)), channels
    arrays = _eval("mnist_autoencoder_slim")
    before = _reconstruction_mse(graph.load(path), arrays)
    after = _reconstruction_mse(report.model, arrays)
    assert after <= 1.01 * before, (before, after)


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
