"""The onnx wheel's backend test models (``onnx/backend/test/data``), run through onnxopt with their own data.

Each folder holds ``model.onnx`` and ``test_data_set_0/{input,output}_<i>.pb``. The population is the models of
``pytorch-converted``, ``pytorch-operator`` and ``simple`` that onnxruntime itself passes: its outputs match
the ``.pb`` outputs. Fast tests here cover single models named in issue 18; the slow test runs every pass
over the whole population and prints the counts.
"""

from __future__ import annotations

import collections
import glob
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt import cli

BACKEND = Path(onnx.__file__).parent / "backend" / "test" / "data"
SUITES = ("pytorch-converted", "pytorch-operator", "simple")


def _read_pb(path: str) -> np.ndarray:
    tensor = onnx.TensorProto()
    with open(path, "rb") as handle:
        tensor.ParseFromString(handle.read())
    return numpy_helper.to_array(tensor)


def _numbered(folder: Path, kind: str) -> list[np.ndarray]:
    files = glob.glob(str(folder / "test_data_set_0" / f"{kind}_*.pb"))
    return [_read_pb(f) for f in sorted(files, key=lambda f: int(f.rsplit("_", 1)[1].split(".")[0]))]


def backend_case(name: str) -> tuple[Path, dict[str, np.ndarray], list[np.ndarray]]:
    """``(model path, {data input: array}, expected outputs)`` of the backend test model ``suite/test_x``."""
    folder = BACKEND / name
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    names = [value.name for value in model.graph.input if value.name not in weights]
    inputs = _numbered(folder, "input")
    return folder / "model.onnx", dict(zip(names, inputs, strict=True)), _numbered(folder, "output")


def _close(got: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> bool:
    if got.shape != expected.shape:
        return False
    if expected.dtype.kind in "OUSb" or expected.dtype.kind in "iu":
        return bool(np.array_equal(got, expected))
    return bool(np.allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True))


