"""PassManager: runs passes in order with statistics, cleanup, timing and validation against the original.

    report = PassManager(["prune", "svd"], data="calib.npz", eval_data="eval.npz",
                         budget=Budget(max_accuracy_drop=0.5)).run("model.onnx")
    report.model            # the optimized ir.Model
    report.to_json()        # the stable report schema (see RunReport.to_json)

Each pass runs once, in the order given (data-driven passes compound when repeated instead of
converging). Before a pass that asks for statistics they are collected on the *current* model unless
valid ones are present; after a pass that modified the model they are invalidated and the graph is
cleaned (unused nodes removed, shapes re-inferred). A failing pass is named with the passes before it.
Validation compares the result with the original reloaded from its file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass, ShapeInferencePass

from onnxopt import cost, registry, runtime
from onnxopt import data as data_mod
from onnxopt import early_stop as early_stopping
from onnxopt import graph as graph_io
from onnxopt import metrics as metrics_mod
from onnxopt.errors import CalibrationError, UsageError
from onnxopt.executor import Executor, make_executor
from onnxopt.pass_base import Change, OptPass, OptResult, PassContext, Skip, budget_figures
from onnxopt.stats import STATS_KEY, StatsTable, attach_stats, collect_stats, get_stats
from onnxopt.validate import (
    Budget,
    Reference,
    ValidationReport,
    check_order,
    metric_baseline,
    run_checker,
    validate,
    validate_many,
)

__all__ = ["PassRecord", "StageRecord", "RunReport", "PassManager", "ProgressEvent", "Progress", "budget_shares"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """One step of :meth:`PassManager.run`, for a front end to show (the engine itself never prints).

    ``kind`` is one of:

    - ``"pass_start"``: pass ``stage`` starts; ``done`` passes ran before it, of ``total``.
    - ``"samples"``: ``stage`` ("calibrating", "validating") has run ``done`` samples of ``total`` (``None``:
      the data does not say how many).
    - ``"trial"``: the search of pass ``stage`` checked candidate ``done`` against the budget (``ok``), of an
      expected ``total`` (``None``: the pass gave no estimate); ``best_weights`` is the weight bytes of the
      smallest passing candidate so far over those of the pass's input model, ``best`` its validation report.
    - ``"pass_end"``: pass ``stage`` ended; ``record`` says what it did.
    """

    kind: str
    stage: str
    done: int = 0
    total: int | None = None
    ok: bool | None = None
    best_weights: float | None = None
    best: ValidationReport | None = None
    record: PassRecord | None = None


Progress = Callable[[ProgressEvent], None]


@dataclasses.dataclass
class PassRecord:
    """What one pass did."""

    name: str
    modified: bool
    changes: list[Change]
    skipped: list[Skip]
    seconds: float
    stats_seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # the pass's OptResult.details
    # why the manager restored the pass's input (its result missed the budget; see _BudgetGuard), or None
    reverted: str | None = None

    def to_json(self) -> dict[str, Any]:
        record = {
            "name": self.name,
            "modified": self.modified,
            "changed": [dataclasses.asdict(c) for c in self.changes],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "seconds": round(self.seconds, 4),
            "stats_seconds": round(self.stats_seconds, 4),
        }
        if self.details:  # only passes that report structured details add the key
            record["details"] = self.details
        if self.reverted:  # only a reverted pass adds the key
            record["reverted"] = self.reverted
        return record


@dataclasses.dataclass
class StageRecord:
    """The model after one pipeline stage ("original", then each pass): its size and, when known, its metrics.

    Recorded without extra model runs: ``bytes`` is the serialized size; the metrics (accuracy and task MSE
    of the optimized side, worst per-output cosine) come from the final validation for the last stage and the
    original, from the last *passing* budget check a lossy pass made (the setting it kept) for a stage it
    modified, and carry over through an unchanged or exact stage. ``source`` says which; ``None`` metrics are
    unknown (a lossy pass given a fixed setting checks nothing).
    """

    name: str
    bytes: int
    accuracy: float | None = None
    task_mse: float | None = None
    cosine: float | None = None
    source: str | None = None

    @classmethod
    def measured(cls, name: str, size: int, report: ValidationReport, source: str, side: str = "after"):
        cosines = [d.cosine for d in report.outputs.values()]
        return cls(
            name,
            size,
            accuracy=report.accuracy[side] if report.accuracy else None,
            task_mse=report.task_mse[side] if report.task_mse else None,
            cosine=(1.0 if side == "before" else min(cosines)) if cosines else None,
            source=source,
        )


@dataclasses.dataclass
class RunReport:
    """Result of :meth:`PassManager.run`. ``model`` is the optimized model (not part of the JSON)."""

    model: ir.Model
    before: cost.ModelCost
    after: cost.ModelCost
    passes: list[PassRecord]
    validation: ValidationReport | None
    seconds: float
    stages: list[StageRecord] = dataclasses.field(default_factory=list)  # not in the JSON schema
    cost_shapes_from: str | None = None  # where the input shapes of before/after's MAC counts come from

    @property
    def ok(self) -> bool:
        return self.validation is None or self.validation.ok

    def __repr__(self) -> str:
        """One line (the dataclass default would print the whole model)."""
        verdict = "not validated" if self.validation is None else ("ok" if self.validation.ok else "FAILED")
        passes = ",".join(r.name for r in self.passes) or "none"
        return (
            f"RunReport(passes={passes}, params {self.before.params:,} -> {self.after.params:,}, "
            f"MACs {self.before.macs:,} -> {self.after.macs:,}, bytes {self.before.bytes:,} -> {self.after.bytes:,}, "
            f"validation {verdict}, {self.seconds:.2f} s)"
        )

    def to_json(self) -> dict[str, Any]:
        """The stable report schema read by tools and benchmarks."""
        validation = self.validation.to_json() if self.validation is not None else None
        return {
            "model": {
                "before": self.before.to_json(),
                "after": self.after.to_json(),
                "input_shapes_from": self.cost_shapes_from,
            },
            "passes": [record.to_json() for record in self.passes],
            "validation": validation,
            "seconds": round(self.seconds, 4),
        }


class PassManager:
    """Runs passes over a model; see the module docstring.

    Args:
        passes: pass objects or registry names.
        data: calibration data (``.npz`` path, arrays, feed dicts, callable, or DataSource).
        eval_data: held-out data for validation; without it validation uses ``data``, and without
            both, seeded random inputs.
        budget: the error budget; by default exact (1e-5) when every pass is exact, else
            ``Budget.default``.
        validate: compare the result with the original at the end.
        simplify: wrap a non-empty pass list that does not name ``simplify`` itself with the lossless
            ``simplify`` pass, first and (unless the last pass sets ``simplify_after = False``) last.
        input_shapes: concrete shapes for dynamic inputs (cost model, random inputs).
        metric: a task metric (:mod:`onnxopt.metrics`: ``top1``, ``top5``, ``mse``, ``psnr``, ``spearman``,
            ``MODULE:FUNCTION`` or a callable) measured in every budget check and the final validation, and
            judged by the budget's ``max_metric_drop`` / ``metric_limit``; ``metric_output`` picks its output.
            It is computed on the original model before any pass runs, so a metric that cannot be computed
            fails up front (UsageError / DataError).
        holdout: without ``eval_data``, when a pass is lossy, judge on the last ``holdout`` fraction of
            array ``data`` (0.3: the last 30%) and calibrate on the rest (the CLI's default); ``None``: judge on
            ``data`` itself.
        min_eval_samples: refuse (UsageError, before any pass) to judge lossy passes on fewer given evaluation
            samples (the CLI's 32 unless ``--allow-small-eval``); seeded random inputs are not counted.
        executor: where calibration statistics are collected: ``None``/``"local"`` in this process, ``"ray"`` /
            ``"ray:ADDRESS"`` (or an :class:`onnxopt.executor.Executor`) sharded over Ray workers, joined before
            any pass runs (an unreachable address or a missing ``ray`` package: ExecutorError, exit 2).
        budget_split: with several passes that spend budget (lossy ones; ``distill`` recovers and spends none),
            the k-th of n searches within k/n of the budget (:meth:`Budget.share`), still judged against the
            original: ``prune,quant`` leaves ``quant`` half the budget instead of ``prune`` spending it all and
            ``quant`` finding no int8 recipe that holds. The last gets the whole budget; ``False``: every pass
            gets the whole budget.
    """

    def __init__(
        self,
        passes: Sequence[OptPass | str],
        *,
        data: data_mod.DataLike | data_mod.DataSource | None = None,
        eval_data: data_mod.DataLike | data_mod.DataSource | None = None,
        budget: Budget | None = None,
        validate: bool = True,
        batch_size: int = 16,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        seed: int = 0,
        progress: Progress | None = None,
        simplify: bool = True,
        metric: str | Callable[..., Any] | metrics_mod.Metric | None = None,
        metric_output: str | None = None,
        holdout: float | None = None,
        min_eval_samples: int = 0,
        executor: str | Executor | None = None,
        budget_split: bool = True,
    ) -> None:
        self.metric = None if metric is None else metrics_mod.resolve(metric, output=metric_output)
        self.budget_split = budget_split
        self.holdout = holdout
        self.min_eval_samples = min_eval_samples
        self.executor = make_executor(executor)
        self.passes = [registry.make_pass(p) if isinstance(p, str) else p for p in passes]
        _check_order(self.passes)
        if simplify and self.passes and not any(p.name == "simplify" for p in self.passes):
            last_allows = self.passes[-1].simplify_after
            self.passes = [registry.make_pass("simplify"), *self.passes]
            if last_allows:
                self.passes.append(registry.make_pass("simplify"))
        self.data = data
        self.eval_data = eval_data
        self.budget = budget
        self.validate = validate
        self.batch_size = batch_size
        self.input_shapes = dict(input_shapes or {})
        self.seed = seed
        self.progress = progress

    def run(
        self, model: ir.Model | str | os.PathLike, *, original: str | os.PathLike | Reference | None = None
    ) -> RunReport:
        """Optimize ``model`` (a path is loaded; an ``ir.Model`` is changed in place) and validate it.

        ``original``: the model the budget checks and the validation compare with, when it is not ``model``
        itself (continuing a pipeline from a model an earlier run produced, as :mod:`onnxopt.goal` does); a
        :class:`~onnxopt.validate.Reference` of it shares the original's outputs across runs on the same data.
        The report's ``before`` is then ``model``'s cost, not the original's.
        """
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            reference = original if isinstance(original, Reference) else None
            if original is not None:
                original_path = Path(reference.session.path if reference is not None else original)
                if not isinstance(model, ir.Model):
                    model = graph_io.load(model)
            elif isinstance(model, ir.Model):
                original_path = stack.enter_context(graph_io.temporary_model_file(model))
            else:
                original_path = Path(model)
                model = graph_io.load(original_path)
            # what the checks compare with: one Reference for the metric's baseline, every budget check and the
            # validation, so the original runs once per evaluation batch in the whole run (its outputs cached)
            judge = reference if reference is not None else Reference(original_path)
            runtime.check_runs(original_path)  # an op onnxruntime lacks is bad input (exit 2), not a pass failure
            if hasattr(self.executor, "connect"):
                self.executor.connect()  # an unreachable cluster fails now, not after the first passes
            # unique node and value names: statistics, Gram matrices and fallbacks are keyed by name
            NameFixPass()(model)
            calib, held_out = self._sources(model)
            needs_check = self.validate or not all(p.exact for p in self.passes)
            self._check_inputs_given(model, calib, random=needs_check and held_out is None and calib is None)
            check_data = held_out or calib or (self._random(model) if needs_check else None)
            budget = self.budget or self._default_budget(check_data, model)
            self._check_up_front(judge, check_data, budget, given=held_out or calib)
            passed: list[ValidationReport] = []  # passing budget checks of the current pass, newest last
            cost_shapes, cost_shapes_from = self._cost_shapes(model, held_out or calib)
            context = PassContext(
                budget=budget,
                data=calib,
                eval_data=held_out,
                check=None
                if check_data is None
                else self._checker(judge, check_data, budget, passed, metric=self.metric, executor=self.executor),
                seed=self.seed,
                original=original_path,
                input_shapes=cost_shapes,
            )
            width = 1 if self.executor is None else self.executor.candidates_at_once(check_data)
            if width > 1:  # a search may score candidates at once
                context.prefetch, context.parallel = getattr(context.check, "prefetch", None), width
            before = cost.estimate(model, input_shapes=cost_shapes)
            records, stages, first_check = [], [StageRecord("original", before.bytes)], None
            shares = self._budget_shares()
            for done, pass_ in self._enumerate():
                passed.clear()
                self._emit(ProgressEvent("pass_start", pass_.name, len(done), len(self.passes)))
                pass_context = context
                share = shares.get(len(done))
                if share is not None and context.check is not None:
                    part = budget.share(share)
                    check = self._checker(judge, check_data, part, passed, metric=self.metric, executor=self.executor)
                    pass_context = dataclasses.replace(context, budget=part, check=check)
                    if width > 1:
                        pass_context.prefetch = getattr(check, "prefetch", None)
                    logger.info("pass %s: searches within %.2f of the budget (more lossy passes follow)",
                                pass_.name, share)  # fmt: skip
                records.append(self._run_pass(pass_, model, pass_context, calib, done, passed))
                if share is not None and pass_context is not context:
                    records[-1].details["budget_share"] = round(share, 4)
                _search_cost(records[-1], pass_context.check)
                self._emit(ProgressEvent("pass_end", pass_.name, len(done) + 1, len(self.passes), record=records[-1]))
                stages.append(_stage(records[-1], pass_, model, passed, stages[-1].bytes))
                first_check = first_check or (passed[0] if passed else None)
            after = cost.estimate(model, input_shapes=cost_shapes)  # the same shapes: the ratios mean something
            report = None
            if self.validate:
                report = _checked(context.check, model, check_data)
                if report is not None:
                    self._emit(ProgressEvent("samples", "validating", report.samples, report.samples))
                else:
                    report = validate(
                        judge, model, check_data, budget, progress=self._progress("validating"), metric=self.metric,
                        executor=self.executor,
                    )  # fmt: skip
            if report is not None or first_check is not None:
                source = "validation" if report is not None else "budget check"
                stages[0] = StageRecord.measured("original", before.bytes, report or first_check, source, "before")
            if report is not None:
                stages[-1] = StageRecord.measured(stages[-1].name, after.bytes, report, "validation")
            _carry_metrics(stages)
        return RunReport(model, before, after, records, report, time.perf_counter() - start, stages, cost_shapes_from)

    @staticmethod
    def _checker(
        original_path: Path | Reference,
        check_data: data_mod.DataSource,
        budget: Budget,
        passed: list[ValidationReport],
        metric: metrics_mod.Metric | None = None,
        executor: Executor | None = None,
    ):
        """``context.check``: validate a candidate against the original, whose outputs are computed once.

        Passing reports are appended to ``passed`` (the per-stage metrics of :class:`StageRecord`). With a
        metric, every candidate is judged by it (the searches of all lossy passes go through here).

        A check stops as soon as its failure is certain (``$ONNXOPT_EARLY_STOP``, :mod:`onnxopt.early_stop`:
        ``on`` by default, ``exact``, ``off``); a passing candidate is always scored on every sample. For a top-k
        budget on array data the checks read the samples where the original misses or barely hits first
        (:func:`onnxopt.validate.check_order`), which decides a failure soonest; the reports are the same. The checks'
        cost is tallied on ``check.cost`` (:class:`onnxopt.early_stop.SearchCost`), which the run takes per pass.
        A candidate that computes what one checked before in the run (the same :mod:`onnxopt.fingerprint`) gets that
        check's report without running again.

        With an ``executor`` (Ray) each check is sharded over its workers (no early stop there), and
        ``check.prefetch(candidates)`` scores several candidates at once: a later ``check`` of one of those very
        objects returns its report (appended to ``passed`` then, in the order the search asks), so a search
        that prefetches what it may ask next chooses exactly as one that checks one candidate at a time.
        """
        reference: list[Reference] = [original_path] if isinstance(original_path, Reference) else []
        ordered: list = []  # (reference, data) the checks read: check_data, reordered for early stops where it helps
        stop_mode = early_stopping.mode()
        cost = early_stopping.SearchCost()

        verdicts: dict[str, ValidationReport] = {}  # fingerprint of a candidate checked in this run -> its report

        def check(candidate: ir.Model) -> ValidationReport:
            start = time.perf_counter()
            if not reference:
                reference.append(Reference(original_path))
            key = _fingerprint(candidate)  # the same computation checked again (a search revisiting a setting)
            ready = prefetched.pop(id(candidate), None)
            if key is not None and key in verdicts:
                result = verdicts[key]
            elif ready is not None and ready[0] is candidate:
                result = ready[1]
            else:
                if not ordered:  # the order that stops failing checks soonest, found once
                    ordered.extend(check_order(reference[0], check_data, budget, metric=metric, early_stop=stop_mode,
                                               executor=executor))  # fmt: skip
                result = validate(
                    ordered[0], candidate, ordered[1], budget, check=False, metric=metric, early_stop=stop_mode,
                    executor=executor,
                )  # fmt: skip
            if result.ok:
                passed.append(result)
            cost.record(result, time.perf_counter() - start, repeated=key is not None and key in verdicts)
            if key is not None:
                verdicts[key] = result
            return result

        prefetched: dict[int, tuple[ir.Model, ValidationReport]] = {}  # id -> (the candidate, its report)

        def prefetch(candidates: list[ir.Model]) -> None:
            """Score ``candidates`` at once; the reports of earlier prefetches not among them are dropped."""
            wanted = {id(c) for c in candidates}
            for key in [key for key in prefetched if key not in wanted]:
                del prefetched[key]
            todo = [c for c in candidates if id(c) not in prefetched and _fingerprint(c) not in verdicts]
            if not todo:
                return
            if not reference:
                reference.append(Reference(original_path))
            reports = validate_many(reference[0], todo, check_data, budget, check=False, metric=metric,
                                    executor=executor)  # fmt: skip
            prefetched.update((id(c), (c, r)) for c, r in zip(todo, reports, strict=True))

        check.cost = cost
        check.prefetch = prefetch
        check.verdicts = verdicts
        return check

    def _budget_shares(self) -> dict[int, float]:
        """Pass index → the fraction of the budget its search gets (see ``budget_split``)."""
        return budget_shares([p.spends() for p in self.passes]) if self.budget_split else {}

    def _enumerate(self):
        for index, pass_ in enumerate(self.passes):
            yield [p.name for p in self.passes[:index]], pass_

    def _run_pass(
        self,
        pass_: OptPass,
        model: ir.Model,
        context: PassContext,
        calib: data_mod.DataSource | None,
        done: list[str],
        passed: list[ValidationReport] | None = None,
    ) -> PassRecord:
        stats_seconds = 0.0
        pass_.context = self._watched(context, pass_.name, model)
        guard = _BudgetGuard(pass_, pass_.context)  # a lossy pass that searched hands on only what holds the budget
        request = pass_.stats_request(model)
        if request:
            existing = get_stats(model)
            missing = request if existing is None else existing.missing(request)
            if missing:
                if calib is None:
                    raise CalibrationError(f"pass '{pass_.name}' needs calibration data: give --data")
                t0 = time.perf_counter()
                table: StatsTable = collect_stats(
                    model, calib, missing, progress=self._progress("calibrating"), executor=self.executor
                )
                attach_stats(model, table)
                stats_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        guard.before(model)
        try:
            result = pass_(model)
        except ir.passes.PreconditionError as e:  # the pass cannot run as asked: a usage error (exit 2)
            raise UsageError(f"pass '{pass_.name}': {e}") from e
        except Exception as e:
            after = f" after {done}" if done else " (first pass)"
            raise ir.passes.PassError(f"pass '{pass_.name}' failed{after}: {e}") from e
        finally:
            pass_.context = None
        seconds = time.perf_counter() - t0
        changes = result.changes if isinstance(result, OptResult) else []
        skipped = result.skipped if isinstance(result, OptResult) else []
        details = dict(result.details) if isinstance(result, OptResult) else {}
        reverted = guard.after(model, result.modified, context.check, passed)
        if reverted is not None:
            details["reverted_changes"] = [dataclasses.asdict(c) for c in changes]
            changes, skipped = [], [Skip("model", f"reverted: {reverted}"), *skipped]
        modified = bool(result.modified) and reverted is None
        if modified:
            if STATS_KEY in model.meta:
                model.meta.invalidate(STATS_KEY)
            RemoveUnusedNodesPass()(model)
            if getattr(pass_, "infer_shapes_after", True):
                ShapeInferencePass(strict_mode=False)(model)
        logger.info(
            "pass %s: %s, %d changes, %d skipped, %.3f s",
            pass_.name,
            "reverted" if reverted else "modified" if modified else "unchanged",
            len(changes),
            len(skipped),
            seconds,
        )
        return PassRecord(
            pass_.name, modified, list(changes), list(skipped), seconds, stats_seconds, details, reverted=reverted
        )

    def _source(self, data, model: ir.Model, what: str, pair_labels: bool = True) -> data_mod.DataSource | None:
        if data is None:
            return None
        pair = pair_labels and self.metric is not None and self.metric.pair
        return data_mod.as_source(data, model, batch_size=self.batch_size, what=what, pair_labels=pair)

    def _sources(self, model: ir.Model) -> tuple[data_mod.DataSource | None, data_mod.DataSource | None]:
        """Calibration and evaluation sources; without ``eval_data``, a held-out split of ``data`` (``holdout``)."""
        lossy = not all(p.exact for p in self.passes)
        if self.eval_data is None and self.data is not None and self.holdout and lossy:
            unit = 2 if self.metric is not None and self.metric.pair else 1
            split = data_mod.holdout(self.data, self.holdout, unit=unit)
            if split is not None:
                first, last, held, total = split
                name = Path(self.data).name if isinstance(self.data, str | os.PathLike) else "the data arrays"
                calib = self._source(first, model, "calibration data")
                held_out = self._source(last, model, "evaluation data")
                calib.description = f"calibration data: the first {total - held} of {total} samples of {name}"
                held_out.description = (
                    f"evaluation data: the last {held} of {total} samples of {name}, held out (no eval data given)"
                )
                logger.info("no evaluation data: judging on the last %d of %d samples of %s", held, total, name)
                return calib, held_out
        # calibration labels matter only where the calibration data is also the evaluation data
        calib = self._source(self.data, model, "calibration data", pair_labels=self.eval_data is None)
        return calib, self._source(self.eval_data, model, "evaluation data")

    def _check_inputs_given(self, model: ir.Model, calib: data_mod.DataSource | None, *, random: bool) -> None:
        """Everything missing from the command at once, before any pass runs: calibration data that a pass
        needs, and the concrete shapes random inputs need (``random``: there is no data to take them from)."""
        problems = []
        if calib is None:
            wanting = [p.name for p in self.passes if p.needs_data(model)]
            if wanting:
                names = ", ".join(f"'{n}'" for n in dict.fromkeys(wanting))
                problems.append(f"pass {names} needs calibration data: give --data")
        if random:
            problems += data_mod.missing_shapes(model, self.input_shapes)
        if problems:
            raise UsageError("; ".join(problems))

    def _check_up_front(
        self,
        original_path: Path | Reference,
        check_data: data_mod.DataSource | None,
        budget: Budget,
        given: data_mod.DataSource | None,
    ) -> None:
        """Refuse, before any pass runs, what would fail later: metric budgets without a metric, too few
        evaluation samples for lossy passes, a metric that cannot be computed on the original model."""
        metric = self.metric
        if metric is None and (budget.max_metric_drop is not None or budget.metric_limit is not None):
            raise UsageError("a metric budget (--max-metric-drop / --metric-limit) needs --metric")
        if metric is not None and metric.reference_based and budget.max_metric_drop is not None:
            raise UsageError(
                f"metric '{metric.name}' compares with the original model's output (+inf before): "
                "bound it with --metric-limit, not --max-metric-drop"
            )
        if metric is not None and not metric.bootstrap and budget.confidence is not None:
            raise UsageError(f"--budget-confidence needs a bootstrap interval; the user metric {metric.name} has none")
        lossy = not all(p.exact for p in self.passes)
        samples = given.samples if given is not None else None
        if lossy and self.min_eval_samples and samples is not None and samples < self.min_eval_samples:
            raise UsageError(
                f"{given.description}: {samples} evaluation samples are too few to judge lossy passes "
                f"(at least {self.min_eval_samples}); give more with --eval, or --allow-small-eval to judge anyway"
            )
        if metric is not None and check_data is not None:
            value = metric_baseline(original_path, check_data, metric, executor=self.executor)
            logger.info("metric %s of the original model: %.6g", metric.name, value)

    def _cost_shapes(
        self, model: ir.Model, given: data_mod.DataSource | None
    ) -> tuple[dict[str, list[int]], str | None]:
        """Input shapes to count MACs at, before and after alike, and where they come from.

        The first batch of the data given (evaluation data, else calibration data) per sample: its
        concrete shapes with a dynamic batch axis set to 1, as ``onnxopt inspect`` counts (a symbolic
        sequence length or image size takes the data's); a stacked feed (one feed per batch, no shared batch
        axis) as it is; else ``input_shapes``; else the declared shapes.
        """
        if given is not None:
            first = next(iter(given), None)
            if first is not None:
                if first.count is not None:  # a stacked feed: one sample already, no batch axis to normalise
                    shapes = cost.shapes_from_feeds(model, first.feeds, per_sample=False)
                    return shapes, f"first feed of {given.description}"
                shapes = cost.shapes_from_feeds(model, first.feeds)
                return shapes, f"first batch of {given.description}, per sample"
        if self.input_shapes:
            return dict(self.input_shapes), "given input shapes"
        return {}, "declared input shapes (a dynamic batch axis 1)"

    def _random(self, model: ir.Model) -> data_mod.DataSource:
        return data_mod.random_source(model, seed=self.seed, shapes=self.input_shapes)

    def _default_budget(self, check_data: data_mod.DataSource | None, model: ir.Model) -> Budget:
        exact = all(p.exact for p in self.passes)
        has_labels = not exact and check_data is not None and check_data.has_labels
        budget = Budget.default(exact=exact, has_labels=has_labels)
        half = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
        if exact and any(v.dtype in half for v in model.graph.outputs):
            # refolding weights re-rounds them at half precision (eps 1e-3): "exact" means to that rounding
            budget = Budget(max_abs=1e-2)
        return budget

    def _progress(self, stage: str) -> Callable[[int, int | None], None] | None:
        if self.progress is None:
            return None
        callback = self.progress
        return lambda done, total: callback(ProgressEvent("samples", stage, done, total))

    def _emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def _watched(self, context: PassContext, name: str, model: ir.Model) -> PassContext:
        """The pass's own copy of ``context`` whose ``check`` also reports each search trial (``"trial"`` events)."""
        own = dataclasses.replace(context, expected_trials=None)
        check = context.check
        if check is None or self.progress is None:
            return own
        base = max(_weight_bytes(model), 1)
        trials: list[bool] = []
        best: list[tuple[int, ValidationReport]] = []

        def watched(candidate: ir.Model) -> ValidationReport:
            result = check(candidate)
            trials.append(result.ok)
            if result.ok:
                size = _weight_bytes(candidate)
                if not best or size <= best[0][0]:
                    best[:] = [(size, result)]
            expected = own.expected_trials
            total = max(expected, len(trials)) if expected else None
            fraction, report = (best[0][0] / base, best[0][1]) if best else (None, None)
            self._emit(ProgressEvent("trial", name, len(trials), total, result.ok, fraction, report))
            return result

        own.check = watched
        return own


def _check_order(passes: Sequence[OptPass]) -> None:
    """Refuse a pass listed after one that hides from it what it rewrites (a pass's ``hides_from`` names: ``fuse``
    turns MatMul+Add chains into fused ops that ``prune``/``svd``/``split`` cannot read)."""
    for index, pass_ in enumerate(passes):
        later = [p.name for p in passes[index + 1 :] if p.name in getattr(pass_, "hides_from", ())]
        if later:
            names = ", ".join(f"'{n}'" for n in dict.fromkeys(later))
            raise UsageError(f"pass {names} cannot run after '{pass_.name}' (its fused ops hide what it rewrites): "
                             f"put '{pass_.name}' after it")  # fmt: skip


def _stage(
    record: PassRecord, pass_: OptPass, model: ir.Model, passed: list[ValidationReport], previous_bytes: int
) -> StageRecord:
    """The stage after ``record``'s pass; see :class:`StageRecord` (one serialization when the model changed)."""
    if not record.modified:
        return StageRecord(record.name, previous_bytes, source="unchanged")
    size = graph_io.to_proto(model).ByteSize()
    if pass_.exact:
        return StageRecord(record.name, size, source="exact pass")
    if passed:
        return StageRecord.measured(record.name, size, passed[-1], "budget check")
    return StageRecord(record.name, size)


def budget_shares(spends: Sequence[bool]) -> dict[int, float]:
    """Of a pipeline whose passes spend budget or not (``spends``, in order), the fraction of the budget each
    spending pass before the last searches within: the k-th of n gets k/n (the last, all of it, is left out)."""
    spenders = [i for i, spending in enumerate(spends) if spending]
    return {index: (k + 1) / len(spenders) for k, index in enumerate(spenders[:-1])}


def _search_cost(record: PassRecord, check) -> None:
    """Add the pass's budget-check tally (candidates, early stops, time saved) to its record's details, and log it."""
    tally = getattr(check, "cost", None)
    tally = tally.take() if tally is not None else None
    if not tally:
        return
    record.details["search"] = tally
    logger.info(
        "pass %s: %d budget checks, %d stopped early (%d exact, %d statistical), %d repeats not run again, "
        "%d of %d samples scored, %.1f s checking, about %.1f s saved",
        record.name,
        tally["candidates"],
        tally["stopped_early"],
        tally["stopped_exact"],
        tally["stopped_statistical"],
        tally["repeated"],
        tally["samples_scored"],
        tally["samples_if_full"],
        tally["check_seconds"],
        tally["seconds_saved_estimate"],
    )


def _weight_bytes(model: ir.Model) -> int:
    """Bytes of the model's initializers (no serialization: cheap enough for every search trial)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _carry_metrics(stages: list[StageRecord]) -> None:
    """Unchanged and exact stages keep the metrics of the stage before them (unknown stays unknown)."""
    for index in range(1, len(stages)):
        stage, previous = stages[index], stages[index - 1]
        if stage.source in ("unchanged", "exact pass"):
            known = previous.source is not None
            stages[index] = dataclasses.replace(
                stage,
                accuracy=previous.accuracy,
                task_mse=previous.task_mse,
                cosine=previous.cosine,
                source=stage.source if known else None,
            )


class _BudgetGuard:
    """Makes a lossy pass that searched within the budget hand on only a model that holds it.

    For a lossy pass in a run with a budget check, the guard keeps a clone of the pass's input (an onnx_ir clone
    copies the graph and shares the weight tensors, which passes replace rather than change in place) and wraps
    the pass's ``context.check`` to count its checks and remember the fingerprint (:mod:`onnxopt.fingerprint`,
    a digest of the nodes and the weights' bytes) of every candidate that passed. After a pass that checked at
    least one candidate and modified the model:

    - a result with the fingerprint of a candidate that passed is handed on without checking it again (the pass's
      own search validated exactly this model; its report becomes the stage's metrics);
    - any other result is checked once more, and if it misses the budget the pass's input is restored and the
      pass recorded as not modified, with the reason (``reverted: result outside the budget: ...``) first in its
      skipped sites and in ``PassRecord.reverted``, its discarded changes in ``details["reverted_changes"]``.

    A pass that checked nothing was given a fixed setting by the user (``--svd-rank 8``): it is not second-guessed
    here; the final validation judges the result, and a miss fails the run (exit 1, nothing written unless
    ``--force``), as before.
    """

    def __init__(self, pass_: OptPass, context: PassContext | None) -> None:
        self.active = not pass_.exact and context is not None and context.check is not None
        self.checks = 0
        self.passing: dict[str, ValidationReport] = {}  # fingerprint of a passing candidate -> its report
        self.backup: ir.Model | None = None
        if self.active:
            inner = context.check

            def check(candidate: ir.Model) -> ValidationReport:
                result = inner(candidate)
                self.checks += 1
                if result.ok:
                    key = _fingerprint(candidate)
                    if key is not None:
                        self.passing[key] = result
                return result

            context.check = check

    def before(self, model: ir.Model) -> None:
        """Keep the pass's input (only for a guarded pass)."""
        self.backup = model.clone() if self.active else None

    def after(self, model: ir.Model, modified: bool, check, passed: list[ValidationReport] | None) -> str | None:
        """Check the pass's result when needed (``check``: the run's own, unwatched); restore the input if it fails.

        Returns the reason the pass was reverted, or ``None`` when its result stands.
        """
        backup, self.backup = self.backup, None
        if not modified or backup is None or not self.checks:
            return None
        key = _fingerprint(model) if self.passing else None
        if key is not None and key in self.passing:
            if passed is not None:
                passed.append(self.passing[key])  # the stage's metrics: this model's own check
            logger.debug("budget guard: the result is a candidate the search checked; not checked again")
            return None
        report = check(model)
        if report.ok:
            return None
        graph_io.adopt(model, backup)
        reason = f"result outside the budget: {budget_figures(report)}"
        logger.info("budget guard: input restored: %s", reason)
        return reason


def _checked(check, model: ir.Model, data: data_mod.DataSource) -> ValidationReport | None:
    """The final validation of ``model`` from the run's own budget check of it, when there is one: ``check`` (the
    run's, with the whole budget, on the validation's data and metric) passed a model with this fingerprint, and a
    passing check scores every sample. Its figures are the validation's (the metric's rows are scored in the set's
    order, the per-sample comparisons do not depend on it), so the model is not run over the data again; on
    MobileNetV2 or EfficientNet-Lite0 with 650 ImageNet images that run took 3 s. onnx's full checker, which budget
    checks skip, still runs. ``None``: validate as usual."""
    verdicts = getattr(check, "verdicts", None)
    key = _fingerprint(model) if verdicts else None
    report = verdicts.get(key) if key is not None else None
    if report is None or not report.ok or report.early_stop is not None:
        return None
    report = dataclasses.replace(report, data=data.description, failures=list(report.failures))
    run_checker(report, model)
    report.ok = report.checker_error is None
    logger.info("validation: the budget check of this very model (%d samples), not run again", report.samples)
    return report


def _fingerprint(model: ir.Model) -> str | None:
    """:func:`onnxopt.fingerprint.fingerprint`, or ``None`` for a model it cannot digest (then it is checked)."""
    from onnxopt.fingerprint import fingerprint

    try:
        return fingerprint(model)
    except Exception as e:  # an exotic tensor type: costs one more budget check, never a wrong answer
        logger.debug("no fingerprint: %s", e)
        return None
