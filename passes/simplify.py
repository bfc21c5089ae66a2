"""`simplify`: lossless cleanup built from onnx_ir's common passes and onnxscript's optimizer and rules.

Steps, each exact up to float rounding:

1. Initializers listed as graph inputs (old exporters) stop being inputs unless
   ``keep_initializer_inputs``; onnxruntime can then fold them (Ultraface: BatchNorms on weight
   inputs). The IR version is raised to 4, the first that allows initializers outside the inputs.
2. ``Constant`` nodes become initializers (onnx_ir ``LiftConstantsToInitializersPass``).
3. onnxscript's optimizer folds constants, including ``ConstantOfShape``-made weights, up to
   ``fold_limit`` elements per tensor.
4. onnxscript rewrite rules fold BatchNormalization into a preceding Conv/ConvTranspose/Gemm and drop
   no-op Dropout/Transpose/Reshape chains.
5. Duplicate initializers are merged and unused nodes removed.

Before::

    X ─ Conv(W, B) ─ BatchNormalization(s, b, m, v) ─ Y

After::

    X ─ Conv(W·s/√(v+ε), (B−m)·s/√(v+ε)+b) ─ Y
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip

__all__ = ["SimplifyConfig", "SimplifyPass"]

logger = logging.getLogger(__name__)

_RULES = (
    "fuse_batchnorm_into_conv_rule",
    "fuse_batchnorm_into_conv_transpose_rule",
    "fuse_batchnorm_into_gemm_rule",
    "dropout_inference_rule",
    "dropout_zero_rule",
    "no_op_transpose_rule",
    "transpose_transpose_rule",
    "reshape_reshape_rule",
    "no_op_cast_rule",
)


@dataclasses.dataclass(frozen=True)
class SimplifyConfig(PassConfig):
    keep_initializer_inputs: bool = dataclasses.field(
        default=False, metadata={"help": "keep initializers listed as graph inputs (overridable weights)"}
    )
    fold_limit: int = dataclasses.field(
        default=1 << 26, metadata={"help": "largest tensor (elements) constant folding may create"}
    )


class SimplifyPass(OptPass):
    """Lossless cleanup: fold constants and BatchNorms, drop no-op nodes, lift weights out of graph inputs."""

    name = "simplify"
    exact = True
    config_class = SimplifyConfig

    def call(self, model: ir.Model) -> OptResult:
        config: SimplifyConfig = self.config
        nodes_before = _op_counts(model)
        changes: list[Change] = []
        skipped: list[Skip] = []
        graph = model.graph
        if not config.keep_initializer_inputs:
            lifted = [v.name for v in graph.inputs if v.name in graph.initializers]
            if lifted:
                ir_common.RemoveInitializersFromInputsPass()(model)
                model.ir_version = max(model.ir_version, 4)
                changes.append(Change("graph inputs", f"{len(lifted)} initializers are no longer graph inputs"))
        if ir_common.LiftConstantsToInitializersPass(lift_all_constants=False)(model).modified:
            changes.append(Change("Constant nodes", "lifted to initializers"))
        self._step(skipped, "constant folding", lambda: _fold(model, config.fold_limit))
        self._step(skipped, "rewrite rules", lambda: _rewrite(model))
        ir_common.DeduplicateInitializersPass()(model)
        ir_common.RemoveUnusedNodesPass()(model)
        nodes_after = _op_counts(model)
        for op in sorted(set(nodes_before) | set(nodes_after)):
            delta = nodes_after.get(op, 0) - nodes_before.get(op, 0)
            if delta:
                changes.append(Change(op, f"{nodes_before.get(op, 0)} -> {nodes_after.get(op, 0)} nodes"))
        return OptResult(model, modified=bool(changes), changes=changes, skipped=skipped)

    @staticmethod
    def _step(skipped: list[Skip], what: str, action) -> None:
        try:
            action()
        except Exception as e:  # a step onnxscript cannot do on this graph is declined, not fatal
            logger.info("simplify: %s skipped: %s", what, e)
            skipped.append(Skip(what, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))


def _fold(model: ir.Model, limit: int) -> None:
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model, input_size_limit=limit, output_size_limit=limit, inline=True)


def _rewrite(model: ir.Model) -> None:
    from onnxscript import rewriter
    from onnxscript.rewriter.rules import common as rules

    rewriter.rewrite(model, pattern_rewrite_rules=[getattr(rules, name) for name in _RULES])


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
