"""`simplify`: lossless cleanup built from onnx_ir's common passes and onnxscript's optimizer and rules.

Steps, each exact up to float rounding:

1. Initializers listed as graph inputs (old exporters) stop being inputs unless
   ``keep_initializer_inputs``; onnxruntime can then fold them (Ultraface: BatchNorms on weight
   inputs). The IR version is raised to 4, the first that allows initializers outside the inputs.
2. ``Constant`` nodes become initializers (onnx_ir ``LiftConstantsToInitializersPass``).
3. ``ConstantOfShape``-made weights (the onnx wheel's light models) become initializers, up to
   ``fold_limit`` elements each (``_fold``); inference Dropout goes, runtime Reshape targets become constant.
4. onnxscript's constant folding and default rules fold the remaining constant subgraphs.
5. onnxscript rewrite rules fold BatchNormalization into a preceding Conv/ConvTranspose/Gemm, drop no-op
   Dropout/Transpose/Reshape/Cast chains and turn 2-D MatMul+Add into Gemm.
6. Equal initializers are merged and identical nodes eliminated (CSE); a folded placeholder weight that
   is then read by several nodes is copied per reader again, so prune/svd can still rewrite it.
7. Per-channel Mul/Add after Conv/ConvTranspose/Gemm (tf2onnx's BatchNorm) fold into weight and bias
   (``_fold``); Identity nodes and unused nodes go.

Before::

    X ─ Conv(W, B) ─ BatchNormalization(s, b, m, v) ─ Y

After::

    X ─ Conv(W·s/√(v+ε), (B−m)·s/√(v+ε)+b) ─ Y
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxopt import graph as graph_io
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip
from onnxopt.passes import _fold, _names

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
    "matmul_add_to_gemm_rule",
    "materialize_reshape_shape_rule",
    "collapse_slice_rule",
    "collapse_slice2_rule",
    "unsqueeze_unsqueeze_rule",
    "squeeze_reshape_1d_rule",
    "no_op_expand_rule",
    "successive_relu_rule",
    "successive_clip_rule",
    "successive_clip_relu_rule",
    "successive_relu_clip_rule",
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
        folded = _fold.fold_constant_of_shape(model, config.fold_limit)
        for name in folded:
            changes.append(Change(name, "ConstantOfShape folded into an initializer"))
        for name in _fold.remove_inference_dropout(model):
            changes.append(Change(name, "inference-mode Dropout removed"))
        for name in _fold.constant_reshape_targets(model):
            changes.append(Change(name, "runtime Reshape target made constant"))
        fold = lambda m: _names.keep_names(m, lambda n: _optimize(n, config.fold_limit))  # noqa: E731
        self._step(skipped, "constant folding", lambda: _within_opset(model, fold))
        # Merge equal weights so identical nodes reading them merge too (what onnxruntime's own CSE does with
        # placeholder ConstantOfShape weights), then give every remaining reader of a folded placeholder its
        # own copy again: prune and svd skip shared weights, and the original had none.
        _contiguous_initializers(model)  # the hash reads raw buffers: a folded Transpose leaves a strided view
        ir_common.DeduplicateHashedInitializersPass()(model)  # sha512, and values compared on a hash match
        ir_common.CommonSubexpressionEliminationPass()(model)
        _fold.unshare(model, {v.name for v in model.graph.initializers.values() if v.name.endswith("_folded")})
        # Affine folds first so MatMul+Mul+Add ends as MatMul+Add for the Gemm rule, again after the
        # BatchNorm rules, whose fused Conv may be followed by another Mul/Add.
        affine = _fold.fold_affine_into_producer(model)
        self._step(skipped, "rewrite rules", lambda: _within_opset(model, lambda m: _names.keep_names(m, _rewrite)))
        affine += _fold.fold_affine_into_producer(model)
        for name in affine:
            changes.append(Change(name, "per-channel Mul/Add folded into weight and bias"))
        for name in _fold.axes_inputs_to_attributes(model):
            changes.append(Change(name, f"axes input made an attribute again (opset {graph_io.default_opset(model)})"))
        ir_common.IdentityEliminationPass()(model)
        ir_common.RemoveUnusedNodesPass()(model)
        if model.ir_version < 4 and any(not v.is_graph_input() for v in model.graph.initializers.values()):
            model.ir_version = 4  # lifted Constant nodes are initializers that are not graph inputs: IR >= 4
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


def _within_opset(model: ir.Model, step) -> None:
    """Run ``step`` on ``model``; below opset 13 on a copy, kept only if it wrote no opset-13-only form.

    onnxscript writes Unsqueeze/Squeeze/Split with an axes input whatever the opset; a constant one goes back
    into the attribute (``_fold.axes_inputs_to_attributes``), a runtime one (``SplitToSequence`` with a
    ``split`` graph input) cannot: the step is then declined.
    """
    if graph_io.default_opset(model) >= 13:
        step(model)
        return
    candidate = model.clone()
    step(candidate)
    _fold.axes_inputs_to_attributes(candidate)
    for node in candidate.graph:
        if node.op_type in _fold.AXES_INPUTS and len(node.inputs) > 1 and node.inputs[1] is not None:
            raise ValueError(
                f"it writes {node.op_type} with a runtime {_fold.AXES_INPUTS[node.op_type]} input, "
                f"which opset {graph_io.default_opset(model)} does not allow"
            )
    graph_io.adopt(model, candidate)


def _optimize(model: ir.Model, limit: int) -> None:
    """onnxscript's ``optimize_ir``, with the deduplication done by the caller (see ``call``)."""
    import onnxscript.optimizer
    from onnxscript import rewriter

    ir_common.InlinePass()(model)
    for _ in range(2):
        onnxscript.optimizer.fold_constants_ir(
            model, onnx_shape_inference=True, input_size_limit=limit, output_size_limit=limit
        )
        rewriter.rewrite(model)  # onnxscript's default, output-preserving rules
        ir_common.RemoveUnusedNodesPass()(model)
    ir_common.RemoveUnusedFunctionsPass()(model)
    ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    ir_common.CommonSubexpressionEliminationPass()(model)


def _rewrite(model: ir.Model) -> None:
    from onnxscript import rewriter
    from onnxscript.rewriter.rules import common as rules

    rewriter.rewrite(model, pattern_rewrite_rules=[getattr(rules, name) for name in _RULES])


def _contiguous_initializers(model: ir.Model) -> None:
    """Give every in-memory initializer held as a non-contiguous numpy view a contiguous copy."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray) and not tensor.raw.flags.c_contiguous:
            value.const_value = ir.Tensor(np.ascontiguousarray(tensor.raw), name=tensor.name, dtype=tensor.dtype)


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
