"""Residual blocks (onnxopt.blocks): which Adds are blocks, which nodes their branches hold, and the shape rule."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxopt.blocks import blocks
from tests import builders


def test_blocks_are_adds_of_a_value_and_a_branch_that_only_it_feeds():
    found = blocks(ir.from_proto(builders.residual_net()))
    assert [b.name for b in found] == ["b0.add", "b1.add"]
    model = ir.from_proto(builders.residual_net())
    nodes = list(model.graph)
    assert [[nodes[k].name for k in b.nodes] for b in blocks(model)] == [
        ["b0.c1", "b0.c1.relu", "b0.c2"], ["b1.c1", "b1.c1.relu", "b1.c2"]
    ]  # fmt: skip
    # a projection shortcut: the branch does not depend on the skip value (both read the block's input)
    assert [b.name for b in blocks(ir.from_proto(builders.residual_net(extra="projection")))] == ["b1.add"]
    # a branch value the graph also returns cannot go
    assert [b.name for b in blocks(ir.from_proto(builders.residual_net(extra="exposed")))] == ["b1.add"]
    # no layer in the branch, or a constant addend: not a block
    plain = builders.make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"]),
         helper.make_node("Add", ["y", "c"], ["z"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones((2, 3), np.float32), "c")],
    )  # fmt: skip
    assert blocks(ir.from_proto(plain)) == []


def _padded(x_shape):
    """Add(x, Conv(x)) where the 1x1 Conv pads by one: the sum is larger than x, so ``y = x`` cannot stand for it.
    The sum is not a graph output (an Identity of it is), so its shape is inferred, not declared."""
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["r"], name="c", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["x", "r"], ["y"], name="add"),
        helper.make_node("Identity", ["y"], ["z"]),
    ]
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, "A", "B"])],
        [w],
    )


def test_an_add_that_broadcasts_the_skip_to_a_larger_shape_is_not_a_block():
    # x (2,4,1,1), the sum (2,4,3,3) by shape inference
    assert blocks(ir.from_proto(_padded([2, 4, 1, 1]))) == []
    # symbolic height and width: unknown is no, unless the data's concrete shapes say otherwise
    symbolic = _padded(["N", 4, "H", "W"])
    assert blocks(ir.from_proto(symbolic)) == []
    concrete = {"x": (2, 4, 1, 1), "r": (2, 4, 3, 3), "y": (2, 4, 3, 3)}
    assert blocks(ir.from_proto(symbolic), shapes=concrete) == []
    same = {"x": (2, 4, 5, 5), "r": (2, 4, 5, 5), "y": (2, 4, 5, 5)}  # what a pad-free branch would give
    assert [b.name for b in blocks(ir.from_proto(symbolic), shapes=same)] == ["add"]
    # shapes={} checks no shape (the statistics request, before the data's shapes are known)
    assert [b.name for b in blocks(ir.from_proto(_padded([2, 4, 1, 1])), shapes={})] == ["add"]
