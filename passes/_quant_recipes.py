"""The `quant` pass's int8 recipes: which ones to try on a model, and which one wins.

A recipe is one way onnxruntime can quantize a model (static QDQ or QOperator with unsigned or signed
activations and per-channel or per-tensor weights, dynamic int8, 4-bit MatMulNBits). Which is fastest
depends on the CPU and the model (on AVX-512 VNNI, unsigned activations make int8 convolutions 2x faster
and signed ones give nothing, ../shared/FINDINGS.md), so the pass measures them; this module only
enumerates the candidates and decides from the measurements, without running anything.

The decision is deterministic given the measurements: a recipe counts as faster than another only by a
margin (5% by default), and recipes within the margin of the fastest are a tie, broken by the task metric
(the more accurate wins) and then by the fixed order of :data:`RECIPES` (the simpler, more portable recipe
first).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from onnxopt import graph as graph_io

__all__ = ["Recipe", "RECIPES", "Outcome", "ModelProfile", "profile", "candidates", "choose", "score"]

CONV_OPS = frozenset({"Conv", "ConvTranspose"})
MATMUL_OPS = frozenset({"MatMul", "Gemm"})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One quantization recipe.

    Attributes:
        name: short stable name (``qdq-u8-pc``: QDQ, uint8 activations, per-channel int8 weights).
        kind: ``static`` (calibrated activations), ``dynamic`` (activations quantized at run time) or
            ``weight4`` (4-bit block-quantized MatMul weights).
        fmt: ``qdq`` or ``qoperator`` (static only).
        unsigned: uint8 activations (static only).
        per_channel: one weight scale per output channel.
        unsigned_weights: uint8 weights (static only; for CPUs where uint8 x int8 saturates).
        reduce_range: 7-bit weights (static only; the same reason).
    """

    name: str
    kind: str
    fmt: str = "qdq"
    unsigned: bool = False
    per_channel: bool = True
    unsigned_weights: bool = False
    reduce_range: bool = False

    def describe(self) -> str:
        if self.kind == "weight4":
            return "4-bit MatMul weights (MatMulNBits)"
        weights = "per-channel" if self.per_channel else "per-tensor"
        if self.kind == "dynamic":
            return f"dynamic int8, {weights} {'uint8' if self.unsigned_weights else 'int8'} weights"
        acts = "uint8" if self.unsigned else "int8"
        kind = "7-bit int8" if self.reduce_range else "uint8" if self.unsigned_weights else "int8"
        return f"int8 {'QDQ' if self.fmt == 'qdq' else 'QOperator'}, {acts} activations, {weights} {kind} weights"


# The fixed order is the last tie-break: QDQ before QOperator (portable, and what onnxruntime fuses into the
# same integer kernels), static before dynamic (no run-time range computation), per-channel before per-tensor
# (more accurate), uint8 activations first (onnxruntime's default, and its fast x86 kernels).
RECIPES: tuple[Recipe, ...] = (
    Recipe("qdq-u8-pc", "static", "qdq", unsigned=True, per_channel=True),
    Recipe("qdq-u8-pt", "static", "qdq", unsigned=True, per_channel=False),
    Recipe("qdq-s8-pc", "static", "qdq", unsigned=False, per_channel=True),
    Recipe("qdq-s8-pt", "static", "qdq", unsigned=False, per_channel=False),
    Recipe("qdq-u8u8-pc", "static", "qdq", unsigned=True, per_channel=True, unsigned_weights=True),
    Recipe("qdq-u8-pc-r7", "static", "qdq", unsigned=True, per_channel=True, reduce_range=True),
    Recipe("qop-u8-pc", "static", "qoperator", unsigned=True, per_channel=True),
    Recipe("dyn-pc", "dynamic", per_channel=True),
    Recipe("dyn-pt", "dynamic", per_channel=False, unsigned_weights=True),
    Recipe("dyn-s8-pt", "dynamic", per_channel=False),  # onnxruntime's quantize_dynamic default
    Recipe("w4", "weight4", per_channel=False),
)
BY_NAME = {r.name: r for r in RECIPES}


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """What the recipe choice needs to know about a model: its conv and constant-weight MatMul/Gemm nodes."""

    convs: int
    matmuls: int


