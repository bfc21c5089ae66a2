"""`compact`: make the file small without touching what the model computes.

For small models the graph's text outweighs the weights: a 6,000-parameter CNN quantized to int8 holds
6 KB of weights and 9 KB of names and shape annotations. This pass, meant to run last:

- drops the shape/type annotations of intermediate values and initializers (``value_info``; onnxruntime
  infers them again);
- renames intermediate values, initializers and nodes to short names (base-36 counters); graph input and
  output names are kept, so callers see no difference;
- clears doc strings.

Exact: the same nodes, in the same order, with the same weights. Run it after the passes whose reports
you want to read by layer name (per-layer tables match layers by node name).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.pass_base import Change, OptPass, OptResult

__all__ = ["CompactPass"]

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _short(index: int) -> str:
    text = ""
    while True:
        index, digit = divmod(index, 36)
        text = _DIGITS[digit] + text
        if index == 0:
            return text


class CompactPass(OptPass):
    """Short internal names, no intermediate shape annotations, no doc strings (exact)."""

    name = "compact"
    exact = True
    infer_shapes_after = False
    simplify_after = False  # nothing to clean up, and simplify would annotate shapes again

    def call(self, model: ir.Model) -> OptResult:
        graph = model.graph
        keep = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
        values: list[ir.Value] = [v for v in graph.initializers.values() if v.name not in keep]
        for node in ir.traversal.RecursiveGraphIterator(graph):
            values.extend(v for v in node.outputs if v.name and v.name not in keep)
        # initializers leave the table before any is renamed: a new short name may be another one's old name
        renaming = [v for v in values if v.is_initializer()]
        for value in renaming:
            graph.initializers.pop(value.name)
        taken = set(keep)
        counter = 0
        renamed = annotations = 0
        seen: set[int] = set()
        for value in values:
            if id(value) in seen:
                continue
            seen.add(id(value))
            while _short(counter) in taken:
                counter += 1
            new = _short(counter)
            counter += 1
            value.name = new
            if value.type is not None or value.shape is not None:  # the tensor itself keeps dtype and shape
                annotations += 1
            value.type = None
            value.shape = None
            renamed += 1
        for value in renaming:
            graph.initializers.add(value)
        for index, node in enumerate(ir.traversal.RecursiveGraphIterator(graph)):
            node.name = _short(index)
            node.doc_string = None
        model.doc_string = None
        graph.doc_string = None
        changes = [Change("values", f"{renamed} renamed"), Change("value_info", f"{annotations} annotations dropped")]
        return OptResult(model, modified=bool(renamed or annotations), changes=changes)
