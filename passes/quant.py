"""`quant`: int8 (and 4-bit weight) quantization through onnxruntime's tools, the recipe chosen by measurement.

Before::

    X ─ Conv(W: float32) ─ Relu ─ ...

After (QDQ format, uint8 activations, per-channel int8 weights: the recipe usually chosen on x86)::

    X ─ Q(uint8) ─ DQ ─ Conv(DQ(W: int8, per-channel scales, zero point 0)) ─ Q(uint8) ─ DQ ─ Relu ─ ...

Which int8 recipe is fastest depends on the CPU and the model (unsigned activations make int8 convolutions
2x faster on AVX-512 VNNI, signed ones give nothing; dynamic int8 suits MatMul-heavy transformers and
slows convolutions), so the pass tries several (:mod:`passes._quant_recipes` lists them and prunes the
ones that cannot win on this model) and measures each:

1. every candidate is quantized (static recipes share one calibration of the float model);
2. the float model and all candidates are timed together in interleaved rounds (onnxruntime, full
   optimizations, 1 thread, at the batch of the run's data; median and spread), and with the ``speed``
   objective a candidate not faster than float by the margin is dropped unchecked; when the data's batch is
   larger than one and the model's batch dynamic, the rest are timed on one sample too, and one clearly slower
   than float there (a device runs one input at a time) is dropped as well;
3. the remaining candidates are checked against the run's budget (``context.check``: the run's task metric),
   fastest first; one slower (by the margin) than a recipe that already holds the budget is not checked
   unless ``check_all``;
   one that misses it gets the accuracy fallback: the activations whose int8 quantization alone has the
   lowest SQNR point at the layers that hurt, and the nodes writing and reading the 1, 2, 4, ... worst of
   them (up to ``max_fallback`` activations) stay float until the budget holds (the most accurate recipe
   first; skipped when a recipe that already holds the budget is faster by the margin: a fallback only adds
   float layers);
4. the fastest recipe that holds the budget wins; recipes within the margin of it tie, and the more accurate,
   then the earlier in the fixed order, wins. If none is faster than float by the margin, the float model is
   kept (unless ``force``); ``objective=size`` takes the smallest model that holds the budget instead.

The pass's changes and skips list every recipe's latency ratio and verdict, and ``OptResult.details``
carries the same as a list (``quant_recipes`` in the JSON report). Models below opset 13 are converted
first (per-axis QDQ needs it; onnxruntime's quantizer fails on them otherwise).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt import latency
from onnxopt import quantize as q
from onnxopt.errors import first_line
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip
from onnxopt.passes import _quant_recipes as recipes
from onnxopt.passes._quant_recipes import Outcome, Recipe

__all__ = ["QuantConfig", "Int8QuantPass"]

logger = logging.getLogger(__name__)

MODES = ("auto", "static", "dynamic", "weight4")
SCREEN_SLOWER = 1.5  # a recipe this much slower than float in a short first timing is not timed further
CALIBRATION = ("minmax", "entropy", "percentile")
OBJECTIVES = ("speed", "size")


@dataclasses.dataclass(frozen=True)
class QuantConfig(PassConfig):
    mode: str = dataclasses.field(default="auto", metadata={"choices": MODES, "help": "quantization kind"})
    calibration: str = dataclasses.field(default="minmax", metadata={"choices": CALIBRATION, "help": "ranges"})
    per_tensor: bool = dataclasses.field(default=False, metadata={"help": "only one-scale-per-tensor recipes"})
    objective: str = dataclasses.field(default="speed", metadata={"choices": OBJECTIVES, "help": "speed or size"})
    force: bool = dataclasses.field(default=False, metadata={"help": "keep int8 even when it is slower"})
    max_fallback: int = dataclasses.field(default=32, metadata={"help": "noisy activations that may stay float"})
    recipes: str = dataclasses.field(default="", metadata={"help": "comma-separated recipes to try (qdq-u8-pc, ...)"})
    margin: float = dataclasses.field(default=0.05, metadata={"help": "relative speed-up that counts as faster"})
    rounds: int = dataclasses.field(default=15, metadata={"help": "interleaved timing rounds"})
    check_all: bool = dataclasses.field(default=False, metadata={"help": "check recipes a faster one already beats"})
    remeasure: bool = dataclasses.field(
        default=False, metadata={"help": "time again instead of reusing an earlier run's record of these candidates"}
    )

    def __post_init__(self) -> None:
        for field, allowed in (("mode", MODES), ("calibration", CALIBRATION), ("objective", OBJECTIVES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"quant {field} must be one of {', '.join(allowed)}, got {getattr(self, field)!r}")
        unknown = [n for n in self.recipe_names() if n not in recipes.BY_NAME]
        if unknown:
            raise ValueError(f"unknown quant recipe(s) {', '.join(unknown)}; known: {', '.join(recipes.BY_NAME)}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"quant margin must be in [0, 1), got {self.margin}")
        if self.rounds < 1:
            raise ValueError(f"quant rounds must be at least 1, got {self.rounds}")

    def recipe_names(self) -> list[str]:
        return [n.strip() for n in self.recipes.split(",") if n.strip()]


class Int8QuantPass(OptPass):
    """Quantize to int8 (the fastest onnxruntime recipe that holds the budget); keeps float where int8 hurts."""

    name = "quant"
    exact = False
    config_class = QuantConfig
    simplify_after = False  # constant folding would turn DequantizeLinear(int8 weight) back into float

    def needs_data(self, model: ir.Model) -> bool:
        return self.config.mode == "static"  # "auto" falls back to dynamic recipes without data

    def call(self, model: ir.Model) -> OptResult:
        config: QuantConfig = self.config
        data = self.context.data if self.context is not None else None
        todo = recipes.candidates(
            recipes.profile(model), mode=config.mode, per_tensor=config.per_tensor, objective=config.objective,
            has_data=data is not None, names=config.recipe_names(),
        )  # fmt: skip
        if not todo:
            if data is None and config.mode in ("auto", "static"):
                raise ir.passes.PreconditionError("quant: static quantization needs calibration data (--data)")
            return OptResult(model, modified=False, skipped=[Skip("model", "no quantization recipe applies here")])
        with tempfile.TemporaryDirectory(prefix="onnxopt-quant-") as tmp:
            search = _Search(self, Path(tmp), data)
            float_us, outcomes = search.run(model, todo)
            winner, why = recipes.choose(
                float_us, outcomes, margin=config.margin, objective=config.objective, force=config.force
            )
            details = _details(float_us, outcomes, winner, search.batch_shape)
            skipped = [Skip(f"recipe {o.recipe.name}", _line(o, float_us, winner)) for o in outcomes if o is not winner]
            if winner is None:
                return OptResult(model, modified=False, skipped=[Skip("model", why), *skipped], details=details)
            # in memory: a >2 GB model's quantized weights may sit in a .data file of the folder removed below
            graph_io.adopt(model, graph_io.in_memory(graph_io.load(search.paths[winner.recipe.name])))
        what = f"{winner.recipe.describe()} [{winner.recipe.name}]: {_line(winner, float_us, winner)}; {why}"
        changes = [Change("model", what)]
        if winner.recipe.kind == "static":
            changes += [Change(name, "input channels padded to 4 (int8's fast path)") for name in search.stem_pads]
        changes += [Change(name, "kept in float (quantization noise)") for name in winner.fallback]
        return OptResult(model, modified=True, changes=changes, skipped=skipped, details=details)


class _Search:
    """Quantizes, times and checks the candidate recipes of one model (files in ``tmp``)."""

    def __init__(self, pass_: Int8QuantPass, tmp: Path, data) -> None:
        self.config: QuantConfig = pass_.config
        self.context = pass_.context
        self.tmp = tmp
        self.data = data
        self.calibration_cache = tmp / "calibration.json"
        self.paths: dict[str, Path] = {}
        self.batch_shape: dict[str, list[int]] = {}
        self._feeds: dict | None = None
        self._noise: dict[str, float] | None = None
        self._as_written: dict[tuple[Path, int], Path] = {}  # a recipe's file -> its model as the run writes it

    def run(self, model: ir.Model, todo: list[Recipe]) -> tuple[float | None, list[Outcome]]:
        config = self.config
        self.float_path = q.prepare(graph_io.save(model.clone(), self.tmp / "float_in.onnx"), self.tmp / "float.onnx")
        # static recipes quantize a copy whose first-layer Convs read 4 channels (int8's fast path), the new
        # Pad nodes kept float, then made uint8 Gathers after the input's quantization (gather_stem_channels);
        # the float model, timed as the baseline, stays as it was
        self.static_path, self.stem_pads = self.float_path, []
        if any(r.kind == "static" for r in todo):
            padded = graph_io.load(self.float_path)
            self.stem_pads = q.pad_stem_channels(padded)
            if self.stem_pads:
                self.static_path = graph_io.save(padded, self.tmp / "float_static.onnx")
        outcomes = [Outcome(r) for r in todo]
        for outcome in outcomes:
            try:
                path = self.quantize(outcome.recipe, (), f"q_{outcome.recipe.name}")
                graph_io.load(path)  # onnx's checker: quantize_dynamic misorders nodes around If/Loop subgraphs
                self.paths[outcome.recipe.name] = path
                outcome.bytes = path.stat().st_size
            except Exception as e:  # onnxruntime's quantizers fail on some graphs; that recipe is out
                outcome.note = f"onnxruntime failed: {first_line(e)}"
                logger.info("quant %s: %s", outcome.recipe.name, outcome.note)
        by_speed = config.objective == "speed"
        float_us = self.time([o for o in outcomes if not o.note], screen=by_speed and not config.force)
        if by_speed and not config.force and float_us is not None:
            for o in outcomes:
                if not o.note and o.latency_us > float_us * (1 - config.margin):
                    # timed before checking: a recipe that cannot beat float needs no (costly) budget check
                    o.note = f"not {config.margin:.0%} faster than float; not checked"
            self.single_guard(model, [o for o in outcomes if not o.note])
        live = [o for o in outcomes if not o.note]
        live.sort(key=lambda o: (o.latency_us or 0.0) if by_speed else (o.bytes or 0))
        ahead: dict[str, ir.Model] = {}  # candidates scored ahead, at once, on an executor (see _prefetch)
        for index, outcome in enumerate(live):
            beaten = [p for p in live if p.passed and _better(p, outcome, by_speed, config.margin)]
            if beaten and not config.check_all:
                # checked fastest first: once a recipe holds the budget, the ones it beats cannot win
                outcome.note = f"{beaten[0].recipe.name} holds the budget and is faster; not checked"
                continue
            if outcome.recipe.name not in ahead:
                ahead = self._prefetch(live[index:])
            candidate = ahead.pop(outcome.recipe.name, None) or graph_io.load(self.paths[outcome.recipe.name])
            self.judge(outcome, self.check(candidate))
        refitted = False
        # the most accurate failing recipe first: it needs the fewest float layers (fewest checks, least speed
        # lost); once one holds the budget, only recipes faster than it (by the margin) are worth repairing
        for outcome in sorted(live, key=lambda o: (o.score is None, -(o.score or 0.0))):
            if outcome.passed is not False or outcome.recipe.kind == "weight4" or config.max_fallback < 1:
                continue
            if self.data is None:
                outcome.note = "misses the budget (no calibration data for a float fallback)"
                continue
            # a fallback only adds float layers: a recipe no faster (by the margin) than one that already holds
            # the budget can at best tie with it, and repairing it costs up to log2(max_fallback) checks
            beaten = [p for p in live if p.passed and _better(p, outcome, by_speed, -config.margin)]
            if beaten:
                outcome.note = f"{beaten[0].recipe.name} holds the budget and is faster; no fallback tried"
                continue
            self.fallback(outcome)
            refitted = refitted or bool(outcome.passed)
        if refitted and float_us is not None:
            float_us = self.time([o for o in outcomes if o.passed is not False and not o.note])
            if by_speed and not config.force:  # float layers change the model's speed at batch 1 too
                self.single_guard(model, [o for o in outcomes if o.passed and o.fallback and not o.note])
        return float_us, outcomes

    def single_guard(self, model: ir.Model, outcomes: list[Outcome]) -> None:
        """Time ``outcomes`` against float on one sample too, when the data's batch is larger and the batch of
        ``model`` (the pass's input) dynamic; a recipe clearly slower than float there
        (:func:`onnxopt.latency.clearly_slower`) is out."""
        feeds = latency.single_sample(self.feeds(), model) if outcomes else None
        if feeds is None:
            return
        paths = self.timed(outcomes)
        figures, _ = latency.compare(paths, feeds, rounds=self.config.rounds, remeasure=self.config.remeasure,
                                     purpose="quant batch-1 guard")  # fmt: skip
        base = figures[0][0]
        for outcome, timed in zip(outcomes, figures[1:], strict=True):
            outcome.single_ratio = timed[0] / base if base > 0 else None
            if latency.clearly_slower(timed, base, self.config.margin):
                outcome.note = (f"slower than float on one sample ({timed[0]:.0f} us against {base:.0f} us, "
                                f"{outcome.single_ratio:.2f}x): not chosen for a batch of 1")  # fmt: skip

    def timed(self, outcomes: list[Outcome]) -> list[Path]:
        """The files timed for float and ``outcomes``: each model in the form the run writes it
        (:func:`onnxopt.graph.file_as_written`: onnxruntime's quantizers annotate every intermediate shape, which the
        run's file drops when its original had none, and with them onnxruntime fused MiniLM's int8 model 13%
        slower)."""
        source = getattr(self.context, "original", None)
        timed = []
        for path in [self.float_path] + [self.paths[o.recipe.name] for o in outcomes]:
            key = (path, path.stat().st_mtime_ns)  # a fallback quantizes to the same file again
            if key not in self._as_written:
                self._as_written[key] = graph_io.file_as_written(path, source)
            timed.append(self._as_written[key])
        return timed

    def quantize(self, recipe: Recipe, exclude, stem: str) -> Path:
        dst = self.tmp / f"{stem}.onnx"
        if recipe.kind == "dynamic":
            return q.quantize_dynamic(
                self.float_path, dst, per_channel=recipe.per_channel, exclude=exclude,
                unsigned_weights=recipe.unsigned_weights,
            )  # fmt: skip
        if recipe.kind == "weight4":
            return q.quantize_weight4(self.float_path, dst)
        path = q.quantize_static(
            self.static_path, dst, self.data, per_channel=recipe.per_channel, method=self.config.calibration,
            exclude=[*exclude, *self.stem_pads], quantize_bias=self.config.objective != "size",
            unsigned_activations=recipe.unsigned, quant_format=recipe.fmt, calibration_cache=self.calibration_cache,
            unsigned_weights=recipe.unsigned_weights, reduce_range=recipe.reduce_range,
        )  # fmt: skip
        if self.stem_pads:  # the stem's padding done in uint8, after the input's quantization
            quantized = graph_io.load(path)  # its weights may stay in path's .data file: saved beside, not over it
            if q.gather_stem_channels(quantized, self.stem_pads):
                (self.tmp / "stem").mkdir(exist_ok=True)
                path = graph_io.save(quantized, self.tmp / "stem" / f"{stem}.onnx")
        return path

    def _prefetch(self, outcomes: list[Outcome]) -> dict[str, ir.Model]:
        """On an executor that scores several candidates at once (``context.parallel`` > 1), the next that many
        recipes not yet checked, loaded and scored together; the checks then read their verdicts in the usual
        order, so the same recipes are checked, judged and chosen as one at a time ({} otherwise)."""
        width = getattr(self.context, "parallel", 1)
        prefetch = getattr(self.context, "prefetch", None)
        if width < 2 or prefetch is None or self.context.check is None:
            return {}
        models = {o.recipe.name: graph_io.load(self.paths[o.recipe.name]) for o in outcomes[:width] if not o.note}
        prefetch(list(models.values()))
        return models

    def check(self, candidate: ir.Model):
        if self.context is None or self.context.check is None:
            return None
        return self.context.check(candidate)

    @staticmethod
    def judge(outcome: Outcome, report) -> None:
        if report is None:
            outcome.metric = "not checked (no budget check)"
            return
        outcome.passed = bool(report.ok)
        outcome.score = recipes.score(report)
        outcome.metric = _verdict(report)
        logger.info("quant %s: %s", outcome.recipe.name, outcome.metric)

    def time(self, outcomes: list[Outcome], screen: bool = False) -> float | None:
        """Time float and ``outcomes`` in interleaved rounds; sets their latencies and returns float's.

        With ``screen``, a first 3-round timing drops recipes over :data:`SCREEN_SLOWER` times float's latency
        (uint8 weights ran EfficientNet-Lite0 6.6x slower than float on an AVX2 CPU: 15 full rounds of it cost
        minutes); they keep the screen's figures and a note.
        """
        feeds = self.feeds()
        paths = self.timed(outcomes)

        def measure() -> dict:
            float_us = self._measure(outcomes, feeds, screen)
            record = [[o.latency_us, o.float_us, o.spread_us, o.note] for o in outcomes]
            return {"float_us": float_us, "outcomes": record}

        def complete(record) -> bool:
            return isinstance(record, dict) and len(record.get("outcomes", ())) == len(outcomes)

        record, reused = latency.recorded(
            paths, feeds, measure, remeasure=self.config.remeasure, valid=complete,
            rounds=self.config.rounds, screen=screen, threads=1,
        )  # fmt: skip
        if reused:
            # the same candidates were timed before on this CPU: the same figures, so the same choice
            for outcome, fields in zip(outcomes, record["outcomes"], strict=True):
                outcome.latency_us, outcome.float_us, outcome.note = fields[0], fields[1], fields[3] or outcome.note
                outcome.spread_us = None if fields[2] is None else tuple(fields[2])
            logger.info("quant: latencies from the record of an earlier run (--quant-remeasure times again)")
        return record["float_us"]

    def _measure(self, outcomes: list[Outcome], feeds: dict, screen: bool) -> float:
        from onnxopt import runtime

        if screen and self.config.rounds > 3 and outcomes:
            paths = self.timed(outcomes)
            quick = runtime.measure_latency(paths, feeds, rounds=3, warmup=1)
            kept = []
            for outcome, latency in zip(outcomes, quick[1:], strict=True):
                if latency.median_us > SCREEN_SLOWER * quick[0].median_us:
                    outcome.latency_us, outcome.spread_us = latency.median_us, (latency.min_us, latency.max_us)
                    outcome.float_us = quick[0].median_us
                    outcome.note = f"over {SCREEN_SLOWER:g}x float's latency in a 3-round screen; not checked"
                else:
                    kept.append(outcome)
            outcomes = kept
        paths = self.timed(outcomes)
        measured = runtime.measure_latency(paths, feeds, rounds=self.config.rounds)
        for outcome, latency in zip(outcomes, measured[1:], strict=True):
            outcome.latency_us, outcome.spread_us = latency.median_us, (latency.min_us, latency.max_us)
            outcome.float_us = measured[0].median_us
        logger.info("quant float latency %.0f us; %s", measured[0].median_us,
                    ", ".join(f"{o.recipe.name} {o.latency_us:.0f} us" for o in outcomes))  # fmt: skip
        return measured[0].median_us

    def feeds(self) -> dict:
        """The first batch of the run's data (evaluation data first): latency at the batch the user runs. Read
        once: every timing of the search uses it."""
        if self._feeds is None:
            self._feeds = latency.run_feeds(self.context, self.float_path)
            self.batch_shape = {k: list(v.shape) for k, v in self._feeds.items()}
        return self._feeds

    def fallback(self, outcome: Outcome) -> None:
        """Keep the layers around the noisiest activations in float, doubling their number until the budget holds.

        An activation int8 cannot hold hurts through the node that writes it and the nodes that read it, so
        all of them stay float (onnxruntime then leaves that tensor unquantized).
        """
        if self._noise is None:
            self._noise = q.tensor_noise(self.float_path, self.data)
        around: dict[str, list[str]] = {}
        for node in graph_io.load(self.float_path).graph:
            for value in list(node.inputs) + list(node.outputs):
                if value is not None and node.name:
                    around.setdefault(value.name, []).append(node.name)
        tensors = [t for t, _ in sorted(self._noise.items(), key=lambda kv: kv[1]) if t in around]
        count, name = 1, outcome.recipe.name
        while count <= min(self.config.max_fallback, len(tensors)):
            excluded = list(dict.fromkeys(n for t in tensors[:count] for n in around[t]))
            try:
                path = self.quantize(outcome.recipe, excluded, f"q_{name}_fallback")
                report = self.check(graph_io.load(path))
            except Exception as e:  # as in run(): an invalid quantized model ends this recipe's fallback
                outcome.passed, outcome.note = False, f"fallback failed: {first_line(e)}"
                return
            logger.info("quant %s fallback: %d layers in float -> %s", name, len(excluded),
                        "ok" if report is None or report.ok else "fails")  # fmt: skip
            outcome.fallback = excluded
            self.judge(outcome, report)
            if report is None or report.ok:
                self.paths[name] = path
                outcome.bytes = path.stat().st_size
                return
            count *= 2
        outcome.note = f"misses the budget even with {len(outcome.fallback)} nodes in float"


def _better(a: Outcome, b: Outcome, by_speed: bool, margin: float) -> bool:
    """Whether ``a`` already beats ``b`` by the margin (speed) or by size, however ``b`` ends up."""
    if by_speed:
        return a.latency_us is not None and b.latency_us is not None and a.latency_us <= b.latency_us * (1 - margin)
    return a.bytes is not None and b.bytes is not None and a.bytes < b.bytes


def _verdict(report) -> str:
    """One phrase for a budget check: the metric before -> after, and ok or the first failure."""
    metric = getattr(report, "metric", None)
    if metric is not None:
        before = "" if metric.before is None else f"{metric.before:.4g} -> "
        drop = "" if metric.drop is None else f" (drop {metric.drop:+.4g})"
        what = f"{metric.name} {before}{metric.after:.4g}{drop}"
    elif report.accuracy:
        drop = report.accuracy["after"] - report.accuracy["before"]
        what = f"accuracy {report.accuracy['before']:.2f} -> {report.accuracy['after']:.2f}% ({drop:+.2f} pp)"
    elif report.task_mse:
        what = f"task MSE {report.task_mse['before']:.4g} -> {report.task_mse['after']:.4g}"
    else:
        cosines = [d.cosine for d in report.outputs.values()]
        what = f"cosine {min(cosines):.5f}" if cosines else "checked"
    return what + (", holds the budget" if report.ok else f", misses the budget: {'; '.join(report.failures[:1])}")


def _line(outcome: Outcome, float_us: float | None, winner: Outcome | None = None) -> str:
    parts = []
    float_us = outcome.float_us or float_us  # float's latency in the timing that measured this recipe
    if outcome.latency_us is not None and float_us:
        low, high = outcome.spread_us or (outcome.latency_us, outcome.latency_us)
        parts.append(f"latency {outcome.latency_us / float_us:.2f}x float ({outcome.latency_us:.0f} us, "
                     f"rounds {low:.0f}-{high:.0f}; float {float_us:.0f} us)")  # fmt: skip
        if outcome.single_ratio is not None and not outcome.note.startswith("slower than float on one sample"):
            parts[-1] += f", {outcome.single_ratio:.2f}x on one sample"
    if outcome.metric:
        parts.append(outcome.metric)
    if outcome.fallback:
        parts.append(f"{len(outcome.fallback)} nodes kept float")
    if outcome.note:
        parts.append(outcome.note)
    elif winner is not None and outcome is not winner:
        parts.append(f"not chosen: {winner.recipe.name} wins")
    elif winner is None and outcome.passed is not False and outcome.latency_us is not None:
        parts.append("not faster than float by the margin")
    return "; ".join(parts) or "not tried"


def _details(float_us, outcomes: list[Outcome], winner: Outcome | None, batch_shape) -> dict:
    return {
        "quant_recipes": [o.to_json() for o in outcomes],
        "quant_chosen": winner.recipe.name if winner is not None else None,
        "quant_float_latency_us": None if float_us is None else round(float_us, 1),
        "quant_latency_feeds": batch_shape,
    }