def profile(model: ir.Model) -> ModelProfile:
    convs = matmuls = 0
    for node in model.graph.all_nodes():
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in CONV_OPS:
            convs += 1
        elif node.op_type in MATMUL_OPS and len(node.inputs) > 1 and graph_io.const_array(node.inputs[1]) is not None:
            matmuls += 1
    return ModelProfile(convs, matmuls)


def candidates(
    prof: ModelProfile,
    *,
    mode: str = "auto",
    per_tensor: bool = False,
    objective: str = "speed",
    has_data: bool = True,
    names: Sequence[str] = (),
    saturates: bool | None = None,
) -> list[Recipe]:
    """The recipes worth trying on a model, in the fixed order; pruned so that a run stays fast.

    ``names`` (``--quant-recipes``) picks recipes explicitly and overrides every rule below. Otherwise:

    - static recipes need calibration data; ``mode`` keeps one kind (``static``, ``dynamic``, ``weight4``);
    - QOperator with signed activations is never tried: 10-100x slower than float here (FINDINGS), and
      QOperator is tried only on conv nets (QDQ MatMul fuses into the same integer kernels);
    - dynamic int8 is tried only on models without convolutions (transformers, MLPs): onnxruntime's dynamic
      Conv is slower than float here (5-conv CNN 3262 us float vs 5141 us), so on a conv net it only costs
      time;
    - 4-bit MatMulNBits is a size option (slower than float at small batch here), tried only with the
      ``size`` objective or ``mode=weight4``, and only when there are constant-weight MatMul/Gemm nodes;
    - uint8 weights and 7-bit weights are tried only where uint8 x int8 saturates (``saturates``; by default
      detected: an x86 CPU without VNNI, where onnxruntime's kernels sum pairs of products in int16, so the
      fast uint8-activation recipe loses accuracy: MobileNetV2 -7 pp on an AVX2 EPYC, float simulation -0.3);
    - ``per_tensor`` keeps the per-tensor recipes only.
    """
    if saturates is None:
        saturates = int8_saturates()
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise ValueError(f"unknown quant recipe(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
        wanted = [BY_NAME[n] for n in dict.fromkeys(names)]
        return [r for r in wanted if has_data or r.kind != "static"]
    kinds = {"auto": ("static", "dynamic", "weight4"), "static": ("static",), "dynamic": ("dynamic",),
             "weight4": ("weight4",)}[mode]  # fmt: skip
    chosen = []
    for recipe in RECIPES:
        if recipe.kind not in kinds or (recipe.kind == "static" and not has_data):
            continue
        if per_tensor and recipe.per_channel and recipe.kind != "weight4":
            continue
        if recipe.kind == "static" and (recipe.unsigned_weights or recipe.reduce_range) and not saturates:
            continue
        if recipe.fmt == "qoperator" and (not recipe.unsigned or prof.convs == 0):
            continue
        if recipe.kind == "dynamic" and mode == "auto" and prof.convs:
            continue
        if recipe.kind == "weight4" and (prof.matmuls == 0 or (mode == "auto" and objective != "size")):
            continue
        chosen.append(recipe)
    return chosen


def int8_saturates() -> bool:
    """Whether this CPU's uint8 x int8 kernels may saturate: x86 without (AVX-512 or AVX) VNNI.

    onnxruntime's x86 kernels without VNNI multiply with ``vpmaddubsw``, which adds pairs of uint8 x int8
    products in int16 and saturates; VNNI's ``vpdpbusd`` accumulates in int32. Unknown CPUs count as saturating
    (two more recipes to try, never a wrong result).
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


@dataclasses.dataclass
class Outcome:
    """What was measured for one recipe. ``latency_us``/``spread_us`` are ``None`` until timed."""

    recipe: Recipe
    passed: bool | None = None  # None: not checked (or no budget check available)
    score: float | None = None  # higher is better (see :func:`score`)
    metric: str = ""  # the check's verdict in words
    latency_us: float | None = None
    spread_us: tuple[float, float] | None = None
    float_us: float | None = None  # float's latency in the same interleaved timing (ratios are within one timing)
    single_ratio: float | None = None  # latency over float's on one sample, when the data's batch is larger
    bytes: int | None = None
    fallback: list[str] = dataclasses.field(default_factory=list)  # nodes kept float
    note: str = ""  # why it was not chosen / not checked / failed

    def ratio(self) -> float | None:
        """Latency over float's, both from the same interleaved timing."""
        return self.latency_us / self.float_us if self.latency_us and self.float_us else None

    def to_json(self) -> dict:
        ratio = self.ratio()
        return {
            "recipe": self.recipe.name,
            "description": self.recipe.describe(),
            "latency_us": None if self.latency_us is None else round(self.latency_us, 1),
            "latency_spread_us": None if self.spread_us is None else [round(v, 1) for v in self.spread_us],
            "latency_ratio": None if ratio is None else round(ratio, 4),
            "latency_ratio_batch1": None if self.single_ratio is None else round(self.single_ratio, 4),
            "passed": self.passed,
            "metric": self.metric,
            "bytes": self.bytes,
            "float_nodes": len(self.fallback),
            "note": self.note,
        }


def score(report) -> float:
    """How good a validation report is, higher is better: the task metric (``--metric``), else task accuracy,
    else -task MSE, else the worst cosine."""
    metric = getattr(report, "metric", None)
    if metric is not None:
        return float(metric.after) if metric.higher_is_better else -float(metric.after)
    if report.accuracy:
        return float(report.accuracy["after"])
    if report.task_mse:
        return -float(report.task_mse["after"])
    return min((d.cosine for d in report.outputs.values()), default=-math.inf)


def choose(
    float_us: float | None,
    outcomes: Sequence[Outcome],
    *,
    margin: float = 0.05,
    objective: str = "speed",
    force: bool = False,
) -> tuple[Outcome | None, str]:
    """The winning recipe (``None``: keep float) and the reason in words.

    Only recipes that passed the budget check (or were not checked because no check exists) compete.
    ``speed``: a recipe must be faster than float by ``margin`` (any speed with ``force``); the fastest
    wins, and every recipe within ``margin`` of it ties, broken by :func:`score` then the fixed order.
    ``size``: the smallest file wins (ties by score, then order), at any speed.
    """
    order = {r.name: i for i, r in enumerate(RECIPES)}
    valid = [o for o in outcomes if o.passed is not False and o.note == ""]
    rank = lambda o: (-(o.score if o.score is not None else -math.inf), order[o.recipe.name])  # noqa: E731
    if objective == "size":
        sized = [o for o in valid if o.bytes is not None]
        if not sized:
            return None, _misses(outcomes)
        smallest = min(o.bytes for o in sized)
        return min((o for o in sized if o.bytes == smallest), key=rank), "smallest that holds the budget"
    timed = [o for o in valid if o.latency_us is not None]
    if float_us is None:
        if not valid:
            return None, _misses(outcomes)
        return min(valid, key=rank), "not timed"
    faster = lambda o: o.latency_us <= (o.float_us or float_us) * (1 - margin)  # noqa: E731  (within one timing)
    eligible = timed if force else [o for o in timed if faster(o)]
    if not eligible:
        fast = [o for o in outcomes if o.latency_us is not None and faster(o)]
        if fast and all(o.passed is False for o in fast):
            return None, _misses(fast, f" of the recipes {margin:.0%} faster than float")
        if fast:  # some were ruled out otherwise (slower on one sample, onnxruntime failed, ...)
            reasons = "; ".join(
                f"{o.recipe.name} {'misses the budget' if o.passed is False else o.note.split(':')[0] or 'unusable'}"
                for o in fast
            )
            return None, f"no recipe {margin:.0%} faster than float can be used: {reasons}"
        best = min((o for o in outcomes if o.latency_us is not None), key=lambda o: o.latency_us, default=None)
        if best is None:
            return None, _misses(outcomes)
        reference = best.float_us or float_us
        return None, (f"int8 is not {margin:.0%} faster than float with any recipe (fastest {best.recipe.name}: "
                      f"{best.latency_us:.0f} us vs {reference:.0f} us float); use --quant-force")  # fmt: skip
    fastest = min(o.latency_us for o in eligible)
    tied = [o for o in eligible if o.latency_us <= fastest * (1 + margin)]
    winner = min(tied, key=rank)
    why = "the fastest recipe that holds the budget"
    others = [o.recipe.name for o in tied if o is not winner]
    if others:
        why += f" (ties within {margin:.0%} with {', '.join(others)}: more accurate, or earlier in the fixed order)"
    return winner, why


def _misses(outcomes: Sequence[Outcome], which: str = "") -> str:
    names = ", ".join(o.recipe.name for o in outcomes)
    return f"int8 misses the budget with every one{which} ({names})" if names else "no recipe could be made"
