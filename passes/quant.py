"""`quant`: int8 (and 4-bit weight) quantization through onnxruntime's tools, accuracy- and latency-aware.

Before::

    X ─ Conv(W: float32) ─ Relu ─ ...

After (QDQ format, the default ``static`` mode)::

    X ─ Q ─ DQ ─ Conv(DQ(W: int8, per-channel scales, zero point 0)) ─ Q ─ DQ ─ Relu ─ ...

Modes: ``static`` (QDQ, signed int8 activations calibrated on the run's calibration data, symmetric
per-channel int8 weights: the format measured fastest here), ``dynamic`` (int8 weights, activations
quantized at run time) and ``weight4`` (4-bit block-quantized MatMul weights, MatMulNBits). Models below
opset 13 are converted first (per-axis QDQ needs it; onnxruntime's quantizer fails on them otherwise).

Accuracy-aware: when the quantized model misses the run's error budget, the activations whose int8
quantization alone has the lowest SQNR point at the layers that hurt; the nodes writing and reading the
1, 2, 4, ... worst of them (up to ``max_fallback`` activations) stay float until the budget holds, else
the float model is kept and the pass says why. Latency-aware: onnxruntime latency of the float and quantized model
is measured (1 thread, interleaved medians); if int8 is slower and the objective is ``speed``, the float
model is kept unless ``force``. ``objective=size`` keeps int8 whenever it validates.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt import quantize as q
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip

__all__ = ["QuantConfig", "Int8QuantPass"]

logger = logging.getLogger(__name__)

MODES = ("static", "dynamic", "weight4")
CALIBRATION = ("minmax", "entropy", "percentile")
OBJECTIVES = ("speed", "size")


@dataclasses.dataclass(frozen=True)
class QuantConfig(PassConfig):
    mode: str = dataclasses.field(default="static", metadata={"choices": MODES, "help": "quantization kind"})
    calibration: str = dataclasses.field(default="minmax", metadata={"choices": CALIBRATION, "help": "ranges"})
    per_tensor: bool = dataclasses.field(default=False, metadata={"help": "one weight scale per tensor"})
    objective: str = dataclasses.field(default="speed", metadata={"choices": OBJECTIVES, "help": "speed or size"})
    force: bool = dataclasses.field(default=False, metadata={"help": "keep int8 even when it is slower"})
    max_fallback: int = dataclasses.field(default=32, metadata={"help": "noisy activations that may stay float"})

    def __post_init__(self) -> None:
        for field, allowed in (("mode", MODES), ("calibration", CALIBRATION), ("objective", OBJECTIVES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"quant {field} must be one of {', '.join(allowed)}, got {getattr(self, field)!r}")


class Int8QuantPass(OptPass):
    """Quantize to int8 QDQ (or dynamic int8, or 4-bit weights) with onnxruntime; keeps float where int8 hurts."""

    name = "quant"
    exact = False
    config_class = QuantConfig
    simplify_after = False  # constant folding would turn DequantizeLinear(int8 weight) back into float

    def call(self, model: ir.Model) -> OptResult:
        config: QuantConfig = self.config
        context = self.context
        data = context.data if context is not None else None
        if config.mode == "static" and data is None:
            raise ir.passes.PreconditionError("quant: static quantization needs calibration data (--data)")
        with tempfile.TemporaryDirectory(prefix="onnxopt-quant-") as tmp:
            tmp = Path(tmp)
            float_path = q.prepare(graph_io.save(model.clone(), tmp / "float_in.onnx"), tmp / "float.onnx")
            excluded: list[str] = []
            recipe = (not config.per_tensor, False)  # (per-channel weights, unsigned activations)
            quant_path = self._quantize(float_path, tmp / "q.onnx", data, excluded, recipe)
            candidate = graph_io.load(quant_path)
            report = context.check(candidate) if context is not None and context.check is not None else None
            if report is not None and config.mode == "static" and not config.per_tensor:
                # onnxruntime's own recipe (per-tensor weights, uint8 activations) is sometimes the more accurate
                other_path = self._quantize(float_path, tmp / "q_ort.onnx", data, excluded, _ORT_RECIPE)
                other = graph_io.load(other_path)
                other_report = context.check(other)
                if _more_accurate(other_report, report):
                    quant_path, candidate, report, recipe = other_path, other, other_report, _ORT_RECIPE
            if report is not None and not report.ok and config.mode == "static":
                candidate, excluded, report = self._fallback(float_path, tmp, data, report, recipe)
            if report is not None and not report.ok:
                why = "; ".join(report.failures[:2])
                tried = f" even with {len(excluded)} nodes in float" if excluded else ""
                skip = Skip("model", f"int8 misses the budget{tried}: {why}")
                return OptResult(model, modified=False, skipped=[skip])
            speed = self._latency(float_path, quant_path if not excluded else tmp / "q_fallback.onnx", data)
            if speed is not None and speed[1] > speed[0] and config.objective == "speed" and not config.force:
                reason = f"int8 is slower here ({speed[1]:.0f} us vs {speed[0]:.0f} us float); use --quant-force"
                return OptResult(model, modified=False, skipped=[Skip("model", reason)])
            graph_io.adopt(model, candidate)
        note = ", per-tensor weights, uint8 activations (more accurate here)" if recipe == _ORT_RECIPE else ""
        changes = [Change("model", _summary(config, speed) + note)]
        changes += [Change(name, "kept in float (quantization noise)") for name in excluded]
        return OptResult(model, modified=True, changes=changes)

    def _quantize(self, src: Path, dst: Path, data, exclude, recipe: tuple[bool, bool]) -> Path:
        config: QuantConfig = self.config
        if config.mode == "dynamic":
            # per-tensor uint8 weights: onnxruntime's per-channel dynamic path fails on Gemm(transB) graphs
            # and is far slower on Conv here (../shared/FINDINGS.md)
            return q.quantize_dynamic(src, dst, per_channel=False)
        if config.mode == "weight4":
            return q.quantize_weight4(src, dst)
        per_channel, unsigned = recipe
        return q.quantize_static(
            src, dst, data, per_channel=per_channel, method=config.calibration, exclude=exclude,
            quantize_bias=config.objective != "size", unsigned_activations=unsigned,
        )  # fmt: skip

    def _fallback(self, float_path: Path, tmp: Path, data, report, recipe: tuple[bool, bool]):
        """Keep the layers around the noisiest activations in float, doubling their number until the budget holds.

        An activation int8 cannot hold hurts through the node that writes it and the nodes that read it, so
        all of them stay float (onnxruntime then leaves that tensor unquantized).
        """
        noise = q.tensor_noise(float_path, data)
        float_graph = graph_io.load(float_path).graph
        around: dict[str, list[str]] = {}
        for node in float_graph:
            for value in list(node.inputs) + list(node.outputs):
                if value is not None and node.name:
                    around.setdefault(value.name, []).append(node.name)
        tensors = [t for t, _ in sorted(noise.items(), key=lambda kv: kv[1]) if t in around]
        count, candidate, excluded = 1, None, []
        while count <= min(self.config.max_fallback, len(tensors)):
            excluded = list(dict.fromkeys(name for t in tensors[:count] for name in around[t]))
            path = self._quantize(float_path, tmp / "q_fallback.onnx", data, excluded, recipe)
            candidate = graph_io.load(path)
            report = self.context.check(candidate)
            logger.info("quant fallback: %d layers in float -> %s", len(excluded), "ok" if report.ok else "fails")
            if report.ok:
                return candidate, excluded, report
            count *= 2
        return candidate, excluded, report

    def _latency(self, float_path: Path, quant_path: Path, data) -> tuple[float, float] | None:
        from onnxopt.runtime import measure_latency

        source = (self.context.eval_data or data) if self.context is not None else data
        batch = next(iter(source), None) if source is not None else None
        if batch is None:
            return None
        feeds = {k: v[:1] if v.ndim and _dynamic_batch(float_path) else v for k, v in batch.feeds.items()}
        before, after = measure_latency([float_path, quant_path], feeds, rounds=9)
        return before.median_us, after.median_us


# (per-channel weights, unsigned activations): onnxruntime's default recipe, tried beside onnxopt's (True, False)
_ORT_RECIPE = (False, True)


def _more_accurate(a, b) -> bool:
    """Whether validation report ``a`` is strictly better than ``b`` (passing, then accuracy, MSE, cosine)."""
    if a.ok != b.ok:
        return a.ok
    if a.accuracy and b.accuracy:
        return a.accuracy["after"] > b.accuracy["after"]
    if a.task_mse and b.task_mse:
        return a.task_mse["after"] < b.task_mse["after"]
    worst = lambda r: min((d.cosine for d in r.outputs.values()), default=0.0)  # noqa: E731
    return worst(a) > worst(b)


def _dynamic_batch(path: Path) -> bool:
    inputs = graph_io.data_inputs(graph_io.load(path))
    return all(v.shape is None or not isinstance(v.shape[0], int) for v in inputs)


def _summary(config: QuantConfig, speed) -> str:
    what = {"static": "int8 QDQ", "dynamic": "dynamic int8", "weight4": "4-bit weights"}[config.mode]
    if speed is not None:
        what += f", latency {speed[0]:.0f} -> {speed[1]:.0f} us"
    return what
