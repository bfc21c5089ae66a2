"""Residual blocks: where a graph computes ``y = x + f(x)``, and which nodes compute ``f``.

An ``Add`` of a value ``x`` (the skip) and a branch value is a residual block when the branch's nodes all depend
on ``x`` (ancestors that do not, such as an attention mask made once outside every block, are not part of it),
serve only the branch (no other consumer, no graph output), include a layer (Conv, ConvTranspose, Gemm, MatMul),
and the ``Add``'s output has ``x``'s shape, so that ``y = x`` can stand for it. A projection shortcut (the skip
goes through a layer of its own) is an ``Add`` of two branches and not a block.

Used by the ``depth`` pass (which blocks the budget can spare) and the goal search (whether ``depth`` joins the
ladder). Graph analysis only: nothing here changes a model except shape inference where an ``Add``'s shapes
are missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

__all__ = ["Block", "blocks", "LAYERS"]

# a branch must hold one of these to be a block (an Add of x and Relu(x) is not a block worth a check)
LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclasses.dataclass(frozen=True)
class Block:
    """One residual block: ``graph[add]`` adds the skip value (input ``1 - slot``) and the branch (input ``slot``),
    computed by the nodes at ``nodes`` (indices in the graph's order, which a clone keeps)."""

    add: int
    slot: int
    nodes: tuple[int, ...]
    name: str
    branch: str  # the branch value's name (its statistics)
    rank: int


def blocks(model: ir.Model, shapes: Mapping[str, tuple[int, ...] | None] | None = None) -> list[Block]:
    """Every residual block of ``model``'s main graph, in graph order (see the module doc for what counts).

    A block's Add must give its skip's shape: checked on ``shapes`` (value name -> the concrete shape the data
    gives it) where it has both, else on the declared shapes, inferred into ``model`` first where an Add's are
    missing (an image model with symbolic height and width needs ``shapes``). ``shapes={}`` checks no shape (the
    ``depth`` pass's statistics request, which asks for every candidate's statistics before the data's shapes are
    known)."""
    if shapes is None and any(n.op_type == "Add" and n.outputs[0].shape is None for n in model.graph):
        ShapeInferencePass(strict_mode=False)(model)
    nodes = list(model.graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    outputs = {id(v) for v in model.graph.outputs}
    found = []
    for i, node in enumerate(nodes):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a is None or b is None or (a.producer() is None and b.producer() is None):
            continue
        # the branch is the later of the two (a graph input or an initializer comes first: it can be the skip)
        slot = 0 if _order(a, index) > _order(b, index) else 1
        branch, skip = node.inputs[slot], node.inputs[1 - slot]
        if shapes != {} and not _same_shape(skip, node.outputs[0], shapes or {}):
            continue
        cone = _cone(branch, skip, index)
        if not cone or id(branch.producer()) not in cone or not any(nodes[k].op_type in LAYERS for k in cone.values()):
            continue
        inside = set(cone) | {id(node)}
        private = all(
            id(v) not in outputs and all(id(user) in inside for user, _ in v.uses())
            for k in cone.values()
            for v in nodes[k].outputs
        )
        if private:
            concrete = (shapes or {}).get(branch.name or "")
            rank = len(branch.shape) if branch.shape is not None else len(concrete) if concrete is not None else 0
            found.append(Block(i, slot, tuple(sorted(cone.values())), node.name or node.outputs[0].name,
                               branch.name or "", rank))  # fmt: skip
    return found


def _order(value: ir.Value, index: dict[int, int]) -> int:
    """Where ``value`` is made in the graph's order: its producer's index, or -1 for a graph input or initializer."""
    producer = value.producer()
    return -1 if producer is None else index.get(id(producer), -1)


def _same_shape(skip: ir.Value, out: ir.Value, shapes: Mapping[str, tuple[int, ...] | None]) -> bool:
    """Whether the Add's output has the skip's shape, so that ``y = x`` keeps it (unknown: no)."""
    known = shapes.get(skip.name or ""), shapes.get(out.name or "")
    if known[0] is not None and known[1] is not None:
        return tuple(known[0]) == tuple(known[1])
    if skip.shape is None or out.shape is None or len(skip.shape) != len(out.shape):
        return False
    return all(str(s) == str(o) and s is not None for s, o in zip(skip.shape, out.shape, strict=True))


def _cone(branch: ir.Value, skip: ir.Value, index: dict[int, int]) -> dict[int, int]:
    """The nodes that compute ``branch`` from ``skip``: ancestors of ``branch`` that depend on ``skip`` (by id,
    with their graph indices). Ancestors that do not depend on it (an attention mask made once) stay."""
    depends: dict[int, bool] = {}
    stack = [branch.producer()]
    order = []
    seen = set()
    while stack:  # ancestors, up to the skip value's producer and the graph's inputs
        node = stack.pop()
        if node is None or id(node) in seen or id(node) not in index:
            continue
        seen.add(id(node))
        order.append(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v is not skip)
    for node in sorted(order, key=lambda n: index[id(n)]):  # graph order: producers first
        depends[id(node)] = any(
            v is skip or (v is not None and v.producer() is not None and depends.get(id(v.producer()), False))
            for v in node.inputs
        )
    return {id(n): index[id(n)] for n in order if depends[id(n)]}