def run_session(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def population() -> list[str]:
    """The backend models with data whose onnxruntime outputs match their ``.pb`` outputs."""
    passing = []
    for suite in SUITES:
        for folder in sorted((BACKEND / suite).iterdir()):
            if not (folder / "test_data_set_0").is_dir():
                continue
            name = f"{suite}/{folder.name}"
            try:
                path, feeds, expected = backend_case(name)
                got = run_session(path, feeds)
            except Exception:  # onnxruntime does not run it: not in the population
                continue
            if len(got) == len(expected) and all(_close(g, e, 1e-3, 1e-5) for g, e in zip(got, expected, strict=True)):
                passing.append(name)
    return passing


def _samples(feeds: dict[str, np.ndarray], count: int, seed: int) -> dict[str, np.ndarray]:
    """The model's own feed, then ``count - 1`` perturbed copies, stacked on the batch axis (axis 0)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, array in feeds.items():
        copies = [array]
        for _ in range(count - 1):
            noise = rng.standard_normal(array.shape) * (0.1 * (np.abs(array).mean() + 1e-3))
            copies.append((array + noise).astype(array.dtype) if array.dtype.kind == "f" else array)
        out[name] = np.concatenate(copies, axis=0)
    return out


# --- issue 18 item 6: simplify writes valid graphs on old IR versions and opsets ----------------------------------

SIMPLIFY_CASES = {
    "pytorch-operator/test_operator_repeat": "IR 3, Constant nodes",
    "pytorch-converted/test_PixelShuffle": "IR 3, Constant nodes",
    "simple/test_sequence_model5": "opset 12, ConcatFromSequence(new_axis=1)",
}


@pytest.mark.parametrize("passes", ["simplify", "quant"])
@pytest.mark.parametrize("name", sorted(SIMPLIFY_CASES))
def test_simplify_writes_a_valid_graph_for_old_ir_versions_and_opsets(name, passes, tmp_path, capsys):
    path, feeds, expected = backend_case(name)
    np.savez(tmp_path / "d.npz", **_samples(feeds, 32, seed=0))
    np.savez(tmp_path / "e.npz", **_samples(feeds, 32, seed=1))
    out = tmp_path / "o.onnx"
    code = cli.main(["run", str(path), "--passes", passes, "--data", str(tmp_path / "d.npz"),
                     "--eval", str(tmp_path / "e.npz"), "-o", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    opset = next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:  # Unsqueeze/Squeeze/Split take axes as an attribute before opset 13
        assert all(len(n.input) == 1 for n in written.graph.node if n.op_type in ("Unsqueeze", "Squeeze"))
    got = run_session(out, feeds)
    tol = 1e-5 if passes == "simplify" else 0.05
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=tol, atol=tol * max(1.0, float(np.abs(e).max())))


# --- issue 18 item 5: opset < 7 is upgraded, not refused --------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch-converted/test_Conv2d", "pytorch-operator/test_operator_sqrt"])
def test_an_opset_6_model_is_upgraded_and_validated(name, tmp_path, capsys):
    path, feeds, expected = backend_case(name)
    assert onnx.load(path).opset_import[0].version == 6
    np.savez(tmp_path / "d.npz", **feeds)
    out = tmp_path / "o.onnx"
    code = cli.main(["run", str(path), "--passes", "simplify", "--data", str(tmp_path / "d.npz"), "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "validation on" in captured.out and ": ok" in captured.out, captured.out + captured.err
    written = onnx.load(out)
    assert next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")) == 7
    for got, want in zip(run_session(out, feeds), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # sqrt of negative inputs: NaN in both


# --- the whole population through every pass (slow suite) ---------------------------------------------------------

CORPUS_RUNS = ["simplify", "prune", "split", "svd", "share", "quant", "compact", "prune,svd,quant"]
EXACT_RUNS = {"simplify", "compact"}


def _cosine(got: np.ndarray, expected: np.ndarray) -> float:
    a, b = got.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return -1.0
    a, b = a[finite], b[finite]
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return 1.0 if norm == 0 and np.allclose(a, b) else float(a @ b / norm) if norm else 0.0


def _right(run: str, got: list[np.ndarray], expected: list[np.ndarray]) -> bool:
    """Exact runs match the .pb outputs (up to float rounding); lossy ones keep cosine >= 0.999 per output."""
    if len(got) != len(expected):
        return False
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            return False
        if e.dtype.kind not in "fc" or run in EXACT_RUNS:
            scale = max(1.0, float(np.nanmax(np.abs(e)))) if e.dtype.kind in "fc" and e.size else 1.0
            if not _close(g, e, 1e-3, 1e-4 * scale):
                return False
        elif _cosine(g, e) < 0.999:
            return False
    return True


def run_corpus(names: list[str], folder: Path, runs: list[str] = CORPUS_RUNS) -> list[dict]:
    """Every run of ``runs`` on every model of ``names``, with the model's own inputs as one stacked feed.

    Each record: model, run, exit code, stderr lines, and ``outcome``: ``preserved`` (exit 0, outputs right),
    ``refused`` (exit 1 or 2 with one line on stderr; nothing written), ``wrong`` (exit 0, outputs wrong) or
    ``crashed`` (anything else: exit 3, a traceback, several stderr lines).
    """
    import contextlib
    import io

    records = []
    for name in names:
        path, feeds, expected = backend_case(name)
        data = folder / (name.replace("/", "__") + ".npz")
        np.savez(data, **{key: value[None] for key, value in feeds.items()})  # one stacked feed (strings: refused)
        for run in runs:
            out = folder / "out.onnx"
            out.unlink(missing_ok=True)
            args = ["run", str(path), "--passes", run, "--data", str(data), "--eval", str(data), "-o", str(out)]
            if run not in EXACT_RUNS:
                args.append("--allow-small-eval")  # one feed: the model's own test input
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    code = cli.main(args)
                except BaseException as e:  # noqa: BLE001 - a crash is what this counts
                    code, stderr = -1, io.StringIO(f"{type(e).__name__}: {e}")
            lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
            if code == 0 and len(lines) == 0:
                try:
                    outcome = "preserved" if _right(run, run_session(out, feeds), expected) else "wrong"
                except Exception:  # noqa: BLE001 - a written model onnxruntime cannot run
                    outcome = "wrong"
            elif code in (1, 2) and len(lines) <= 1 and not out.exists():
                outcome = "refused"
            else:
                outcome = "crashed"
            records.append({"model": name, "run": run, "code": code, "stderr": lines[:3], "outcome": outcome,
                            "stdout": stdout.getvalue()[-400:] if outcome != "preserved" else ""})  # fmt: skip
    return records


@pytest.mark.slow
def test_the_backend_models_go_through_every_pass_with_their_own_data(tmp_path, capsys):
    """0 crashed, 0 wrong outputs, at least 95 of the 100 models preserved by every run, the rest refused."""
    names = population()
    assert len(names) == 100  # what onnxruntime 1.31 passes of the onnx 1.23 wheel's three folders
    records = run_corpus(names, tmp_path)
    by_run = collections.Counter((r["run"], r["outcome"]) for r in records)
    models = collections.defaultdict(set)
    for r in records:
        models[r["model"]].add(r["outcome"])
    preserved = [m for m, outcomes in models.items() if outcomes == {"preserved"}]
    with capsys.disabled():
        print(f"\nbackend corpus: {len(names)} models x {len(CORPUS_RUNS)} runs")
        for run in CORPUS_RUNS:
            print(
                f"  {run}: " + ", ".join(f"{o} {by_run[run, o]}" for o in ("preserved", "refused", "wrong", "crashed"))
            )
        print(f"  models preserved by every run: {len(preserved)} of {len(names)}")
        for r in records:
            if r["outcome"] != "preserved":
                print(f"  {r['outcome']}: {r['model']} {r['run']} exit {r['code']}: {' | '.join(r['stderr'])[:200]}")
    bad = [r for r in records if r["outcome"] in ("crashed", "wrong")]
    assert not bad, bad[:5]
    assert len(preserved) >= 95
