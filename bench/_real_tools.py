"""The tools bench/real.py compares, one function each in TOOLS, and the worker that runs one of them.

Each tool runs in its own process (``python bench/_real_tools.py SPEC.json``) so its wall time and peak memory are
its own. The spec names the model, the calibration and budget ``.npz`` files written by bench/real.py, the task's
kind and onnxopt's budget flags; the worker writes ``out.onnx`` and ``result.json`` (``{"note": ...}``) into the
spec's folder. Peers reuse bench/run.py's calls where they are the same (onnxslim, onnxsim int8, the opset-13 retry).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import _no_qdq, _onnxsim_int8, _onnxslim, _ort_dynamic, _quiet, _retry_opset13  # noqa: E402


@dataclasses.dataclass
class Spec:
    """What the worker needs; also the object bench/run.py's tool functions take as their ``case``."""

    tool: str
    path: Path
    kind: str
    work: Path
    calib_file: Path
    budget_file: Path
    onnxopt_flags: list[str]

    def __post_init__(self) -> None:
        self.path, self.work = Path(self.path), Path(self.work)
        self.calib_file, self.budget_file = Path(self.calib_file), Path(self.budget_file)
        self.calib = dict(np.load(self.calib_file))
        budget = dict(np.load(self.budget_file))
        self.input_name = next(iter(self.calib))
        self.budget = (budget[self.input_name],)
        dim = onnx.load(str(self.path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
        self.batch = dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None

    def calib_batches(self, size: int = 16) -> list[dict[str, np.ndarray]]:
        """The calibration inputs as feed dicts of the model's batch (``size`` when dynamic)."""
        step = self.batch or size
        count = len(self.calib[self.input_name])
        return [{k: v[i : i + step] for k, v in self.calib.items()} for i in range(0, count - count % step, step)]


Tool = Callable[[Spec, Path], tuple[Path, str]]


# ------------------------------------------------------------------------------------------------------- onnxruntime


def _ort_static(activation: str) -> Tool:
    """onnxruntime ``quantize_static``: QDQ, ``activation`` (U8 or S8) activations, S8 per-channel weights."""

    def run(spec: Spec, src: Path, dst: Path) -> Path:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(spec.calib_batches())

            def get_next(self):
                return next(self.batches, None)

        act = QuantType.QUInt8 if activation == "U8" else QuantType.QInt8
        with _quiet():
            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=act, weight_type=QuantType.QInt8)  # fmt: skip
        return dst

    return lambda spec, work: _retry_opset13(lambda s, d: run(spec, s, d))(spec, work)


def _ort_dynamic_tool(spec: Spec, work: Path) -> tuple[Path, str]:
    if spec.kind == "text":  # bench/run.py's opset retry feeds one image input; the encoder is opset 17 anyway
        return _ort_dynamic(spec.path, work / "out.onnx"), ""
    return _retry_opset13(_ort_dynamic)(spec, work)


def _bert_fusion(then_dynamic: bool) -> Tool:
    """onnxruntime.transformers.optimizer (bert, opt_level 0: >= 1 imports torch), optionally then dynamic int8."""

    def tool(spec: Spec, work: Path) -> tuple[Path, str]:
        from onnxruntime.transformers import optimizer

        fused = work / "fused.onnx"
        with _quiet():
            model = optimizer.optimize_model(str(spec.path), model_type="bert", opt_level=0)
            model.save_model_to_file(str(fused))
        counts = model.get_fused_operator_statistics()
        note = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "nothing fused"
        if not then_dynamic:
            return fused, note
        from onnxruntime.quantization import quantize_dynamic

        out = work / "out.onnx"
        with _quiet():  # the fused graph needs DefaultTensorType (FINDINGS)
            quantize_dynamic(str(fused), str(out), extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return out, note

    return tool


# ----------------------------------------------------------------------------------------------------------- onnxsim


def _onnxsim_prune(wanda: bool, sparsity: float) -> Tool:
    def tool(spec: Spec, work: Path) -> tuple[Path, str]:
        import onnxsim

        with _quiet():
            if wanda:
                pruned = onnxsim.apply_structured_wanda_pruning(str(spec.path), spec.calib_batches(), sparsity=sparsity)
            else:
                pruned = onnxsim.apply_structured_pruning(str(spec.path), sparsity=sparsity)
        out = work / "out.onnx"
        onnx.save(pruned, str(out))
        return out, ""

    return tool


def _onnxsim_int8_tool(spec: Spec, work: Path) -> tuple[Path, str]:
    return _retry_opset13(lambda s, d: _onnxsim_int8(s, d, spec), _no_qdq)(spec, work)


def _onnxsim_recommend(spec: Spec, work: Path) -> tuple[Path, str]:
    """onnxsim's ``recommend_quantization`` (its default candidates and budget, calibrated on 8 batches)."""
    import onnxsim

    with _quiet():
        choice = onnxsim.recommend_quantization(str(spec.path), calibration_data=spec.calib_batches()[:8])
    out = work / "out.onnx"
    onnx.save(choice.quantized_model, str(out))
    config = choice.config
    met = "" if choice.meets_budget else "; no candidate met its budget"
    return out, f"chose {config.scheme} {config.dtype} {config.granularity}{met}"


# ----------------------------------------------------------------------------------------------------------- onnxopt


def _run_cli(spec: Spec, work: Path, what: list[str], options: Sequence[str]) -> tuple[int, Path, Path]:
    """``onnxopt run MODEL WHAT --data CALIB --eval BUDGET FLAGS OPTIONS -o out.onnx --report report.json`` in
    ``work``, quiet: its exit code, output and report paths."""
    from onnxopt import cli

    out, report = work / "out.onnx", work / "report.json"
    argv = ["run", str(spec.path), *what, "--data", str(spec.calib_file), "--eval", str(spec.budget_file),
            *spec.onnxopt_flags, *options, "-o", str(out), "--report", str(report)]  # fmt: skip
    with _quiet():
        return cli.main(argv), out, report


def _onnxopt(passes: str, *options: str) -> Tool:
    """onnxopt's CLI (``onnxopt run``) with the task's budget flags: what a user types."""

    def tool(spec: Spec, work: Path) -> tuple[Path, str]:
        code, out, report = _run_cli(spec, work, ["--passes", passes], options)
        if code != 0 or not out.exists():
            raise RuntimeError(f"onnxopt run exited {code}" + (" (validation failed)" if code == 1 else ""))
        record = json.loads(report.read_text())
        lossy = set(passes.split(","))
        idle = [p["name"] for p in record.get("passes", []) if p.get("name") in lossy and not p.get("modified")]
        return out, f"{', '.join(idle)}: no change" if idle else ""

    return tool


GOAL_SECONDS = 300  # --target-time of the goal tool: no pipeline starts after it (real.py's --timeout is 420 s)


def _onnxopt_goal(target: str) -> Tool:
    """onnxopt's goal mode (``onnxopt run --target``) with the task's budget flags: the command issue 16's
    acceptance names. A target not reached still writes the best point within the budget (exit 1): that model is
    the result, and the note says which pipeline it is and whether the target was reached."""

    def tool(spec: Spec, work: Path) -> tuple[Path, str]:
        code, out, report = _run_cli(spec, work, ["--target", target], ["--target-time", str(GOAL_SECONDS)])
        if code not in (0, 1) or not out.exists():
            raise RuntimeError(f"onnxopt run --target exited {code}" + (" (nothing within the budget)" * (code == 1)))
        found = json.loads(report.read_text())["goal"]
        return out, f"{'reached' if found['reached'] else 'not reached'}: {found['chosen']}"

    return tool


# label -> (tool, kinds it applies to). Adding a peer is one entry.
IMAGE, TEXT, BOTH = ("image",), ("text",), ("image", "text")
TOOLS: dict[str, tuple[Tool, tuple[str, ...]]] = {
    "onnxslim": (_onnxslim, BOTH),
    "ort static U8S8": (_ort_static("U8"), IMAGE),
    "ort static S8S8": (_ort_static("S8"), IMAGE),
    "ort dynamic": (_ort_dynamic_tool, BOTH),
    "ort bert fusion": (_bert_fusion(False), TEXT),
    "ort bert fusion+dynamic": (_bert_fusion(True), TEXT),
    "onnxsim L2 30%": (_onnxsim_prune(False, 0.3), IMAGE),
    "onnxsim L2 50%": (_onnxsim_prune(False, 0.5), IMAGE),
    "onnxsim Wanda 30%": (_onnxsim_prune(True, 0.3), IMAGE),
    "onnxsim Wanda 50%": (_onnxsim_prune(True, 0.5), IMAGE),
    "onnxsim int8": (_onnxsim_int8_tool, IMAGE),
    "onnxsim recommend": (_onnxsim_recommend, BOTH),
    "onnxopt simplify": (_onnxopt("simplify"), BOTH),
    "onnxopt quant": (_onnxopt("quant"), IMAGE),
    "onnxopt quant dynamic": (_onnxopt("quant", "--quant-mode", "dynamic"), TEXT),
    "onnxopt prune": (_onnxopt("prune"), IMAGE),
    "onnxopt fuse,quant dynamic": (_onnxopt("fuse,quant", "--quant-mode", "dynamic"), TEXT),
    "onnxopt svd": (_onnxopt("svd"), TEXT),
    "onnxopt prune,quant": (_onnxopt("prune,quant"), IMAGE),
    "onnxopt depth": (_onnxopt("depth"), IMAGE),
    "onnxopt depth,quant": (_onnxopt("depth,quant"), IMAGE),
    "onnxopt svd,quant dynamic": (_onnxopt("svd,quant", "--quant-mode", "dynamic"), TEXT),
    "onnxopt goal latency=0.4": (_onnxopt_goal("latency=0.4"), BOTH),
}


def is_onnxopt(label: str) -> bool:
    return label.startswith("onnxopt")


def high_water_kib(pid: int | str = "self") -> int:
    """A process's peak resident memory (``VmHWM`` in /proc), KiB; 0 when it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def worker(spec_file: str) -> int:
    """Run the spec's tool; write ``result.json`` (``note`` or ``error``) beside it."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    raw = json.loads(Path(spec_file).read_text())
    spec = Spec(**raw)
    result: dict[str, str | int] = {}
    try:
        out, result["note"] = TOOLS[spec.tool][0](spec, spec.work)
        result["out"] = str(out)
    except Exception as e:  # a tool failing is a result
        result["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:160]
    result["peak_kib"] = high_water_kib()
    (spec.work / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
