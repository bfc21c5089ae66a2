"""Keep the user's node names through rewrites that replace nodes (onnxscript's folds and rules).

onnxscript's BatchNorm fusion replaces ``Conv → BatchNormalization`` by a *new* Conv, which the rewriter
names after its op (``node_Conv_3``), so ``/layer1/layer1.0/conv1/Conv`` disappears from the result: the
skip reasons of later passes and the HTML report's per-layer table (matched by node name) no longer name
the user's layers. :func:`keep_names` runs such a step and gives each new node the name of the node it
replaced::

    before:  X ─ Conv "/layer1/conv1/Conv"(W) ─ BatchNormalization "/layer1/bn1/BN" ─ Y
    after:   X ─ Conv "/layer1/conv1/Conv"(W') ─ Y          (not "node_Conv_3")

A new node replaces a removed node when both read the same data value (input 0, the same ``ir.Value``), have
the same op type (or MatMul → Gemm, the MatMul+Add fusion; Flatten → Reshape) and weights of the same shape.
When that does not single out one removed node, the generated name stays: a wrong name would be worse than a
new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx_ir as ir

__all__ = ["keep_names"]

logger = logging.getLogger(__name__)

# a new node of the key's type may take the name of a removed node of these types (MatMul+Add -> Gemm;
# onnxscript writes Flatten as Reshape)
_SUCCESSORS = {"Gemm": ("Gemm", "MatMul"), "Reshape": ("Reshape", "Flatten")}
# ops whose input 1 is a weight: its shape tells apart two replaced nodes reading the same data
_WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def keep_names(model: ir.Model, step: Callable[[ir.Model], object]) -> list[tuple[str, str]]:
    """Run ``step(model)`` (in place), then rename the nodes it created after the nodes they replaced.

    Returns:
        ``(generated name, kept name)`` for each renamed node.
    """
    # the nodes (and through them their input values) stay referenced, so no id is reused during the step
    old = {id(node): (node, node.name, _signature(node), tuple(node.inputs)) for node in model.graph}
    step(model)
    current = list(model.graph)
    alive = {id(node) for node in current}
    removed: dict[tuple, list[tuple[str, str]]] = {}  # (data input id, weight shape) -> [(op_type, name)]
    for key, (_node, name, signature, _inputs) in old.items():
        if key not in alive and name and signature is not None:
            removed.setdefault(signature[1:], []).append((signature[0], name))
    if not removed:
        return []
    taken = {node.name for node in current}
    renamed = []
    for node in current:
        if id(node) in old:
            continue
        signature = _signature(node)
        if signature is None:
            continue
        ops = _SUCCESSORS.get(node.op_type, (node.op_type,))
        matches = [name for op, name in removed.get(signature[1:], []) if op in ops and name not in taken]
        if len(matches) != 1:
            continue
        generated, node.name = node.name, matches[0]
        taken.add(node.name)
        renamed.append((generated or "", node.name))
    if renamed:
        logger.debug("kept %d node names: %s", len(renamed), renamed[:5])
    return renamed


def _signature(node: ir.Node) -> tuple | None:
    """``(op_type, id of the data input, weight shape or None)``; ``None`` for a node without a data input."""
    if not node.inputs or node.inputs[0] is None:
        return None
    weight = node.inputs[1] if len(node.inputs) > 1 and node.op_type in _WEIGHTED else None
    shape = None
    if weight is not None and weight.shape is not None:
        shape = tuple(weight.shape)
    elif weight is not None and weight.const_value is not None:
        shape = tuple(weight.const_value.shape)
    return node.op_type, id(node.inputs[0]), shape
