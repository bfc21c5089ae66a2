"""A goal instead of a recipe: choose the passes that reach a latency or size target within the error budget.

    result = seek("model.onnx", Target.parse("latency=0.5"), data="calib.npz", eval_data="eval.npz",
                  metric="top1", budget=Budget(max_metric_drop=0.5))
    result.reached, result.reason   # the target reached? if not, the facts measured that say why
    result.report                   # a RunReport of the chosen pipeline, against the original (None: nothing held)
    result.points                   # every pipeline tried: metric, cosine, latency, size and MACs ratios

The search walks a ladder of pipelines from cheap to strong (:func:`ladder`), built from what the model has and
what is installed:

- latency: ``quant``; for transformer encoders ``fuse`` and ``fuse,quant`` (onnxruntime's fused attention); for
  MatMul/Gemm-heavy models (at least half of the MACs) ``svd`` and ``svd,quant``; then ``prune`` (refit auto: kept
  where it lets prune go further), ``prune,quant``, ``prune,fuse,quant`` (encoders); for models with residual
  blocks ``depth`` and ``depth,quant`` (whole blocks removed); and with torch ``prune,distill`` and
  ``prune,distill,quant``;
- size: ``quant`` with ``objective=size`` (int8 kept even where it is not faster), ``share``; for MatMul/Gemm-heavy
  models ``svd,quant``; ``prune``, ``prune,quant``, ``prune,share``.

With a budget given, a lossy step another lossy step follows searches within its share of it, as PassManager
splits a pipeline's budget (:func:`split_budget`: in ``prune,quant`` prune gets half, shown
``prune(budget=0.5),quant``); that prune is a point of its own, apart from ``prune`` with the whole budget. Where
``prune`` with the whole budget used no more of it than the later steps' own points leave (less a reserve of a
quarter), the pipeline continues from that point instead (:meth:`_Search.adapt`: MobileNetV2's ``quant`` gains
top-1, so ``prune,quant`` quantizes the model ``prune`` made with the whole budget); if that pipeline then misses
the budget, its last step changes nothing, or it ends no better than its later steps alone (``quant`` on its own),
the split one runs after it. A pipeline with a step that changed nothing (``depth`` that kept every block) is the
model of the pipeline without that step, which is not run again (:meth:`_Search._same_as_run`).

Every pipeline runs through :class:`~onnxopt.manager.PassManager` with the user's budget, metric and data, each of
its lossy passes searching the strongest setting that holds the budget (the strengths). What is expensive is done
once: a pipeline continues from the model of its longest prefix already run (``prune,quant`` quantizes the model
``prune`` produced instead of pruning again; the prune statistics are collected once), and all runs share one
:class:`~onnxopt.validate.Reference`, so the original model runs over the evaluation data once in the whole search.
Each prefix is itself a point. A point is judged against the *original* model (the final validation of its run),
and timed against the original in interleaved rounds by :func:`onnxopt.latency.compare`, as ``quant`` times its
recipes (onnxruntime, all optimizations, 1 intra-op thread, the first batch of the evaluation data, median of
``rounds``; the latency record keeps the figures, so the same command makes the same choice), and when that batch
holds several samples and the model takes any batch size, on its first sample alone too: a latency target is
reached only when both ratios are within it (a phone runs one sample at a time; MobileNetV2's int8 gains less
there, 0.45x against 0.40x at 16). The size ratio is
the serialized size's, the MACs ratio :mod:`onnxopt.cost`'s at the data's shapes.

The search stops at the first point that holds the budget and reaches the target. Otherwise it returns the best
point within the budget (the fastest for a latency target, points within 5% of it tying; the smallest for a size
target; on a tie the better metric, then the earlier, cheaper one) with ``reached = False`` and a reason made of
what was measured: the best ratio and its pipeline, the pipelines that missed the budget and how, what ``quant``
found (the recipe it chose, or why it kept float), whether the CPU has VNNI int8 instructions, the share of the
MACs ``prune`` and ``depth`` keep on their own (:mod:`onnxopt._goal_reason`), and for a latency
target where the best model's time goes, at the batch whose ratio misses (the data's or one sample): the kinds of
kernel that take a tenth of it or more, each with its time against the original's (:mod:`onnxopt.profile`;
MobileNetV2's depthwise convolutions run about as fast in int8 as in float on one sample). Without any point within
the budget, ``report`` is ``None``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxopt import _goal_reason as why
from onnxopt.errors import UsageError, first_line

if TYPE_CHECKING:
    import onnx_ir as ir

    from onnxopt.manager import RunReport
    from onnxopt.profile import Profile

__all__ = ["Target", "Step", "Point", "GoalResult", "ladder", "seek", "split_budget", "pareto_front", "KINDS", "PASSES"]

logger = logging.getLogger(__name__)

KINDS = ("latency", "size")
MATMUL_HEAVY = 0.5  # share of the MACs in Gemm/MatMul from which svd joins the ladder
MARGIN = 0.05  # latency ratios this close (relative) to the best tie when the best point is chosen (quant's margin)
RESERVE = 0.25  # part of the budget _Search.adapt keeps for later lossy steps beyond what their own points used
# every pass the ladder may run (simplify wraps each step): the passes whose options `run --target` accepts
PASSES = frozenset({"simplify", "quant", "fuse", "svd", "prune", "depth", "distill", "share"})


@dataclasses.dataclass(frozen=True)
class Target:
    """What the optimized model should reach, as a ratio to the original: ``latency`` or ``size`` (file bytes)."""

    kind: str
    ratio: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"target '{self.kind}': unknown kind; choose {' or '.join(KINDS)} (e.g. latency=0.5)")
        if not (math.isfinite(self.ratio) and 0 < self.ratio < 1):
            raise UsageError(
                f"target {self.kind}={self.ratio:g}: the ratio to the original must be between 0 and 1, both excluded "
                "(0.5: half the original's)"
            )

    @classmethod
    def parse(cls, text: str) -> Target:
        """``latency=0.5`` or ``size=0.25``. Raises UsageError for anything else."""
        kind, sep, value = str(text).partition("=")
        kind = kind.strip()
        if not sep:
            raise UsageError(f"target '{text}': expected KIND=RATIO, e.g. latency=0.5 or size=0.25")
        if kind not in KINDS:
            raise UsageError(f"target '{text}': unknown kind '{kind}'; choose {' or '.join(KINDS)}")
        try:
            ratio = float(value)
        except ValueError:
            raise UsageError(f"target '{text}': '{value}' is not a number") from None
        return cls(kind, ratio)

    def describe(self) -> str:
        return f"{self.kind} <= {self.ratio:g}x the original's"

    def value(self, point: Point) -> float | None:
        """The point's ratio this target is about; for latency the worse of the data's batch and one sample."""
        if self.kind == "size":
            return point.size_ratio
        ratios = [r for r in (point.latency_ratio, point.latency_ratio_batch1) if r is not None]
        return max(ratios) if ratios else None


@dataclasses.dataclass(frozen=True)
class Step:
    """One pass of a candidate pipeline, with the options the ladder gives it (the user's options win)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    share: float = 1.0  # the part of the budget its search gets: more lossy steps follow (see split_budget)

    @property
    def label(self) -> str:
        shown = [f"{k}={v}" for k, v in self.options if k == "objective"]
        if self.share < 1:
            shown.append(f"budget={self.share:.2g}")
        return f"{self.name}({','.join(shown)})" if shown else self.name


def _pipeline(steps: Sequence[Step]) -> str:
    return ",".join(s.label for s in steps)


def split_budget(steps: Sequence[Step]) -> tuple[Step, ...]:
    """``steps`` with the budget shares :class:`~onnxopt.manager.PassManager` gives the same pipeline: of n steps
    whose pass spends budget, the k-th searches within k/n of it. ``prune`` followed by ``quant`` is a different
    point from ``prune`` alone (half the budget against all of it), and runs on its own."""
    from onnxopt import registry
    from onnxopt.manager import budget_shares

    shares = budget_shares([registry.get_pass(step.name).spends() for step in steps])
    return tuple(dataclasses.replace(s, share=shares.get(i, 1.0)) for i, s in enumerate(steps))


@dataclasses.dataclass
class Point:
    """One pipeline tried: how it scores against the original, and what it cost to get there.

    ``seconds`` is this point's own cost: its pass run (continuing from its prefix's model), validation and timing.
    Ratios are to the original model; ``metric_*`` are the task metric's (``--metric``), else accuracy's (labels),
    else ``None``; ``cosine`` is the worst per-sample cosine over the outputs. ``ok``: within the budget;
    ``reached``: within the budget and at or under the target.
    """

    pipeline: str
    ok: bool = False
    reached: bool = False
    metric: str | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    metric_drop: float | None = None
    metric_higher_is_better: bool = True
    cosine: float | None = None
    latency_ratio: float | None = None
    latency_us: float | None = None
    original_latency_us: float | None = None  # the original's, in the same interleaved timing
    latency_ratio_batch1: float | None = None  # on one sample, when the data's batch is larger and the model takes it
    latency_batch1_us: float | None = None
    original_latency_batch1_us: float | None = None
    size_ratio: float | None = None
    bytes: int | None = None
    macs_ratio: float | None = None
    seconds: float = 0.0
    note: str = ""
    same_as: str | None = None  # the earlier point whose model this one is (its last pass changed nothing)
    on_front: bool = False

    def to_json(self) -> dict[str, Any]:
        def r(value: float | None, digits: int = 4) -> float | None:
            return None if value is None or not math.isfinite(value) else round(value, digits)

        return {
            "pipeline": self.pipeline,
            "within_budget": self.ok,
            "reached": self.reached,
            "metric": self.metric,
            "metric_before": r(self.metric_before),
            "metric_after": r(self.metric_after),
            "metric_drop": r(self.metric_drop),
            "metric_higher_is_better": self.metric_higher_is_better,
            "cosine": r(self.cosine, 6),
            "latency_ratio": r(self.latency_ratio),
            "latency_us": r(self.latency_us, 1),
            "original_latency_us": r(self.original_latency_us, 1),
            "latency_ratio_batch1": r(self.latency_ratio_batch1),
            "latency_batch1_us": r(self.latency_batch1_us, 1),
            "original_latency_batch1_us": r(self.original_latency_batch1_us, 1),
            "size_ratio": r(self.size_ratio),
            "bytes": self.bytes,
            "macs_ratio": r(self.macs_ratio),
            "seconds": round(self.seconds, 2),
            "pareto_front": self.on_front,
            "same_as": self.same_as,
            "note": self.note,
        }


@dataclasses.dataclass
class GoalResult:
    """The outcome of :func:`seek`; ``report`` and ``model`` are the chosen point's (``None``: no point held)."""

    target: Target
    points: list[Point]
    chosen: Point | None
    reached: bool
    reason: str
    report: RunReport | None
    passes: list  # the chosen pipeline's pass objects, in order (simplify included): what `--config` repeats
    latency_inputs: dict[str, list[int]]
    latency_from: str
    skipped: list[str]
    seconds: float
    # a latency target not reached: the original's and the chosen model's profiles (onnxopt.profile), or None
    profiles: dict[str, Profile] | None = None

    @property
    def model(self) -> ir.Model | None:
        return None if self.report is None else self.report.model

    def to_json(self) -> dict[str, Any]:
        return {
            "target": {"kind": self.target.kind, "ratio": self.target.ratio},
            "reached": self.reached,
            "chosen": None if self.chosen is None else self.chosen.pipeline,
            "reason": self.reason,
            "latency_inputs": self.latency_inputs,
            "latency_from": self.latency_from,
            "points": [p.to_json() for p in self.points],
            "not_tried": list(self.skipped),
            "seconds": round(self.seconds, 2),
            "profile": None if self.profiles is None else {k: p.to_json() for k, p in self.profiles.items()},
        }


def ladder(
    model: ir.Model,
    target: Target,
    *,
    torch: bool | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[list[tuple[Step, ...]], list[str]]:
    """The candidate pipelines for ``model``, cheap to strong, and the ones left out with why.

    ``torch``: whether the ``distill`` pass can run (default: torch is importable); ``input_shapes``: the shapes
    the MACs are counted at (the data's: a symbolic sequence length leaves MatMul MACs uncounted).
    """
    from onnxopt.blocks import blocks as residual_blocks

    if torch is None:
        torch = importlib.util.find_spec("torch") is not None
    heavy = _matmul_share(model, input_shapes) >= MATMUL_HEAVY
    encoder = _has_attention(model)
    residual = bool(residual_blocks(model, shapes={}))
    prune, fuse = Step("prune"), Step("fuse")  # prune's refit: auto, kept where it lets prune go further
    skipped = []
    if target.kind == "latency":
        quant = Step("quant")
        pipelines: list[tuple[Step, ...]] = [(quant,)]
        if encoder:  # onnxruntime's fused attention, then int8 (QAttention); fuse goes after prune, never before
            pipelines += [(fuse,), (fuse, quant)]
        if heavy:
            pipelines += [(Step("svd"),), (Step("svd"), quant)]
        pipelines += [(prune,), (prune, quant)]
        if encoder:
            pipelines.append((prune, fuse, quant))
        if residual:  # whole blocks: ResNet-56's goal reaches 0.36x with depth,quant, where prune,quant stays at 0.40x
            pipelines += [(Step("depth"),), (Step("depth"), quant)]
        if torch:
            pipelines += [(prune, Step("distill")), (prune, Step("distill"), quant)]
        else:
            skipped.append("prune,distill,quant: torch is not installed (pip install 'onnxopt[torch]')")
    else:
        quant = Step("quant", (("objective", "size"),))
        pipelines = [(quant,), (Step("share"),)]
        if heavy:
            pipelines.append((Step("svd"), quant))
        pipelines += [(prune,), (prune, quant), (prune, Step("share"))]
    if not heavy:
        skipped.append(f"svd: Gemm/MatMul hold under {MATMUL_HEAVY:.0%} of the MACs")
    return [split_budget(p) for p in pipelines], skipped


def seek(
    model: str | os.PathLike,
    target: Target,
    *,
    data: Any = None,
    eval_data: Any = None,
    budget: Any = None,
    metric: str | Callable[..., Any] | None = None,
    metric_output: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    pipelines: Sequence[str | Sequence[Step | str]] | None = None,
    batch_size: int = 16,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    simplify: bool = True,
    holdout: float | None = None,
    min_eval_samples: int = 0,
    executor: Any = None,
    progress: Callable[[Any], None] | None = None,
    on_point: Callable[[Point], None] | None = None,
    rounds: int = 15,
    remeasure: bool = False,
    max_seconds: float | None = None,
) -> GoalResult:
    """Search the :func:`ladder` for a pipeline that reaches ``target`` within the budget; see the module docstring.

    Args:
        model: the original model file (never changed).
        target: the latency or size ratio to reach.
        data, eval_data, budget, metric, metric_output, batch_size, input_shapes, seed, simplify, holdout,
            min_eval_samples, executor, progress: as :class:`~onnxopt.manager.PassManager` takes them, for
            every run.
        options: pass options by pass name (``{"prune": {"refit": False}}``), over the ladder's own.
        pipelines: the candidates instead of :func:`ladder`'s (``"prune,quant"``, or lists of pass names or
            :class:`Step` objects), tried in the order given.
        on_point: called with each point as soon as it is measured (the CLI prints it).
        rounds: interleaved timing rounds per point; ``remeasure``: time again instead of reusing the record.
        max_seconds: a time budget for the whole search: no pipeline starts after it, and a running search stops
            at its next budget check (that point is recorded as stopped); the best within the budget so far wins.

    Raises:
        UsageError: no calibration data (every goal pipeline is lossy); errors of the first run (bad data, a metric
            that cannot be computed) as :class:`~onnxopt.manager.PassManager` raises them.
    """
    from onnxopt import graph as graph_io
    from onnxopt.executor import make_executor
    from onnxopt.validate import Reference

    if data is None:
        raise UsageError("--target needs calibration data: give --data (every pipeline it tries is lossy)")
    start = time.perf_counter()
    original = graph_io.load(model)
    # the first batch of the evaluation data (else the calibration data), as quant times its recipes
    feeds = _timing_feeds(original, eval_data, data, batch_size, input_shapes, seed)
    if pipelines is None:
        candidates, skipped = ladder(original, target, input_shapes=feeds.shapes)
    else:
        candidates = [
            split_budget(
                [s if isinstance(s, Step) else Step(s.strip()) for s in (p.split(",") if isinstance(p, str) else p)]
            )
            for p in pipelines
        ]
        skipped = []
    if budget is None:  # the default budget is the manager's to choose (labels or not): not split
        candidates = [tuple(dataclasses.replace(s, share=1.0) for s in c) for c in candidates]
    manager_args = {
        "data": data, "eval_data": eval_data, "budget": budget, "batch_size": batch_size, "input_shapes": input_shapes,
        "seed": seed, "progress": progress, "metric": metric, "metric_output": metric_output, "holdout": holdout,
        "min_eval_samples": min_eval_samples, "executor": make_executor(executor),
    }  # fmt: skip
    search = _Search(Path(model), target, manager_args, options or {}, simplify, rounds, remeasure, on_point)
    search.start_timer(start, max_seconds)
    search.reference = Reference(Path(model))  # the original's outputs, computed once for every run
    search.feeds = feeds
    from onnxopt.latency import single_sample

    search.one_sample = single_sample(feeds.feeds, Path(model))  # a latency target holds on one sample too
    with tempfile.TemporaryDirectory(prefix="onnxopt-goal-") as tmp:
        search.tmp = Path(tmp)
        chosen = search.run(candidates, skipped)
    points = search.points
    reached = chosen is not None
    if chosen is None:
        chosen = _best(points, target)
    pareto_front(points, target)
    stage = next((s for s in search.stages.values() if s.point is chosen), None) if chosen is not None else None
    report = _combined(stage.chain, search.base) if stage is not None and stage.chain else None
    profiles = None
    if not reached and target.kind == "latency" and report is not None and chosen.latency_us is not None:
        # at the batch whose ratio misses the target (the worse of the two)
        one = search.one_sample is not None and (chosen.latency_ratio_batch1 or 0) > (chosen.latency_ratio or 0)
        profiles = why.profiles(Path(model), report.model, search.one_sample if one else feeds.feeds)
    where = why.where_text(chosen, profiles) if profiles is not None else ""
    reason = why.reason(target, points, chosen, reached, search.stages, skipped, search.time_note, where)
    return GoalResult(
        target, points, chosen, reached, reason, report, list(stage.passes) if stage is not None else [],
        feeds.shapes, feeds.source, skipped, time.perf_counter() - start, profiles,
    )  # fmt: skip


def pareto_front(points: Sequence[Point], target: Target) -> list[Point]:
    """Mark (``on_front``) and return the points within the budget that no other such point beats on both the
    target's ratio (lower is better) and the metric (the task metric, else accuracy, else cosine; higher is better,
    a drop counts as its negative). A point that repeats an earlier one's model (``same_as``) is not on it."""
    scored = [(p, target.value(p), _quality(p)) for p in points if p.ok and p.same_as is None]
    scored = [(p, x, y) for p, x, y in scored if x is not None and y is not None]
    front = []
    for p, x, y in scored:
        p.on_front = not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for _, x2, y2 in scored)
        if p.on_front:
            front.append(p)
    return front


# --- internals ------------------------------------------------------------------------------------------------


class _Search:
    """The walk over the candidates: one PassManager run per new prefix, each point measured as it comes."""

    def __init__(self, original: Path, target: Target, manager_args: dict, options, simplify, rounds, remeasure,
                 on_point) -> None:  # fmt: skip
        self.original = original
        self.target = target
        self.manager_args = manager_args
        self.options = {name: dict(values) for name, values in options.items()}
        self.simplify = simplify
        self.rounds, self.remeasure = rounds, remeasure
        self.on_point = on_point
        self.reference = None  # a Reference of the original, shared by every run
        self.tmp: Path | None = None
        self.feeds = None  # the timing feeds (runtime.TimingFeeds)
        self.one_sample = None  # their first sample alone, when the batch is larger and the model takes one
        self.base = None  # the original's cost at the data's shapes: the first run's "before"
        self.stages: dict[tuple[Step, ...], _Stage] = {}
        self.points: list[Point] = []
        self.deadline: float | None = None
        self.time_note = ""  # set when the time budget ran out

    def start_timer(self, start: float, max_seconds: float | None) -> None:
        """Start the time budget (``None``: none): every run's budget checks go through :meth:`_watch`."""
        self.max_seconds = max_seconds
        if max_seconds is not None:
            self.deadline = start + max_seconds
        forward = self.manager_args.get("progress")
        self.manager_args["progress"] = lambda event: self._watch(event, forward)

    def _watch(self, event, forward) -> None:
        """Forward a progress event; past the deadline, stop the running search at its budget check."""
        if forward is not None:
            forward(event)
        if event.kind == "trial" and self._late():
            raise _OutOfTime(self.time_note)

    def _late(self) -> bool:
        if self.deadline is None or time.perf_counter() <= self.deadline:
            return False
        self.time_note = self.time_note or f"the time budget of {self.max_seconds:g} s ran out"
        return True

    def run(self, candidates: Sequence[tuple[Step, ...]], skipped: list[str]) -> Point | None:
        """Walk ``candidates`` in order; returns the first point that reaches the target (``None``: none did).
        A candidate whose prefix failed or missed the budget is not continued (``skipped`` says so). A candidate
        :meth:`adapt` continues from a whole-budget point runs so first, and as split when that misses the budget,
        its last step changes nothing (prune used so much of the budget that quant kept float) or it ends no better
        than its later steps alone (:meth:`_beaten`)."""
        for candidate in candidates:
            for steps in dict.fromkeys((self.adapt(candidate), candidate)):
                stop, held = self._walk(steps, candidates, skipped)
                if stop:  # a point reached the target (the last one), or the time ran out
                    return next((p for p in self.points if p.reached), None)
                if held:
                    break
        return None

    def adapt(self, candidate: tuple[Step, ...]) -> tuple[Step, ...]:
        """``candidate`` with a step its split gives part of the budget replaced by its own point with the whole
        budget (share 1, that model: not run again), when that point used no more of the budget than the lossy
        steps after it leave on their own (their single-step points, measured against the original:
        :func:`onnxopt.budget.spent`) less :data:`RESERVE`, kept for those steps' noisy measure. MobileNetV2's
        ``quant`` gains top-1 on its 650 budget images, and ``prune`` with the whole budget used 0.31 of it (in one
        run, where the search within half of it found nothing): ``prune,quant`` quantizes that model.
        EfficientNet-Lite0's ``prune`` used 0.92 of it, after which ``quant`` kept float: the split stays.
        Unchanged without a budget, or when a point it needs is missing or did not hold."""
        from onnxopt import registry
        from onnxopt.budget import spent

        budget = self.manager_args.get("budget")
        if budget is None:
            return candidate
        steps = list(candidate)
        for i, step in enumerate(candidate):
            if step.share >= 1:
                continue
            later = [s for s in candidate[i + 1 :] if registry.get_pass(s.name).spends()]
            whole = self.stages.get((*steps[:i], dataclasses.replace(step, share=1.0)))
            needed = [self.stages.get((dataclasses.replace(s, share=1.0),)) for s in later]
            if not later or not all(_held(stage) for stage in (whole, *needed)):
                continue
            used = [spent(stage.chain[-1].validation, budget) for stage in (whole, *needed)]
            if any(u is None for u in used):
                continue
            if used[0] <= 1 - sum(used[1:]) - RESERVE:
                steps[i] = dataclasses.replace(step, share=1.0)
        return tuple(steps)

    def _walk(self, candidate: tuple[Step, ...], candidates, skipped: list[str]) -> tuple[bool, bool]:
        """Run ``candidate``'s prefixes not run yet. Returns (whether the search ends here: a point reached the
        target or the time ran out; whether the candidate's last point holds the budget with a model of its own,
        its last step having changed something, and beats its later steps alone: :meth:`_beaten`)."""
        for length in range(1, len(candidate) + 1):
            prefix = candidate[:length]
            if prefix in self.stages:
                continue
            same = self._same_as_run(prefix)
            if same is not None:  # not run again: the stage of the prefix that gives its model
                self.stages[prefix] = self.stages[same]
                skipped.append(f"{_pipeline(prefix)}: the same model as {_pipeline(same)}")
                continue
            parent = self.stages.get(prefix[:-1]) if length > 1 else None
            if length > 1 and (parent is None or parent.model is None):
                failed = parent is None or parent.point.note.startswith("failed")
                skipped.append(f"{_pipeline(candidate)}: {_pipeline(prefix[:-1])} "
                               f"{'failed' if failed else 'misses the budget'}")  # fmt: skip
                break
            if self._late():
                self._skip_rest(candidates, skipped)
                return True, False
            point = self._step(prefix, parent)
            self.points.append(point)
            logger.info("goal %s: %s", point.pipeline, point.to_json())
            if self.on_point is not None:
                self.on_point(point)
            if point.reached:
                return True, True
            if self.time_note:
                self._skip_rest(candidates, skipped)
                return True, False
            if not point.ok:
                break
        last = self.stages.get(candidate)
        return False, last is not None and last.point.ok and last.point.same_as is None and not self._beaten(candidate)

    def _beaten(self, candidate: tuple[Step, ...]) -> bool:
        """Whether a later step of ``candidate`` alone (its single-step point, whole budget) reached a ratio at least
        as good as the candidate's last point: EfficientNet-Lite0's ``depth,quant`` from the whole-budget ``depth``
        left ``quant`` so little budget that it kept 34 layers float, 0.59x against ``quant``'s 0.45x."""
        mine = self.target.value(self.stages[candidate].point)
        for step in candidate[1:]:
            alone = self.stages.get((dataclasses.replace(step, share=1.0),))
            theirs = self.target.value(alone.point) if alone is not None and alone.point.ok else None
            if mine is not None and theirs is not None and theirs <= mine:
                return True
        return False

    def _skip_rest(self, candidates, skipped: list[str]) -> None:
        """The time budget ran out: the candidates not run yet are not tried, and ``skipped`` says why."""
        left = dict.fromkeys(_pipeline(c) for c in candidates if c not in self.stages)
        if left:
            skipped.append(f"{', '.join(left)}: {self.time_note}")

    def _step(self, prefix: tuple[Step, ...], parent: _Stage | None) -> Point:
        """Run the last step of ``prefix`` on its parent's model (the original's for the first), judged against the
        original, then time and measure the result; records the stage."""
        from onnxopt import graph as graph_io
        from onnxopt.manager import PassManager

        step, point = prefix[-1], Point(_pipeline(prefix))
        passes = _passes(step, self.options, self.simplify)
        args = self.manager_args
        if step.share < 1:
            args = {**args, "budget": args["budget"].share(step.share)}
        manager = PassManager(passes, simplify=False, **args)
        t0 = time.perf_counter()
        start = graph_io.clone(parent.model) if parent is not None else graph_io.load(self.original)
        try:
            report = manager.run(start, original=self.reference)
        except (Exception, _OutOfTime) as e:
            if isinstance(e, _OutOfTime):  # raised from a budget check of this run
                point.note = f"stopped: {self.time_note} during its search"
            elif not self.points:
                raise  # the first run: bad data, a metric that cannot be computed... (exit 2 / 3)
            else:
                point.note = f"failed: {first_line(e)}"
            point.seconds = time.perf_counter() - t0
            self.stages[prefix] = _Stage(None, [], [], point)
            return point
        if self.base is None and parent is None:
            self.base = report.before
        if any(r.modified for r in report.passes):
            # timed as it would be written (without the shape annotations the original file has not)
            path = graph_io.save_as_written(report.model, self.tmp / f"point{len(self.points)}.onnx", self.original)
            point.latency_us, point.original_latency_us = _time(
                self.original, path, self.feeds.feeds, self.rounds, self.remeasure
            )
            if self.target.kind == "latency" and self.one_sample is not None:
                point.latency_batch1_us, point.original_latency_batch1_us = _time(
                    self.original, path, self.one_sample, self.rounds, self.remeasure
                )
        else:  # nothing changed: the model of its prefix (or the original), whose figures it takes
            point.same_as = (parent.point.same_as or parent.point.pipeline) if parent else "original"
            point.note = f"the same model as {point.same_as} ({step.name} changed nothing)"
            if parent is not None:
                point.latency_us, point.original_latency_us = parent.point.latency_us, parent.point.original_latency_us
                point.latency_batch1_us = parent.point.latency_batch1_us
                point.original_latency_batch1_us = parent.point.original_latency_batch1_us
        _fill(point, report, self.base, self.target)
        if not point.ok:
            point.note = point.note or _failure(report)
        point.seconds = time.perf_counter() - t0
        chain = [*(parent.chain if parent is not None else []), report]
        used = [*(parent.passes if parent is not None else []), *passes]
        idle = not any(r.modified for r in report.passes if r.name == step.name)
        self.stages[prefix] = _Stage(report.model if point.ok else None, chain, used, point, idle)
        return point

    def _same_as_run(self, prefix: tuple[Step, ...]) -> tuple[Step, ...] | None:
        """A prefix already run that gives ``prefix``'s model: ``prefix`` without its steps that changed nothing
        (a lossy step that changed nothing with the whole budget changes nothing with a share of it either), when
        that is shorter and has run; else None. MobileNetV2's ``depth`` removes no block, so ``depth,quant`` is
        ``quant``, and a ``distill`` that kept nothing makes ``prune,distill,quant`` ``prune,quant``."""

        def idle(i: int) -> bool:
            stage = self.stages.get(prefix[: i + 1])
            whole = self.stages.get((*prefix[:i], dataclasses.replace(prefix[i], share=1.0)))
            return any(s is not None and s.idle and s.point.ok for s in (stage, whole))

        if len(prefix) == 1 and prefix[0].share < 1 and idle(0):
            return (dataclasses.replace(prefix[0], share=1.0),)
        kept = tuple(step for i, step in enumerate(prefix[:-1]) if not idle(i)) + prefix[-1:]
        return kept if kept != prefix and kept in self.stages else None


class _OutOfTime(BaseException):
    """Raised from a budget check once the search's time budget is spent: ends the running pass. A BaseException,
    as KeyboardInterrupt is, so that a pass's ``except Exception`` (a recipe that fails) does not swallow it."""


@dataclasses.dataclass
class _Stage:
    model: ir.Model | None  # None when it failed or missed the budget: no pipeline continues from it
    chain: list  # the RunReports from the original to this point
    passes: list  # the pass objects of those runs, in order
    point: Point
    idle: bool = False  # its last step's pass changed nothing (only the cleanup ran)


def _held(stage: _Stage | None) -> bool:
    """The stage ran and its point holds the budget, with the validation it was judged by."""
    return stage is not None and stage.point.ok and bool(stage.chain) and stage.chain[-1].validation is not None


def _quality(point: Point) -> float | None:
    """Higher is better: minus the metric's drop, else the worst cosine."""
    if point.metric_drop is not None:
        return -point.metric_drop
    return point.cosine


def _has_attention(model: ir.Model) -> bool:
    """Whether the model has self-attention blocks ``fuse`` can fuse (a transformer encoder)."""
    try:
        from onnxopt.passes._fuse_graph import attention_blocks

        return bool(attention_blocks(model))
    except Exception:  # a graph the matcher cannot read: no fuse candidates
        return False


def _matmul_share(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> float:
    """The share of the model's MACs in Gemm and MatMul nodes."""
    from onnxopt import cost

    try:
        counted = cost.estimate(model, input_shapes=dict(input_shapes or {}))
    except Exception:  # an uncountable model simply gets no svd candidates
        return 0.0
    total = sum(n.macs for n in counted.nodes)
    return sum(n.macs for n in counted.nodes if n.op_type in ("Gemm", "MatMul")) / total if total else 0.0


def _passes(step: Step, user: Mapping[str, Mapping[str, Any]], simplify: bool) -> list:
    """The step's pass with the ladder's options and the user's over them, wrapped in ``simplify`` (the user's
    simplify options) as :class:`~onnxopt.manager.PassManager` would wrap it."""
    from onnxopt import registry

    main = registry.make_pass(step.name, **{**dict(step.options), **user.get(step.name, {})})
    if not simplify or step.name == "simplify":
        return [main]
    cleanup = user.get("simplify", {})
    after = [registry.make_pass("simplify", **cleanup)] if main.simplify_after else []
    return [registry.make_pass("simplify", **cleanup), main, *after]


def _timing_feeds(original, eval_data, data, batch_size, input_shapes, seed):
    """The first batch of the evaluation data (else the calibration data), as quant times its recipes."""
    from onnxopt.runtime import latency_feeds

    source = eval_data if eval_data is not None else data
    what = "evaluation data" if eval_data is not None else "calibration data"
    return latency_feeds(original, source, input_shapes=input_shapes, batch_size=batch_size, seed=seed, what=what)


def _time(original: Path, candidate: Path, feeds: dict, rounds: int, remeasure: bool) -> tuple[float, float]:
    """(candidate us, original us): medians of one interleaved timing, or the record of an earlier run's
    (:func:`onnxopt.latency.compare`, the harness ``quant`` times its recipes with)."""
    from onnxopt import latency

    (original_us, _, _), (candidate_us, _, _) = latency.compare(
        [original, candidate], feeds, rounds=rounds, remeasure=remeasure, purpose="goal"
    )[0]
    return candidate_us, original_us


def _fill(point: Point, report, base, target: Target) -> None:
    validation = report.validation
    point.ok = bool(validation is not None and validation.ok)
    if validation is not None:
        if validation.metric is not None:
            m = validation.metric
            point.metric, point.metric_before, point.metric_after, point.metric_drop = m.name, m.before, m.after, m.drop
            point.metric_higher_is_better = m.higher_is_better
        elif validation.accuracy is not None:
            acc = validation.accuracy
            point.metric, point.metric_before, point.metric_after = "accuracy", acc["before"], acc["after"]
            point.metric_drop = acc["before"] - acc["after"]
        cosines = [d.cosine for d in validation.outputs.values()]
        point.cosine = min(cosines) if cosines else None
    if point.latency_us is not None and point.original_latency_us:
        point.latency_ratio = point.latency_us / point.original_latency_us
    elif point.same_as == "original":
        point.latency_ratio = 1.0  # the original itself: not timed
    if point.latency_batch1_us is not None and point.original_latency_batch1_us:
        point.latency_ratio_batch1 = point.latency_batch1_us / point.original_latency_batch1_us
    point.bytes = report.after.bytes
    if base is not None:
        point.size_ratio = report.after.bytes / base.bytes if base.bytes else None
        point.macs_ratio = report.after.macs / base.macs if base.macs else None
    value = target.value(point)
    point.reached = point.ok and value is not None and value <= target.ratio


def _failure(report) -> str:
    validation = report.validation
    if validation is None or not validation.failures:
        return "misses the budget"
    return f"misses the budget: {validation.failures[0]}"


def _best(points: Sequence[Point], target: Target) -> Point | None:
    """The point within the budget with the lowest ratio. For latency, points within :data:`MARGIN` of the fastest
    tie, as ``quant``'s recipes do (timings of one run differ by that much), and the better metric (cosine without
    one), then the earlier point, wins: MobileNetV2's ``quant`` (top-1 +0.46) over ``prune,quant`` (-0.31), 2%
    faster on one sample."""
    from onnxopt.latency import faster

    within = [p for p in points if p.ok and target.value(p) is not None]
    if not within:
        return None
    fastest = min(target.value(p) for p in within)
    if target.kind == "latency":
        tied = [p for p in within if not faster(fastest, target.value(p), MARGIN)]
    else:
        tied = [p for p in within if target.value(p) == fastest]
    return max(tied, key=lambda p: _quality(p) if _quality(p) is not None else -math.inf)  # the first of equals


def _combined(chain: list, base) -> RunReport:
    """One RunReport from the original to the chosen point: every pass of the chain, the last validation."""
    from onnxopt.manager import RunReport

    last = chain[0]
    stages = list(last.stages)
    passes = list(last.passes)
    for report in chain[1:]:
        passes += report.passes
        for stage in report.stages[1:]:  # [0] is the run's start, already the previous run's last stage
            if stage.source in ("unchanged", "exact pass"):
                previous = stages[-1]
                stage = dataclasses.replace(
                    stage, accuracy=previous.accuracy, task_mse=previous.task_mse, cosine=previous.cosine,
                    source=stage.source if previous.source is not None else None,
                )  # fmt: skip
            stages.append(stage)
        last = report
    seconds = sum(r.seconds for r in chain)
    before = base if base is not None else chain[0].before
    return RunReport(last.model, before, last.after, passes, last.validation, seconds, stages, last.cost_shapes_from)
