"""A cheap stand-in for prune's candidates: one session of the input model whose pruned layers' inputs are masked.

Removing channel ``c`` of a value ``x`` that a layer reads (with the mean folded into the layer's bias) gives that
layer the input ``x_c = μ_c``. The masked model computes exactly that without any graph surgery: every value a
consumer layer (Conv, Gemm, MatMul, ConvTranspose) reads is replaced, for the consumers only, by::

    x' = x · m + f        (m_c = 0 and f_c = μ_c for a removed channel; m_c = 1 and f_c = 0 otherwise)

with ``m`` and ``f`` fed at run time, so every candidate of a search runs in the one onnxruntime session opened
up front. It equals the pruned model for Gemm, MatMul and unpadded Conv consumers (the channels coupled to
``c`` — BatchNorm, depthwise Conv, residual Add — reach the rest of the network only through such consumers) and
for dead channels (``μ_c = 0``) everywhere; a padded Conv sees ``μ_c`` at its borders, where the pruned model
folds it in everywhere, and a ConvTranspose consumer gets ``f_c = 0`` as the pruned model does. It is a proxy:
the search ranks with it, and every model handed on is the real pruned model, checked against the budget.

:meth:`MaskedProxy.loss` is the relative squared error of the candidate's outputs against the input model's on a
few calibration samples (label-free; the evaluation data decides only in the budget checks):
``mean over float outputs of Σ‖y' − y‖² / Σ‖y‖²``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from onnxopt.data import DataSource
from onnxopt.passes._channel_groups import Analysis
from onnxopt.passes._proxy_cuts import Cuts
from onnxopt.runtime import Session, work_threads
from onnxopt.stats import StatsTable, expose

__all__ = ["MaskedProxy", "masked_model"]

logger = logging.getLogger(__name__)

_PREFIX = "onnxopt_prune_mask"


def masked_model(model: ir.Model, analysis: Analysis) -> tuple[ir.Model, dict[str, tuple[str, str, tuple]]] | None:
    """A clone of ``model`` (analysed as ``analysis``) whose consumers read ``x·m + f``; per masked value name, the
    names of its ``m`` and ``f`` inputs and their (broadcast) shape. ``None`` when a consumed value's rank or type
    is unknown or not float32 (the proxy is then not available)."""
    consumers: dict[str, list[tuple[str, int]]] = {}  # value name -> (node name, input index) of its consumers
    spaces = {}
    for action in analysis.actions:
        if action.kind != "consumer":
            continue
        value = action.space.value
        shape = value.shape
        if shape is None or value.dtype != ir.DataType.FLOAT or not value.name or not action.node.name:
            return None
        index = next((i for i, v in enumerate(action.node.inputs) if v is value), None)
        if index is None:
            return None
        consumers.setdefault(value.name, []).append((action.node.name, index))
        spaces[value.name] = action.space
    clone = model.clone()
    values = {v.name: v for v in clone.graph.inputs}
    values.update({out.name: out for node in clone.graph for out in node.outputs if out.name})
    nodes = {node.name: node for node in clone.graph}
    inputs = {}
    for k, (name, uses) in enumerate(sorted(consumers.items())):
        space = spaces[name]
        rank = len(space.value.shape)
        broadcast = [1] * rank
        broadcast[space.axis % rank] = space.size
        mask, fill = (
            ir.Value(name=f"{_PREFIX}_{k}_{kind}", shape=ir.Shape(broadcast), type=ir.TensorType(ir.DataType.FLOAT))
            for kind in ("m", "f")
        )
        clone.graph.inputs.extend([mask, fill])
        source = values[name]
        mul = ir.node("Mul", [source, mask], name=f"{_PREFIX}_{k}_mul")
        add = ir.node("Add", [mul.outputs[0], fill], name=f"{_PREFIX}_{k}_add")
        mul.outputs[0].name, add.outputs[0].name = f"{_PREFIX}_{k}_scaled", f"{_PREFIX}_{k}_out"
        for out in (mul.outputs[0], add.outputs[0]):
            out.dtype = ir.DataType.FLOAT
        clone.graph.insert_before(_first_use(clone, uses, nodes), [mul, add])
        for node_name, index in uses:
            nodes[node_name].replace_input_with(index, add.outputs[0])
        inputs[name] = (mask.name, fill.name, tuple(broadcast))
    return clone, inputs


def _first_use(model: ir.Model, uses: list[tuple[str, int]], nodes: Mapping[str, ir.Node]) -> ir.Node:
    """The consumer of ``uses`` that comes first in the graph (the masking nodes go right before it)."""
    wanted = {id(nodes[name]) for name, _ in uses}
    return next(node for node in model.graph if id(node) in wanted)


class MaskedProxy:
    """Scores removals (``{value name: channel indices}``) by the masked model's output error on a few samples."""

    def __init__(self, model: ir.Model, analysis: Analysis, stats: StatsTable, data: DataSource, samples: int = 16):
        built = masked_model(model, analysis)
        if built is None:
            raise ValueError("no masked proxy: a pruned layer's input has an unknown shape or is not float32")
        masked, self.inputs = built
        self.means = {}
        consumed_by_transpose = {
            a.space.value.name for a in analysis.actions if a.kind == "consumer" and a.node.op_type == "ConvTranspose"
        }
        for name, (_, _, shape) in self.inputs.items():
            channel = stats.channels.get(name)
            size = int(np.prod(shape))
            mean = channel.mean if channel is not None and name not in consumed_by_transpose else np.zeros(size)
            self.means[name] = np.asarray(mean, dtype=np.float32).reshape(size)
        self.batches = []
        count = 0
        for batch in data:  # whole batches (a fixed-batch model takes no other size), at least `samples` samples
            self.batches.append(batch.feeds)
            count += batch.size
            if count >= samples:
                break
        self.samples = count
        # A model of a fixed batch of 1 (YOLOX-nano) gives one small run per sample, which onnxruntime's intra-op
        # threads share poorly (11.3 ms a sample on 2 threads against 14.5 on 1): such batches run side by side
        # instead, one thread each (16 samples: 120 ms against 184 ms, the same outputs to the bit).
        self.workers = min(work_threads(), len(self.batches))
        threads = 1 if self.workers > 1 else None
        self.masked, self.threads = masked, threads
        self.session = Session(masked, optimize=True, threads=threads)
        self.outputs = [
            v.name for v in model.graph.outputs if v.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE, None)
        ]  # fmt: skip
        masks = {name: (mask, fill) for name, (mask, fill, _) in self.inputs.items()}
        self.cuts = Cuts(masked, masks, self.outputs, self.samples, threads)
        self._anchor: tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]] | None = None  # masks, kept values
        self.reference = self._outputs({})
        self.energy = {
            name: max(sum(float(np.sum(np.square(r[name], dtype=np.float64))) for r in self.reference), 1e-30)
            for name in self.outputs
        }
        self.evaluations = 0

    def _masks(self, removed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The mask and fill inputs of the removal ``{value name: channels}``."""
        extra = {}
        for name, (mask_name, fill_name, shape) in self.inputs.items():
            mask = np.ones(int(np.prod(shape)), np.float32)
            fill = np.zeros_like(mask)
            drop = removed.get(name)
            if drop is not None and len(drop):
                mask[drop] = 0.0
                fill[drop] = self.means[name][drop]
            extra[mask_name], extra[fill_name] = mask.reshape(shape), fill.reshape(shape)
        return extra

    def _outputs(self, removed: Mapping[str, np.ndarray], anchor: bool = False) -> list[dict[str, np.ndarray]]:
        """The masked model's outputs on every batch, in order (side by side on ``workers`` threads). ``anchor``:
        keep this run's values at the cuts (:mod:`onnxopt.passes._proxy_cuts`); later removals that differ from
        this one only from a cut on run from there."""
        extra = self._masks(removed)
        keep = anchor and bool(self.cuts.cuts)  # this run keeps the values at the cuts
        cut = None
        if self._anchor is not None and not anchor:
            masks, _ = self._anchor
            changed = [n for n, (m, f, _) in self.inputs.items() if not (
                np.array_equal(extra[m], masks[m]) and np.array_equal(extra[f], masks[f]))]  # fmt: skip
            cut = self.cuts.pick(changed) if changed else None
        if keep:
            session = Session(expose(self.masked, self.cuts.kept), optimize=True, threads=self.threads, arena=False)
            run = lambda i: session.run({**self.batches[i], **extra})  # noqa: E731
        elif cut is not None:
            suffix = self.cuts.runner(cut)
            run = lambda i: suffix({**self.batches[i], **extra}, self._anchor[1][i])  # noqa: E731
        else:
            run = lambda i: self.session.run({**self.batches[i], **extra}, self.outputs)  # noqa: E731
        if self.workers < 2:
            results = [run(i) for i in range(len(self.batches))]
        else:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="onnxopt-proxy") as pool:
                results = list(pool.map(run, range(len(self.batches))))
        if keep:
            self._anchor = (extra, [{name: r[name] for name in self.cuts.kept} for r in results])
            results = [{name: r[name] for name in self.outputs} for r in results]
        return results

    def close_cuts(self) -> None:
        """Free the memory the runs from a cut hold (the anchor's values, the suffix sessions): later removals run
        the whole model, with the same losses."""
        self.cuts.close()
        self._anchor = None

    def loss(self, removed: Mapping[str, np.ndarray], *, anchor: bool = False) -> float:
        """Mean over float outputs of ``Σ‖y' − y‖² / Σ‖y‖²`` for the removal ``{value name: channels}``.
        ``anchor``: the search's base removal, which most later removals differ from in one group only (their runs
        start at a cut before that group's masks, on this run's values)."""
        self.evaluations += 1
        errors = dict.fromkeys(self.outputs, 0.0)
        for got, reference in zip(self._outputs(removed, anchor), self.reference, strict=True):
            for name in self.outputs:
                diff = got[name].astype(np.float64) - reference[name]
                errors[name] += float(np.sum(np.square(np.nan_to_num(diff, nan=1e30, posinf=1e30, neginf=1e30))))
        return float(np.mean([errors[name] / self.energy[name] for name in self.outputs])) if self.outputs else 0.0


class Curves:
    """Each layer group's proxy error as its ratio rises alone along ``grid`` (from the base removal), computed
    lazily: a group's next step is scored only while a threshold asked for may still take it.

    ``removal(per_group)`` gives the removal of a setting (``{value name: channels}``) and how many units it
    removes; a step that removes no more than the one before (alignment, ``min_channels``) is skipped. A group's
    errors are made non-decreasing. Steps whose error reaches ``cap`` are never taken.

    Without ``costs``, a threshold ``τ`` gives every group its largest step whose error is within ``τ``. With
    ``costs`` (per group, the fraction of the model's measured layer time one unit saves:
    :mod:`onnxopt.passes._prune_latency`), the steps are ranked by time saved against error: ``τ`` gives every
    group the step that maximizes ``saved − error / τ`` (a Lagrangian allocation: at a given price of error, each
    group goes as far as the time it saves pays for its error), so a group whose channels cost more time goes
    further for the same error. In both cases a larger ``τ`` takes every group at least as far.
    """

    def __init__(
        self,
        proxy: MaskedProxy,
        groups: list[int],
        grid: tuple[float, ...],
        removal,
        *,
        cap: float = np.inf,
        costs: Mapping[int, float] | None = None,
    ) -> None:
        self.proxy, self.groups, self.grid, self.removal = proxy, groups, grid, removal
        self.cap, self.costs = cap, costs
        self.count, removed = removal({})
        self.base = proxy.loss(removed, anchor=True)
        # (ratio, error over base, fraction of the layer time saved (0 without costs))
        self.steps: dict[int, list[tuple[float, float, float]]] = {g: [] for g in groups}
        self._next = dict.fromkeys(groups, 0)  # index into grid of each group's next step
        self._last = dict.fromkeys(groups, self.count)
        self._full = {}  # per group, the time saved by its whole grid's last step (bounds what a step can save)
        if costs is not None:
            for group in groups:
                count, _ = removal({group: grid[-1]}) if grid else (self.count, None)
                self._full[group] = max(count - self.count, 0) * costs[group]

    def _wanted(self, group: int, tau: float) -> bool:
        """Whether a threshold ``tau`` may take the group's next step (its last scored one was within reach)."""
        steps = self.steps[group]
        if not steps:
            return True
        error = steps[-1][1]
        if error >= self.cap:
            return False
        return error <= (tau if self.costs is None else tau * self._full[group])

    def _extend(self, group: int, tau: float) -> None:
        steps = self.steps[group]
        while self._next[group] < len(self.grid) and self._wanted(group, tau):
            ratio = self.grid[self._next[group]]
            self._next[group] += 1
            count, removed = self.removal({group: ratio})
            if count == self._last[group]:
                continue
            self._last[group] = count
            error = max(self.proxy.loss(removed) - self.base, steps[-1][1] if steps else 0.0)
            saved = (count - self.count) * self.costs[group] if self.costs is not None else 0.0
            steps.append((ratio, error, saved))

    def first_errors(self) -> list[float]:
        """The threshold at which each group's first step is taken (scoring it): its error, or with ``costs`` its
        error per time saved; groups whose first step reaches ``cap`` are left out."""
        for group in self.groups:
            self._extend(group, -np.inf)
        firsts = [self.steps[g][0] for g in self.groups if self.steps[g] and self.steps[g][0][1] < self.cap]
        if self.costs is None:
            return [error for _, error, _ in firsts]
        return [error / saved if saved > 0 else np.inf for _, error, saved in firsts]

    def top(self) -> float:
        """The upper end of the thresholds a search tries: ``cap``; with ``costs``, ``cap`` per the median time a
        first step saves (from there on, only groups that save less than most would go further: a search that
        went up to the least of them would spend its first checks far beyond any budget)."""
        if self.costs is None:
            return self.cap
        saved = [self.steps[g][0][2] for g in self.groups if self.steps[g] and self.steps[g][0][2] > 0]
        return self.cap / float(np.median(saved)) if saved else self.cap

    def at(self, tau: float) -> dict[int, float]:
        """Per group, its ratio at threshold ``tau`` (groups that take no step are left out)."""
        per_group = {}
        for group in self.groups:
            self._extend(group, tau)
            steps = [step for step in self.steps[group] if step[1] < self.cap]
            if self.costs is None:
                within = [ratio for ratio, error, _ in steps if error <= tau]
                if within:
                    per_group[group] = within[-1]
                continue
            best, value = None, 0.0
            for ratio, error, saved in steps:
                if saved - error / tau > value:
                    best, value = ratio, saved - error / tau
            if best is not None:
                per_group[group] = best
        return per_group
