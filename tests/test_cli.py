"""The command line as a user meets it: one-line errors, exit codes, nothing written on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxopt import cli
from tests import builders


@pytest.fixture()
def workdir(tmp_path):
    model = builders.save(builders.conv_net(seed=0), tmp_path / "net.onnx")
    x = np.random.default_rng(0).standard_normal((12, 3, 10, 10)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return tmp_path, model


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


BAD_INPUTS = {
    "missing model": (lambda d, m: ["run", d / "nope.onnx", "-o", d / "o.onnx"], "no such file"),
    "truncated model": (lambda d, m: ["run", _truncated(d, m), "-o", d / "o.onnx"], "model"),
    "text file": (lambda d, m: ["run", _text(d), "-o", d / "o.onnx"], "not"),
    "unknown pass": (lambda d, m: ["run", m, "--passes", "simplify,zap", "-o", d / "o.onnx"], "unknown pass 'zap'"),
    "data names": (lambda d, m: ["run", m, "--data", _npz(d, y=np.zeros((4, 3, 10, 10))), "-o", d / "o.onnx"], "'x'"),
    "data shapes": (lambda d, m: ["run", m, "--data", _npz(d, x=np.zeros((4, 1, 28, 28))), "-o", d / "o.onnx"], "shape"),  # noqa: E501
    "data NaN": (lambda d, m: ["run", m, "--data", _npz(d, x=np.full((4, 3, 10, 10), np.nan)), "-o", d / "o.onnx"], "NaN"),  # noqa: E501
    "data dtype": (lambda d, m: ["run", m, "--data", _npz(d, x=np.array([["a"] * 10] * 4)), "-o", d / "o.onnx"], "dtype"),  # noqa: E501
    "missing data file": (lambda d, m: ["run", m, "--data", d / "none.npz", "-o", d / "o.onnx"], "no such file"),
    "output is input": (lambda d, m: ["run", m, "-o", m], "overwrite the input"),
    "output is a directory": (lambda d, m: ["run", m, "-o", d], "directory"),
    "output dir missing": (lambda d, m: ["run", m, "-o", d / "x" / "o.onnx"], "does not exist"),
    "bad option value": (lambda d, m: ["run", m, "-o", d / "o.onnx", "--max-abs", "-1"], "must be >= 0"),
    "option of absent pass": (lambda d, m: ["run", m, "-o", d / "o.onnx", "--simplify-fold-limit", "5"], "not in --passes"),  # noqa: E501
    "inspect missing": (lambda d, m: ["inspect", d / "nope.onnx"], "no such file"),
    "bad input shape": (lambda d, m: ["inspect", m, "--input-shape", "x"], "--input-shape"),
}  # fmt: skip


def _truncated(d, m):
    blob = open(m, "rb").read()
    (d / "cut.onnx").write_bytes(blob[: len(blob) // 3])
    return d / "cut.onnx"


def _text(d):
    (d / "notes.onnx").write_text("not a model\n")
    return d / "notes.onnx"


def _npz(d, **arrays):
    np.savez(d / "bad.npz", **arrays)
    return d / "bad.npz"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_line_exit_2_and_no_output(case, workdir, capsys):
    d, model = workdir
    make_args, fragment = BAD_INPUTS[case]
    before = sorted(os.listdir(d))
    original = open(model, "rb").read()
    with pytest.raises(SystemExit) if case == "bad option value" else _nullcontext() as exc:
        code, _, err = _run(capsys, *make_args(d, model))
    if case == "bad option value":
        code, err = exc.value.code, capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0]
    assert "o.onnx" not in sorted(os.listdir(d)) and not [f for f in os.listdir(d) if f.endswith(".tmp")]
    assert open(model, "rb").read() == original
    assert set(os.listdir(d)) - set(before) <= {"cut.onnx", "notes.onnx", "bad.npz"}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_run_with_no_passes_round_trips_and_reports(workdir, capsys):
    d, model = workdir
    code, out, err = _run(capsys, "run", model, "--passes", "", "--data", d / "calib.npz", "-o", d / "o.onnx",
                          "--report", d / "r.json")  # fmt: skip
    assert code == 0, err
    assert "validation on 12 samples" in out and "ok" in out
    report = json.loads((d / "r.json").read_text())
    assert report["passes"] == [] and report["validation"]["ok"]
    assert report["model"]["before"]["macs"] == report["model"]["after"]["macs"] > 0
    x = np.load(d / "calib.npz")["x"]
    ref = builders.run(onnx.load(model), {"x": x})["y"]
    np.testing.assert_array_equal(builders.run(onnx.load(d / "o.onnx"), {"x": x})["y"], ref)


def test_run_simplify_folds_batchnorm_exactly(workdir, capsys):
    d, model = workdir
    code, out, err = _run(capsys, "run", model, "--passes", "simplify", "--data", d / "calib.npz", "-o", d / "o.onnx")
    assert code == 0, err
    optimized = onnx.load(d / "o.onnx")
    assert "BatchNormalization" not in {n.op_type for n in optimized.graph.node}
    x = np.load(d / "calib.npz")["x"]
    np.testing.assert_allclose(
        builders.run(optimized, {"x": x})["y"], builders.run(onnx.load(model), {"x": x})["y"], rtol=1e-5, atol=1e-5
    )


def test_failed_validation_writes_nothing_unless_forced(workdir, capsys, monkeypatch):
    d, model = workdir
    # A test pass that scales a weight by 1.1 misses a 1e-6 budget.
    from onnxopt import registry
    from tests.test_manager import _ScaleOutput

    monkeypatch.setitem(registry.BUILTIN_PASSES, "scale", "tests.test_manager:_ScaleOutput")
    monkeypatch.setattr(_ScaleOutput, "call", _scale_w2)
    args = ["run", model, "--passes", "scale", "--data", d / "calib.npz", "--max-abs", "1e-6"]
    code, out, _ = _run(capsys, *args, "-o", d / "o.onnx", "--report", d / "r.json")
    assert code == 1 and "nothing written" in out
    assert not (d / "o.onnx").exists()
    assert json.loads((d / "r.json").read_text())["validation"]["ok"] is False
    code, _, _ = _run(capsys, *args, "-o", d / "forced.onnx", "--force")
    assert code == 1 and (d / "forced.onnx").exists()


def _scale_w2(self, model):
    import onnx_ir as ir

    from onnxopt.pass_base import OptResult

    w = model.graph.initializers["w2"]
    w.const_value = ir.tensor(w.const_value.numpy() * 1.1, name="w2")
    return OptResult(model, modified=True)


def test_inspect_and_passes_and_validate(workdir, capsys):
    d, model = workdir
    code, out, _ = _run(capsys, "inspect", model)
    assert code == 0 and "conv1" in out and "total:" in out
    code, out, _ = _run(capsys, "inspect", model, "--json")
    payload = json.loads(out)
    # conv1: 8x10x10 outputs x 3*3*3; conv2: 6x4x4 x 8*3*3; fc: 5 x 6
    assert payload["macs"] == 8 * 100 * 27 + 6 * 16 * 72 + 30
    code, out, _ = _run(capsys, "passes")
    assert code == 0 and out.startswith("simplify")
    code, out, _ = _run(capsys, "validate", model, model, "--data", d / "calib.npz")
    assert code == 0 and "ok" in out


def test_python_m_entry_point_and_debug_traceback(workdir):
    d, model = workdir
    proc = subprocess.run([sys.executable, "-m", "onnxopt", "passes"], capture_output=True, text=True)
    assert proc.returncode == 0 and "simplify" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt", "--debug", "inspect", str(d / "nope.onnx")], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_export_ort_loads_and_matches(workdir, capsys):
    import onnxruntime as ort

    d, model = workdir
    code, out, err = _run(capsys, "export", model, "-o", d / "mobile", "--data", d / "calib.npz")
    assert code == 0, err
    assert (d / "mobile" / "net.ort").exists() and (d / "mobile" / "required_operators.config").exists()
    assert "Conv" in (d / "mobile" / "required_operators.config").read_text()
    session = ort.InferenceSession(str(d / "mobile" / "net.ort"), providers=["CPUExecutionProvider"])
    x = np.load(d / "calib.npz")["x"]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], builders.run(onnx.load(model), {"x": x})["y"],
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_bench_reports_every_model(workdir, capsys):
    d, model = workdir
    code, out, _ = _run(capsys, "bench", model, model, "--threads", "1", "--rounds", "2", "--json")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 2 and rows[0]["macs"] == rows[1]["macs"] > 0
    assert set(rows[0]["latency_us"]["1"]) == {"median", "min", "max"}
    code, _, err = _run(capsys, "bench", model, "--threads", "one")
    assert code == 2 and "--threads" in err
