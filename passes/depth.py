"""`depth`: remove whole residual blocks that the error budget can spare (depth pruning).

A residual block computes ``y = x + f(x)``. Without retraining, some blocks' ``f`` matters little to the task
and others everything (``bench/results/block_drop.md``, one block at a time on the budget images): on CIFAR
ResNet-56, six of its 27 blocks cost 0.4 pp of top-1 or less, some even gain; on EfficientNet-Lite0 one block
costs 0.15 pp; on MobileNetV2 every block costs 1.5 pp or more. Channel pruning cannot find this: it removes
channels of a block, never its whole branch.

The pass finds every residual block (:func:`onnxopt.blocks.blocks`): an ``Add`` of a value ``x`` and a branch value
whose nodes all depend on ``x``, serve only the branch, include a layer (Conv, Gemm, MatMul), and give a value of
``x``'s shape. A block is removed by replacing its branch with a constant: zeros (``y = x``: the ``Add`` goes too),
or the branch's per-channel mean over the calibration data (``y = x + mean``, as ``prune``'s refit keeps a removed
channel's mean; it held where zeros did not on three of ResNet-56's blocks). Each block alone is checked against
the run's budget, with zeros and, where they break it, with the mean; then the blocks that held are taken greedily,
the most MACs saved per budget used first, each kept when the model with it and every block kept before still holds
the budget.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxopt import cost as cost_mod
from onnxopt import graph as graph_io
from onnxopt.blocks import Block, blocks
from onnxopt.budget import spent
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip, budget_figures
from onnxopt.stats import StatsRequest, get_stats

__all__ = ["DepthConfig", "DepthPass", "Block", "blocks", "drop"]

# the channel axis of a branch's mean, by the rank of the branch's value: images NCHW (1), sequences
# (batch, tokens, features) (-1); other ranks get the zeros form only
CHANNEL_AXIS = {4: 1, 3: -1, 2: -1}
# the least budget fraction a block is ranked by (one that gains is not infinitely good)
MIN_SPENT = 0.02


@dataclasses.dataclass(frozen=True)
class DepthConfig(PassConfig):
    max_blocks: int = dataclasses.field(default=0, metadata={"help": "remove at most this many blocks (0: no limit)"})
    refit: bool = dataclasses.field(
        default=True, metadata={"help": "also try each branch replaced by its mean over the calibration data"}
    )

    def __post_init__(self) -> None:
        if self.max_blocks < 0:
            raise ValueError("depth: max_blocks >= 0")


def drop(model: ir.Model, chosen: list[tuple[Block, np.ndarray | None]]) -> ir.Model:
    """``model`` (changed in place, and returned) with each block's branch replaced by zeros (``None``: the Add
    removed) or by the constant given (broadcast to the branch: shape ``(1, C, 1, 1)`` for images). The blocks'
    indices are ``model``'s own: take them from :func:`blocks` on this model or a clone of the one it came from."""
    nodes = list(model.graph)
    graph_outputs = {id(v) for v in model.graph.outputs}
    for block, constant in chosen:
        add = nodes[block.add]
        skip = add.inputs[1 - block.slot]
        if constant is None and id(add.outputs[0]) not in graph_outputs:
            ir.convenience.replace_all_uses_with(add.outputs[0], skip)
            continue
        value = np.zeros((1,) * block.rank, np.float32) if constant is None else constant
        init = graph_io.add_initializer(model.graph, f"{block.name}_depth_constant", value.astype(np.float32))
        add.replace_input_with(block.slot, init)
    RemoveUnusedNodesPass()(model)
    return model


