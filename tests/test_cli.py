"""The command line as a user meets it: one-line errors, exit codes, nothing written on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt import cli
from tests import builders

ROOT_MODELS = Path(__file__).resolve().parents[1] / "models"


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
    "empty model": (lambda d, m: ["run", _write(d, "empty.onnx", b""), "-o", d / "o.onnx"], "file is empty"),
    "truncated model": (lambda d, m: ["run", _truncated(d, m), "-o", d / "o.onnx"], "model"),
    "corrupted model": (lambda d, m: ["run", _corrupted(d, m), "-o", d / "o.onnx"], "not a readable ONNX model"),
    "text file": (lambda d, m: ["run", _text(d), "-o", d / "o.onnx"], "not"),
    "npz as model": (lambda d, m: ["run", _npz(d, x=np.zeros(3)), "-o", d / "o.onnx"], "not a readable ONNX model"),
    "model fails the checker": (lambda d, m: ["run", _unchecked(d), "-o", d / "o.onnx"], "fails the ONNX checker"),
    "opset 27": (lambda d, m: ["run", _opset27(d), "-o", d / "o.onnx"], "opset 27 is not supported"),
    "model is a directory": (lambda d, m: ["run", d, "-o", d / "o.onnx"], "is a directory"),
    "unknown pass": (lambda d, m: ["run", m, "--passes", "simplify,zap", "-o", d / "o.onnx"], "unknown pass 'zap'"),
    "data names": (lambda d, m: ["run", m, "--data", _npz(d, y=np.zeros((4, 3, 10, 10))), "-o", d / "o.onnx"], "'x'"),
    "data shapes": (lambda d, m: ["run", m, "--data", _npz(d, x=np.zeros((4, 1, 28, 28))), "-o", d / "o.onnx"], "shape"),  # noqa: E501
    "data NaN": (lambda d, m: ["run", m, "--data", _npz(d, x=np.full((4, 3, 10, 10), np.nan)), "-o", d / "o.onnx"], "NaN"),  # noqa: E501
    "data Inf": (lambda d, m: ["run", m, "--data", _npz(d, x=_with(np.zeros((4, 3, 10, 10)), np.inf)), "-o", d / "o.onnx"], "Inf"),  # noqa: E501
    "data dtype": (lambda d, m: ["run", m, "--data", _npz(d, x=np.array([["a"] * 10] * 4)), "-o", d / "o.onnx"], "dtype"),  # noqa: E501
    "data dtype complex": (lambda d, m: ["run", m, "--data", _npz(d, x=np.zeros((4, 3, 10, 10), np.complex64)), "-o", d / "o.onnx"], "dtype complex64"),  # noqa: E501
    "data rank": (lambda d, m: ["run", m, "--data", _npz(d, x=np.zeros((4, 300))), "-o", d / "o.onnx"], "shape 4x300"),
    "eval data names": (lambda d, m: ["run", m, "--eval", _npz(d, z=np.zeros((4, 3, 10, 10))), "-o", d / "o.onnx"], "'z'"),  # noqa: E501
    "data labels count": (lambda d, m: ["run", m, "--data", _npz(d, x=np.zeros((4, 3, 10, 10)), labels=np.zeros(3)), "-o", d / "o.onnx"], "'labels'"),  # noqa: E501
    "data not npz": (lambda d, m: ["run", m, "--data", _text(d), "-o", d / "o.onnx"], "not a readable .npz"),
    "missing data file": (lambda d, m: ["run", m, "--data", d / "none.npz", "-o", d / "o.onnx"], "no such file"),
    "output is input": (lambda d, m: ["run", m, "-o", m], "overwrite the input"),
    "output is a directory": (lambda d, m: ["run", m, "-o", d], "directory"),
    "output dir missing": (lambda d, m: ["run", m, "-o", d / "x" / "o.onnx"], "does not exist"),
    # we run as root, which ignores permission bits: an output below a regular file, or in /proc, cannot be written
    "output below a file": (lambda d, m: ["run", m, "-o", d / "net.onnx" / "o.onnx"], "net.onnx is not a directory"),
    "output not writable": (lambda d, m: ["run", m, "-o", "/proc/onnxopt-test.onnx"], "/proc is not writable"),
    "report not writable": (lambda d, m: ["run", m, "-o", d / "o.onnx", "--report", d / "net.onnx" / "r.json"], "is not a directory"),  # noqa: E501
    "bad option value": (lambda d, m: ["run", m, "-o", d / "o.onnx", "--max-abs", "-1"], "must be >= 0"),
    "unknown prune criterion": (lambda d, m: ["run", m, "--passes", "prune", "-o", d / "o.onnx", "--prune-criterion", "bogus"], "invalid choice: 'bogus'"),  # noqa: E501
    "unknown quant mode": (lambda d, m: ["run", m, "--passes", "quant", "-o", d / "o.onnx", "--quant-mode", "bogus"], "invalid choice: 'bogus'"),  # noqa: E501
    "unknown split mode": (lambda d, m: ["run", m, "--passes", "split", "-o", d / "o.onnx", "--split-mode", "bogus"], "invalid choice: 'bogus'"),  # noqa: E501
    "non-numeric option": (lambda d, m: ["run", m, "--passes", "svd", "-o", d / "o.onnx", "--svd-rank", "two"], "invalid int value"),  # noqa: E501
    "out-of-range option": (lambda d, m: ["run", m, "--passes", "prune", "-o", d / "o.onnx", "--prune-ratio", "2"], "ratio"),  # noqa: E501
    "unknown flag": (lambda d, m: ["run", m, "-o", d / "o.onnx", "--prune-bogus", "1"], "unrecognized arguments"),
    "option of absent pass": (lambda d, m: ["run", m, "-o", d / "o.onnx", "--simplify-fold-limit", "5"], "not in --passes"),  # noqa: E501
    "inspect missing": (lambda d, m: ["inspect", d / "nope.onnx"], "no such file"),
    "bad input shape": (lambda d, m: ["inspect", m, "--input-shape", "x"], "--input-shape"),
}  # fmt: skip
# files the case builders above write into the work directory (inputs, never outputs)
_CASE_FILES = {"cut.onnx", "bad.onnx", "notes.onnx", "bad.npz", "empty.onnx", "unchecked.onnx", "opset27.onnx"}


def _write(d, name, blob):
    (d / name).write_bytes(blob)
    return d / name


def _truncated(d, m):
    blob = open(m, "rb").read()
    return _write(d, "cut.onnx", blob[: len(blob) // 3])


def _corrupted(d, m):
    # a run of 0xff bytes is an invalid varint/wire type: protobuf refuses it instead of reading garbage
    blob = open(m, "rb").read()
    return _write(d, "bad.onnx", blob[:40] + b"\xff" * 64 + blob[104:])


def _text(d):
    (d / "notes.onnx").write_text("not a model\n")
    return d / "notes.onnx"


def _npz(d, **arrays):
    np.savez(d / "bad.npz", **arrays)
    return d / "bad.npz"


def _with(array, value):
    array.flat[7] = value
    return array


def _unchecked(d):
    """A model whose node reads a value nothing defines: onnx.checker rejects it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "ghost"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=builders.IR_VERSION)
    onnx.save(model, d / "unchecked.onnx")
    return d / "unchecked.onnx"


