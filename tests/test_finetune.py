"""Fine-tuning an ONNX model's weights in place (onnxopt/finetune.py): the torch forward is onnxruntime's, training
lowers the loss, and only float weights change."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import graph
from onnxopt.errors import OnnxoptError
from tests import builders
from tests.passes.test_reconstruct import LAYERS, _single

torch = pytest.importorskip("torch")
from onnxopt.finetune import _Program, finetune  # noqa: E402

RNG = np.random.default_rng(0)


def _forward(proto, feeds):
    with torch.no_grad():
        out = _Program(proto, None).forward({k: torch.from_numpy(v) for k, v in feeds.items()}, {}, logits=False)
    return out.numpy()


@pytest.mark.parametrize(("op", "attrs", "spatial"), LAYERS, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(LAYERS)])
def test_conv_and_conv_transpose_match_onnxruntime(op, attrs, spatial):
    """Strides, explicit and auto pads, output_padding, output_shape, dilations, 1-D: the same output as onnxruntime."""
    proto, _, _ = _single(op, attrs, spatial)
    x = RNG.standard_normal((2, 3, *spatial)).astype(np.float32)
    np.testing.assert_allclose(_forward(proto, {"x": x}), builders.run(proto, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def _pool_net():
    """Conv → BatchNorm → Relu → MaxPool(pads) → Concat with AveragePool → Reshape → MatMul → Add → Softmax."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array((1 + 0.2 * rng.random(4)).astype(np.float32), "s"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bb"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
        numpy_helper.from_array((1 + rng.random(4)).astype(np.float32), "v"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((128, 5)).astype(np.float32), "fw"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["r"], ["a"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["p", "a"], ["cat"], axis=1),
        helper.make_node("Reshape", ["cat", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fw"], ["mm"]),
        helper.make_node("Add", ["mm", "fb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )


@pytest.mark.parametrize("name", ["pool_net", "conv_net", "mlp"])
def test_graphs_match_onnxruntime(name):
    proto = {"pool_net": _pool_net, "conv_net": builders.conv_net, "mlp": builders.mlp}[name]()
    shape = [d.dim_value or 3 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = RNG.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(_forward(proto, {"x": x}), builders.run(proto, {"x": x})["y"], rtol=1e-4, atol=1e-5)


def test_training_lowers_the_loss_and_changes_only_float_weights():
    proto = _pool_net()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 2, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 256)
    result = finetune(graph.from_proto(proto), {"x": x}, y, epochs=5, lr=1e-2, batch_size=64)
    assert result.losses[-1] < 0.7 * result.losses[0]
    tuned = graph.to_proto(result.model)
    # same nodes, inputs, outputs; only the learnable float initializers changed (BN statistics and shapes did not)
    assert [(n.op_type, list(n.input), list(n.output)) for n in tuned.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in proto.graph.node
    ]
    before = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in tuned.graph.initializer}
    assert before.keys() == after.keys()
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed == {"w", "s", "bb", "fw", "fb"}
    assert all(after[n].dtype == before[n].dtype and after[n].shape == before[n].shape for n in before)

    # the model onnxruntime runs is the model trained: its cross-entropy under onnxruntime fell as much
    def cross_entropy(model):
        p = builders.run(model, {"x": x})["y"]
        return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())

    assert cross_entropy(tuned) < 0.7 * cross_entropy(proto)
    onnx.checker.check_model(tuned, full_check=True)


def test_mse_training_on_a_regression_output():
    proto = builders.mlp(sizes=(6, 12, 3))
    x = np.random.default_rng(3).standard_normal((200, 6)).astype(np.float32)
    target = (x[:, :3] * 2).astype(np.float32)
    result = finetune(graph.from_proto(proto), {"x": x}, target, loss="mse", epochs=20, lr=1e-2, batch_size=50)
    got = builders.run(graph.to_proto(result.model), {"x": x})["y"]
    before = builders.run(proto, {"x": x})["y"]
    assert np.mean((got - target) ** 2) < 0.5 * np.mean((before - target) ** 2)


def test_unsupported_ops_and_bad_arguments_are_clear_errors():
    proto = builders.mlp()
    proto.graph.node[1].op_type = "Selu"
    with pytest.raises(OnnxoptError, match="does not support op.*Selu"):
        finetune(graph.from_proto(proto), {"x": np.zeros((2, 8), np.float32)}, np.zeros(2))
    good = graph.from_proto(builders.mlp())
    with pytest.raises(OnnxoptError, match="unknown loss"):
        finetune(good, {"x": np.zeros((2, 8), np.float32)}, np.zeros(2), loss="hinge")
    with pytest.raises(OnnxoptError, match="same number of samples"):
        finetune(good, {"x": np.zeros((2, 8), np.float32)}, np.zeros(3))
    with pytest.raises(OnnxoptError, match="no graph output named"):
        finetune(good, {"x": np.zeros((2, 8), np.float32)}, np.zeros(2), output="nope")


def test_prune_finetune_prune_cycle():
    """The Python API's iterative cycle: a pruned model fine-tunes, and the fine-tuned model prunes again."""
    from onnxopt import cost, registry
    from onnxopt.manager import PassManager
    from onnxopt.validate import Budget

    rng = np.random.default_rng(4)
    proto = builders.mlp(sizes=(8, 32, 32, 4), seed=4)
    x = rng.standard_normal((512, 8)).astype(np.float32)
    logits = builders.run(proto, {"x": x})["y"]
    y = logits.argmax(1)  # the original's own decisions as labels
    model = graph.from_proto(proto)
    budget = Budget(max_accuracy_drop=100.0)

    def prune(m):
        return PassManager([registry.make_pass("prune", criterion="ratio", ratio=0.25, align=1)], data={"x": x[:256]},
                           eval_data={"x": x, "labels": y}, budget=budget).run(graph.clone(m)).model  # fmt: skip

    first = prune(model)
    # distillation: the pruned model learns the original's outputs (MSE on the logits)
    tuned = finetune(first, {"x": x}, logits, loss="mse", epochs=10, lr=3e-3, batch_size=64)
    assert tuned.losses[-1] < tuned.losses[0]

    def error(m):
        return float(np.mean((builders.run(graph.to_proto(m), {"x": x})["y"] - logits) ** 2))

    assert error(tuned.model) < 0.5 * error(first)  # fine-tuning wins back what pruning lost
    second = prune(tuned.model)
    macs = [cost.estimate(m).macs for m in (model, first, tuned.model, second)]
    assert macs[0] > macs[1] == macs[2] > macs[3]
    out = graph.to_proto(second)
    onnx.checker.check_model(out, full_check=True)
    assert builders.run(out, {"x": x})["y"].shape == (512, 4)


def test_distillation_from_the_teachers_logits():
    """``logits`` reads the Softmax input (as onnxruntime computes it); ``distill`` moves a damaged student's
    softened distribution towards the teacher's, so its decisions agree with the teacher's more often."""
    from onnxopt.finetune import logits

    teacher = _pool_net()  # ends in Softmax
    rng = np.random.default_rng(5)
    x = rng.standard_normal((512, 2, 8, 8)).astype(np.float32)
    z = logits(graph.from_proto(teacher), {"x": x}, batch_size=100)
    assert z.shape == (512, 5)
    softmax = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(1, keepdims=True), builders.run(teacher, {"x": x})["y"],
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for init in student.graph.initializer:  # damage the student's weights
        if init.name in ("w", "fw"):
            array = numpy_helper.to_array(init)
            init.CopyFrom(
                numpy_helper.from_array(array + rng.normal(0, 0.5, array.shape).astype(array.dtype), init.name)
            )

    def agreement(model):
        return float((builders.run(model, {"x": x})["y"].argmax(1) == z.argmax(1)).mean())

    result = finetune(graph.from_proto(student), {"x": x}, z, loss="distill", epochs=10, lr=1e-2, batch_size=64)
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert agreement(graph.to_proto(result.model)) > agreement(student) + 0.1
    with pytest.raises(OnnxoptError, match="temperature"):
        finetune(graph.from_proto(student), {"x": x}, z, loss="distill", temperature=0)