class DepthPass(OptPass):
    """Remove residual blocks whose branch the error budget can spare (depth pruning)."""

    name = "depth"
    exact = False
    config_class = DepthConfig

    def needs_data(self, model: ir.Model) -> bool:
        return True  # which blocks go is decided by the budget, checked on data

    def stats_request(self, model: ir.Model) -> StatsRequest:
        if not self.config.refit:
            return StatsRequest()
        found = [b for b in blocks(model, shapes={}) if b.rank in CHANNEL_AXIS and b.branch]
        return StatsRequest(
            values=frozenset(b.branch for b in found),
            axes=frozenset((b.branch, CHANNEL_AXIS[b.rank]) for b in found if CHANNEL_AXIS[b.rank] != 1),
        )

    def call(self, model: ir.Model) -> OptResult:
        config: DepthConfig = self.config
        check = self.context.check if self.context is not None else None
        if check is None:
            raise ir.passes.PreconditionError("depth: needs evaluation data and a budget to decide which blocks go")
        counted = _cost(model, self.context)
        found = blocks(model, _output_shapes(model, counted))
        if not found:
            return OptResult(model, modified=False, skipped=[Skip("model", "no residual block")])
        by_name = {c.name: c.macs for c in counted.nodes}
        nodes = list(model.graph)
        macs = {b.add: sum(by_name.get(nodes[k].name, 0) for k in b.nodes) for b in found}
        total = max(counted.macs, 1)
        forms = {b.add: [None, *self._means(model, b)] for b in found}
        self.expect_trials(sum(len(f) for f in forms.values()) + len(found) - 1)
        budget = self.context.budget
        held: list[tuple[float, Block, np.ndarray | None]] = []  # (MACs saved per budget used, block, form)
        skipped: list[Skip] = []
        for block in found:  # zeros first (the Add goes too); the mean only where zeros break the budget
            best, report = None, None
            for form in forms[block.add]:
                report = check(drop(model.clone(), [(block, form)]))
                if report.ok:
                    used = spent(report, budget)
                    best = (form, 1.0 if used is None else used)
                    break
            if best is None:
                skipped.append(Skip(block.name, f"alone it breaks the budget: {budget_figures(report)}"))
            else:
                held.append((macs[block.add] / max(best[1], MIN_SPENT), block, best[0]))
        held.sort(key=lambda h: (-h[0], h[1].add))
        chosen: list[tuple[Block, np.ndarray | None]] = []
        for _, block, form in held:
            if config.max_blocks and len(chosen) >= config.max_blocks:
                skipped.append(Skip(block.name, f"max_blocks={config.max_blocks} reached"))
                continue
            # the first block alone is the model its own check passed: not checked again
            report = check(drop(model.clone(), [*chosen, (block, form)])) if chosen else None
            if report is None or report.ok:
                chosen.append((block, form))
            else:
                reason = f"with the blocks before it, breaks the budget: {budget_figures(report)}"
                skipped.append(Skip(block.name, reason))
        if not chosen:
            return OptResult(model, modified=False, skipped=skipped)
        changes = [
            Change(
                block.name,
                f"residual block removed ({macs[block.add] / total:.1%} of the MACs); its branch "
                f"{'dropped' if form is None else 'replaced by its mean'}",
            )  # fmt: skip
            for block, form in chosen
        ]
        drop(model, chosen)
        return OptResult(model, modified=True, changes=changes, skipped=skipped)

    def _means(self, model: ir.Model, block: Block) -> list[np.ndarray]:
        """The branch's per-channel mean, shaped to broadcast against it, when refit is on and statistics are there."""
        stats = get_stats(model) if self.config.refit else None
        entry = stats.channels.get(block.branch) if stats is not None else None
        if entry is None or block.rank not in CHANNEL_AXIS:
            return []
        shape = [1] * block.rank
        shape[CHANNEL_AXIS[block.rank]] = len(entry.mean)
        return [np.asarray(entry.mean, np.float32).reshape(shape)]


def _cost(model: ir.Model, context) -> cost_mod.ModelCost:
    """The model's cost per sample at the run's shapes (the data's: an image model's symbolic height and width made
    concrete), which also gives each node's output shape."""
    return cost_mod.estimate(model, input_shapes=context.input_shapes or None)


def _output_shapes(model: ir.Model, counted: cost_mod.ModelCost) -> dict[str, tuple[int, ...] | None]:
    """Each node's first output's concrete shape, by value name (graph inputs: their counted shapes)."""
    by_node = {c.name: c.output_shape for c in counted.nodes}
    shapes = {name: None if dims is None else tuple(dims) for name, dims in counted.input_shapes.items()}
    for node in model.graph:
        if node.name in by_node and node.outputs and node.outputs[0].name:
            shapes[node.outputs[0].name] = by_node[node.name]
    return shapes