def _opset27(d):
    """An opset-27 model: newer than onnxruntime runs (older opsets are upgraded to 7)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 27)], ir_version=8)
    onnx.save(model, d / "opset27.onnx")
    return d / "opset27.onnx"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_line_exit_2_and_no_output(case, workdir, capsys, monkeypatch):
    d, model = workdir
    make_args, fragment = BAD_INPUTS[case]
    systmp = d.parent / f"{d.name}-systmp"  # onnxopt's own temporary files (sessions, saves) go here
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    before = sorted(os.listdir(d))
    original = open(model, "rb").read()
    argv = [str(a) for a in make_args(d, model)]
    inputs = {name: (d / name).read_bytes() for name in os.listdir(d) if (d / name).is_file()}
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse rejects the command line before main's handlers
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0]
    assert set(os.listdir(d)) - set(before) <= _CASE_FILES  # no output, report, temp file or directory
    assert not os.path.exists("/proc/onnxopt-test.onnx")
    assert os.listdir(systmp) == []
    assert open(model, "rb").read() == original
    assert {name: (d / name).read_bytes() for name in inputs} == inputs  # inputs of the case unchanged


def test_own_runs_take_onnxopt_threads_and_latency_one_thread(workdir, capsys, monkeypatch):
    from onnxopt import runtime

    d, model = workdir
    monkeypatch.setenv(runtime.THREADS_ENV, "3")
    assert runtime.work_threads() == 3
    assert runtime.Session(model).inner.get_session_options().intra_op_num_threads == 3
    assert runtime.Session(model, threads=1).inner.get_session_options().intra_op_num_threads == 1
    monkeypatch.delenv(runtime.THREADS_ENV)
    assert 1 <= runtime.work_threads() <= 8
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(runtime.THREADS_ENV, bad)
        with pytest.raises(Exception, match="ONNXOPT_THREADS must be a positive integer"):
            runtime.work_threads()
    code, out, err = _run(capsys, "run", model, "--data", d / "calib.npz", "-o", d / "o.onnx")
    assert code == 2 and err.count("\n") == 1 and "ONNXOPT_THREADS must be a positive integer, got '-1'" in err
    assert not (d / "o.onnx").exists()


def test_run_with_no_passes_is_nothing_to_do(workdir, capsys):
    """`run` without passes would only copy the model (issue 19): exit 2, nothing written; the API still round-trips."""
    from onnxopt import graph
    from onnxopt.manager import PassManager

    d, model = workdir
    code, out, err = _run(capsys, "run", model, "--passes", "", "--data", d / "calib.npz", "-o", d / "o.onnx",
                          "--report", d / "r.json")  # fmt: skip
    assert code == 2 and out == "" and err.count("\n") == 1 and "nothing to do: give --passes" in err
    assert not (d / "o.onnx").exists() and not (d / "r.json").exists()
    result = PassManager([], data=str(d / "calib.npz")).run(model)
    report = result.to_json()
    assert report["passes"] == [] and report["validation"]["ok"] and report["validation"]["samples"] == 12
    assert report["model"]["before"]["macs"] == report["model"]["after"]["macs"] > 0
    x = np.load(d / "calib.npz")["x"]
    ref = builders.run(onnx.load(model), {"x": x})["y"]
    np.testing.assert_array_equal(builders.run(graph.to_proto(result.model), {"x": x})["y"], ref)


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
    args = ["run", model, "--passes", "scale", "--data", d / "calib.npz", "--max-abs", "1e-6", "--allow-small-eval"]
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


# --- MACs and latency at the shapes of the data given (issue 15 part 2, issue 19 item 6) ---

BERT_MACS = 2 * 16 * (4 * 32**2 + 2 * 32 * 64 + 2 * 16 * 32)  # layers x tokens x (4h^2 + 2hf + 2 tokens h)


@pytest.fixture()
def bert(tmp_path):
    """tiny_bert (symbolic batch and sequence), data of 1 x 16 and 4 x 16 tokens."""
    model = builders.save(builders.tiny_bert(layers=2, hidden=32, heads=4, ffn=64), tmp_path / "bert.onnx")
    np.savez(tmp_path / "one.npz", **builders.tiny_bert_feeds(1, 16))
    np.savez(tmp_path / "four.npz", **builders.tiny_bert_feeds(4, 16, seed=1))
    return tmp_path, model


def test_run_bench_and_inspect_count_the_same_macs_at_the_data_shapes(bert, capsys):
    d, model = bert
    shapes = ["--input-shape", "input_ids=1,16", "--input-shape", "attention_mask=1,16"]
    code, out, _ = _run(capsys, "inspect", model, *shapes, "--json")
    assert code == 0 and json.loads(out)["macs"] == BERT_MACS
    written = ["-o", d / "o.onnx", "--report", d / "r.json"]
    for data in ("one.npz", "four.npz"):  # four samples: counted per sample, as inspect counts batch 1
        code, out, _ = _run(capsys, "run", model, "--passes", "simplify", "--data", d / data, *written)
        assert code == 0
        counted = json.loads((d / "r.json").read_text())["model"]
        for side in ("before", "after"):
            assert counted[side]["macs"] == BERT_MACS and counted[side]["macs_partial"] is False
            assert counted[side]["input_shapes"] == {"input_ids": [1, 16], "attention_mask": [1, 16]}
        assert counted["input_shapes_from"].startswith("first batch of")
        assert "MACs counted at input_ids=1x16, attention_mask=1x16 (first batch of" in out
    code, out, _ = _run(capsys, "run", model, "--passes", "simplify", *shapes, *written)
    assert code == 0 and json.loads((d / "r.json").read_text())["model"]["after"]["macs"] == BERT_MACS
    code, out, _ = _run(
        capsys, "bench", model, d / "o.onnx", "--data", d / "four.npz", "--threads", "1", "--rounds", "2", "--json"
    )
    rows = json.loads(out)
    assert code == 0 and [r["macs"] for r in rows] == [BERT_MACS, BERT_MACS]
    assert rows[0]["latency_inputs"] == rows[1]["latency_inputs"] == {"input_ids": [4, 16], "attention_mask": [4, 16]}
    code, out, _ = _run(capsys, "bench", model, *shapes, "--threads", "1", "--rounds", "2", "--json")
    assert code == 0 and json.loads(out)[0]["macs"] == BERT_MACS


def test_run_says_when_its_mac_count_is_partial(bert, capsys):
    d, model = bert  # no data, no --input-shape: the sequence length is unknown
    code, out, _ = _run(
        capsys, "run", model, "--passes", "simplify", "--no-validate", "-o", d / "o.onnx", "--report", d / "r.json"
    )
    assert code == 0
    before = json.loads((d / "r.json").read_text())["model"]["before"]
    assert before["macs"] == 0 and before["macs_partial"] is True
    assert {u["node"] for u in before["uncounted"]} == {
        f"layer{i}/{n}" for i in range(2) for n in ("q", "k", "v", "scores", "context", "out", "ffn1", "ffn2")
    }
    assert "note: MACs before are partial, 16 nodes not counted: layer0/q (MatMul: unknown shapes)" in out


def test_latency_times_the_datas_own_batch_on_dynamic_image_sizes(tmp_path, capsys, monkeypatch):
    from onnxopt import runtime

    model = builders.save(builders.conv_net(size="S"), tmp_path / "net.onnx")  # N x 3 x S x S
    x = np.random.default_rng(0).standard_normal((6, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    timed = []

    def fake_measure(models, feeds, **kwargs):  # record what the timer is given instead of timing it
        timed.append({name: array.shape for name, array in feeds.items()})
        np.testing.assert_array_equal(feeds["x"], x[:4])
        return [runtime.Latency(100.0, 90.0, 110.0, 1) for _ in models]

    monkeypatch.setattr(runtime, "measure_latency", fake_measure)
    report = tmp_path / "r.json"
    argv = ["run", model, "--passes", "simplify", "--data", tmp_path / "d.npz", "--batch-size", "4", "--latency"]
    code, out, err = _run(capsys, *argv, "-o", tmp_path / "o.onnx", "--report", report)
    assert code == 0, err
    assert timed == [{"x": (4, 3, 12, 12)}]
    latency = json.loads(report.read_text())["latency_us"]
    assert latency["inputs"] == {"x": [4, 3, 12, 12]} and latency["inputs_from"].startswith("first batch of")
    assert "latency timed on x=4x3x12x12" in out
    macs = json.loads(report.read_text())["model"]["before"]["macs"]
    code, inspected, _ = _run(capsys, "inspect", model, "--input-shape", "x=1,3,12,12", "--json")
    assert macs == json.loads(inspected)["macs"] > 0


@pytest.mark.parametrize("split", [True, False])
def test_prune_quant_splits_the_budget_unless_told_not_to(tmp_path, capsys, split):
    tiny = ROOT_MODELS / "tiny_mlp"
    argv = ["run", tiny / "tiny_mlp.onnx", "--passes", "prune,quant", "--data", tiny / "calib.npz", "--eval",
            tiny / "eval.npz", "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json"]  # fmt: skip
    code, out, _ = _run(capsys, *argv, *([] if split else ["--no-budget-split"]))
    assert code == 0
    passes = {p["name"]: p for p in json.loads((tmp_path / "r.json").read_text())["passes"]}
    assert passes["prune"]["details"].get("budget_share") == (0.5 if split else None)
    assert passes["quant"]["details"].get("budget_share") is None  # the last lossy pass: the whole budget
    assert ("pass prune: changed" in out) and (("within 0.5 of the budget" in out) == split)


@pytest.mark.parametrize("annotated", [False, True])
def test_the_output_annotates_intermediate_shapes_only_when_its_input_did(tmp_path, capsys, annotated):
    # intermediate shape annotations let onnxruntime fuse more, which is not always faster (MiniLM's
    # SkipLayerNormalization, 4% slower): an input without them gives an output without them
    proto = builders.conv_net(seed=1)
    if annotated:
        proto = onnx.shape_inference.infer_shapes(proto)
    assert bool(proto.graph.value_info) == annotated
    src = builders.save(proto, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((8, 3, 10, 10)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    code, _, err = _run(capsys, "run", src, "--passes", "quant", "--data", tmp_path / "calib.npz", "--allow-small-eval",
                        "--quant-force", "-o", tmp_path / "o.onnx")  # fmt: skip
    assert code == 0, err
    out = onnx.load(tmp_path / "o.onnx")
    produced = {o for n in out.graph.node for o in n.output} - {o.name for o in out.graph.output}
    annotated_values = {v.name for v in out.graph.value_info} & produced
    assert bool(annotated_values) == annotated
