"""`distill`: label-free recovery by knowledge distillation from the original model (passes/distill.py), and the
torch versions of the transformer ops it trains through (onnxopt/_torch_ops_extra.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import PassManager, graph, registry
from onnxopt.validate import Budget
from tests import builders

torch = pytest.importorskip("torch")
from onnxopt.finetune import _Program, distill  # noqa: E402


def _encoder_block(seed: int = 0, vocab: int = 50, hidden: int = 16, ffn: int = 32) -> onnx.ModelProto:
    """Embedding Gather → masked self-attention (one head, mask via Equal/Where/Expand, sequence length from
    Shape/Slice) → residual + LayerNormalization → Erf-GELU FFN → residual + LayerNormalization → ReduceMean."""
    rng = np.random.default_rng(seed)

    def w(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        w("emb", vocab, hidden, scale=1.0),
        w("wq", hidden, hidden), w("wk", hidden, hidden), w("wv", hidden, hidden), w("wo", hidden, hidden),
        w("w1", hidden, ffn), w("b1", ffn), w("w2", ffn, hidden), w("b2", hidden),
        numpy_helper.from_array(np.ones(hidden, np.float32), "g1"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "z1"),
        numpy_helper.from_array(np.ones(hidden, np.float32), "g2"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "z2"),
        numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
        numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
        numpy_helper.from_array(np.array(1 / np.sqrt(hidden), np.float32), "scale"),
        numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([1], np.int64), "s_start"),
        numpy_helper.from_array(np.array([2], np.int64), "s_end"),
        numpy_helper.from_array(np.array([0], np.int64), "s_axis"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"]),
        helper.make_node("Shape", ["ids"], ["shape"]),
        helper.make_node("Slice", ["shape", "s_start", "s_end", "s_axis"], ["seq"]),
        helper.make_node("Equal", ["mask", "zero_i"], ["pad"]),
        helper.make_node("Unsqueeze", ["pad", "axis1"], ["pad3"]),
        helper.make_node("Concat", ["shape", "seq"], ["shape3"], axis=0),
        helper.make_node("Expand", ["pad3", "shape3"], ["padx"]),
        helper.make_node("Where", ["padx", "neg", "zero_f"], ["bias"]),
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["qks"]),
        helper.make_node("Add", ["qks", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"]),
        helper.make_node("MatMul", ["ctx", "wo"], ["att"]),
        helper.make_node("Add", ["x", "att"], ["r1"]),
        helper.make_node("LayerNormalization", ["r1", "g1", "z1"], ["h1"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["h1", "w1"], ["f0"]),
        helper.make_node("Add", ["f0", "b1"], ["f1"]),
        helper.make_node("Div", ["f1", "sqrt2"], ["f2"]),
        helper.make_node("Erf", ["f2"], ["f3"]),
        helper.make_node("Add", ["f3", "one"], ["f4"]),
        helper.make_node("Mul", ["f1", "f4"], ["f5"]),
        helper.make_node("Mul", ["f5", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["f6"]),
        helper.make_node("Add", ["f6", "b2"], ["f7"]),
        helper.make_node("Add", ["h1", "f7"], ["r2"]),
        helper.make_node("LayerNormalization", ["r2", "g2", "z2"], ["tokens"], axis=-1, epsilon=1e-5),
        helper.make_node("ReduceMean", ["tokens", "axis1"], ["pooled"], keepdims=0),
    ]
    inputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"]),
        helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "S"]),
    ]
    outputs = [
        helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", "S", hidden]),
        helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", hidden]),
    ]
    return builders.make_model(nodes, inputs, outputs, inits, opset=18)


def _tokens(count: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 50, (count, seq)).astype(np.int64)
    mask = np.ones((count, seq), np.int64)
    for row in range(count):
        mask[row, rng.integers(seq // 2, seq + 1) :] = 0
    return {"ids": ids, "mask": mask}


@pytest.mark.parametrize("seq", [5, 9])
def test_transformer_ops_match_onnxruntime(seq):
    """Gather, Shape/Slice/Concat, Equal/Unsqueeze/Expand/Where, LayerNormalization, Erf, ReduceMean in torch give
    onnxruntime's outputs on the unmodified model."""
    proto = _encoder_block()
    feeds = _tokens(3, seq)
    expected = builders.run(proto, feeds)
    with torch.no_grad():
        values = _Program(proto, None).run({k: torch.from_numpy(v) for k, v in feeds.items()}, {})
    for name in ("tokens", "pooled"):
        np.testing.assert_allclose(values[name].numpy(), expected[name], rtol=1e-4, atol=1e-5)


def _perturbed(proto: onnx.ModelProto, scale: float = 0.15, seed: int = 1) -> onnx.ModelProto:
    """The same graph with noise on its MatMul weights (a stand-in for what a lossy pass does)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    rng = np.random.default_rng(seed)
    for init in out.graph.initializer:
        if init.name in ("wq", "wk", "wv", "wo", "w1", "w2"):
            array = numpy_helper.to_array(init)
            init.CopyFrom(
                numpy_helper.from_array(array + scale * rng.standard_normal(array.shape).astype(np.float32), init.name)
            )
    return out


def _error(proto: onnx.ModelProto, teacher: onnx.ModelProto, feeds, name: str) -> float:
    got, ref = builders.run(proto, feeds)[name], builders.run(teacher, feeds)[name]
    return float(np.sum((got - ref) ** 2) / np.sum(ref**2))


def test_distill_pulls_a_perturbed_encoder_back_towards_the_original():
    teacher = _encoder_block()
    student = _perturbed(teacher)
    train = [_tokens(16, 8, seed=s) for s in range(6)]
    batches = [(f, builders.run(teacher, f)) for f in train]
    result = distill(graph.from_proto(student), batches, epochs=8, lr=3e-3)
    trained = graph.to_proto(result.model)
    held = _tokens(32, 8, seed=99)
    before, after = _error(student, teacher, held, "tokens"), _error(trained, teacher, held, "tokens")
    assert after < 0.5 * before, (before, after)
    assert result.losses[-1] < result.losses[0]
    # the graph is the same: node ops, names and initializer shapes; integer constants untouched
    assert [(n.op_type, list(n.input)) for n in trained.graph.node] == [
        (n.op_type, list(n.input)) for n in student.graph.node
    ]
    shapes = {i.name: (tuple(i.dims), i.data_type) for i in student.graph.initializer}
    assert {i.name: (tuple(i.dims), i.data_type) for i in trained.graph.initializer} == shapes
    ints = {i.name: numpy_helper.to_array(i) for i in student.graph.initializer if i.data_type == TensorProto.INT64}
    for init in trained.graph.initializer:
        if init.name in ints:
            np.testing.assert_array_equal(numpy_helper.to_array(init), ints[init.name])


def test_distill_pass_in_a_pipeline_recovers_a_pruned_mlp(tmp_path):
    """prune (uniform ratio, beyond a tight cosine budget) then distill: the result is closer to the original than the
    pruned model, judged on the evaluation data, and the report says by how much."""
    proto = builders.mlp(sizes=(12, 48, 48, 6), seed=3)
    path = builders.save(proto, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((512, 12)).astype(np.float32)}
    held = {"x": rng.standard_normal((256, 12)).astype(np.float32)}
    prune = registry.make_pass("prune", criterion="ratio", ratio=0.4)
    pruned = PassManager([prune], data=calib, eval_data=held, budget=Budget(min_cosine=0.0)).run(path)
    distill_pass = registry.make_pass("distill", epochs=30, lr=3e-3)
    prune2 = registry.make_pass("prune", criterion="ratio", ratio=0.4)
    report = PassManager([prune2, distill_pass], data=calib, eval_data=held, budget=Budget(min_cosine=0.0)).run(path)
    record = next(r for r in report.passes if r.name == "distill")
    assert record.modified, record.skipped
    assert "distillation loss" in record.changes[0].what
    ref = builders.run(proto, held)["y"]
    err = lambda m: float(np.sum((builders.run(graph.to_proto(m), held)["y"] - ref) ** 2) / np.sum(ref**2))  # noqa: E731
    assert err(report.model) < err(pruned.model)


def test_distill_without_calibration_data_is_skipped_with_the_reason(tmp_path):
    path = builders.save(builders.mlp(), tmp_path / "m.onnx")
    report = PassManager([registry.make_pass("distill")], validate=False).run(path)
    record = next(r for r in report.passes if r.name == "distill")
    assert not record.modified
    assert "calibration data" in record.skipped[0].reason


def test_distill_options_are_checked():
    from onnxopt.errors import UsageError

    with pytest.raises(UsageError, match="distill"):
        registry.make_pass("distill", epochs=0)


# --- intermediate (block output) matching: hidden -----------------------------------------------------------------
_H1 = "h1"  # the encoder block's first LayerNormalization output (the residual stream after attention)


def test_hidden_loss_is_zero_when_the_student_equals_the_teacher():
    teacher = _encoder_block()
    feeds = _tokens(8, 6)  # one batch: its loss is taken before the one Adam step
    batches = [(feeds, builders.run(builders.expose(teacher, [_H1]), feeds))]
    result = distill(graph.from_proto(teacher), batches, outputs=["pooled"], hidden=[_H1], epochs=1, lr=1e-3)
    assert result.hidden == [_H1]
    assert result.losses[0] < 1e-6, result.losses  # float32 torch vs onnxruntime rounding (a perturbed one: ~0.1)


def test_hidden_matching_pulls_a_perturbed_layer_back():
    """Only the attention output projection is perturbed; trained on the pooled output plus the first block output,
    the block output gets much closer to the teacher's, and closer than with the pooled output alone."""
    teacher = _encoder_block()
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    rng = np.random.default_rng(5)
    for init in student.graph.initializer:
        if init.name == "wo":
            array = numpy_helper.to_array(init)
            init.CopyFrom(
                numpy_helper.from_array(array + 0.3 * rng.standard_normal(array.shape).astype(np.float32), "wo")
            )
    exposed = builders.expose(teacher, [_H1])
    batches = [(f, builders.run(exposed, f)) for f in (_tokens(16, 8, seed=s) for s in range(6))]
    held = _tokens(32, 8, seed=99)
    ref = builders.run(exposed, held)[_H1]

    def inner_error(proto):
        got = builders.run(builders.expose(proto, [_H1]), held)[_H1]
        return float(np.sum((got - ref) ** 2) / np.sum(ref**2))

    with_hidden = distill(graph.from_proto(student), batches, outputs=["pooled"], hidden=[_H1], epochs=8, lr=3e-3)
    without = distill(graph.from_proto(student), batches, outputs=["pooled"], epochs=8, lr=3e-3)
    before = inner_error(student)
    after = inner_error(graph.to_proto(with_hidden.model))
    assert with_hidden.hidden == [_H1] and without.hidden == []
    assert after < 0.5 * before, (before, after)
    assert after < inner_error(graph.to_proto(without.model)), (after, inner_error(graph.to_proto(without.model)))


def _residual_cnn(width: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Two residual blocks (Conv → Relu → Conv → Add(skip) → Relu), the second on a 1×1 Conv's ``width`` channels,
    then GlobalAveragePool → Flatten → Gemm. Block outputs: ``b1`` (8 channels) and ``b2`` (``width`` channels)."""
    rng = np.random.default_rng(seed)
    full = 8

    def w(name, *shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    arrays = {
        "w0": w("w0", full, 3, 3, 3), "wa": w("wa", full, full, 3, 3), "wb": w("wb", full, full, 3, 3),
        "wt": w("wt", full, full, 1, 1), "wc": w("wc", full, full, 3, 3), "wd": w("wd", full, full, 3, 3),
        "wf": w("wf", 5, full), "bf": np.zeros(5, np.float32),
    }  # fmt: skip
    # a narrower second block: the first `width` channels of the transition and of both its convolutions
    arrays["wt"], arrays["wc"] = arrays["wt"][:width], arrays["wc"][:width, :width]
    arrays["wd"], arrays["wf"] = arrays["wd"][:width, :width], arrays["wf"][:, :width]
    conv = dict(kernel_shape=[3, 3], pads=[1] * 4)
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["s0"], **conv),
        helper.make_node("Relu", ["s0"], ["r0"]),
        helper.make_node("Conv", ["r0", "wa"], ["ca"], **conv),
        helper.make_node("Relu", ["ca"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb"], ["cb"], **conv),
        helper.make_node("Add", ["cb", "r0"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["b1"]),
        helper.make_node("Conv", ["b1", "wt"], ["t"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["t"], ["rt"]),
        helper.make_node("Conv", ["rt", "wc"], ["cc"], **conv),
        helper.make_node("Relu", ["cc"], ["rc"]),
        helper.make_node("Conv", ["rc", "wd"], ["cd"], **conv),
        helper.make_node("Add", ["cd", "rt"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["b2"]),
        helper.make_node("GlobalAveragePool", ["b2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )


def test_hidden_tensors_whose_shapes_differ_are_skipped():
    """A CNN whose second residual block was narrowed: its block output has the teacher's name but not its shape,
    so only the first block's output is matched (in finetune.distill on each batch, and in the pass's choice)."""
    from onnxopt.passes.distill import _block_outputs

    teacher, student = _residual_cnn(8), _residual_cnn(4)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)} for _ in range(2)]
    batches = [(f, builders.run(builders.expose(teacher, ["b1", "b2"]), f)) for f in feeds]
    result = distill(graph.from_proto(student), batches, hidden=["b1", "b2"], epochs=1, lr=1e-3)
    assert result.hidden == ["b1"]
    inferred = graph.from_proto(onnx.shape_inference.infer_shapes(student))
    assert [v.name for v in _block_outputs(inferred)] == ["b1", "b2"]


def test_distill_pass_with_hidden_on_a_narrowed_cnn(tmp_path):
    """The pass matches the kept block (named in its report), skips the narrowed one, and ends closer."""
    from onnxopt.passes.distill import _matching_blocks

    teacher = builders.save(_residual_cnn(8), tmp_path / "teacher.onnx")
    student = builders.save(_residual_cnn(4, seed=0), tmp_path / "student.onnx")
    assert _matching_blocks(graph.load(student), teacher) == ["b1"]
    rng = np.random.default_rng(1)
    calib = {"x": rng.standard_normal((128, 3, 6, 6)).astype(np.float32)}
    held = {"x": rng.standard_normal((64, 3, 6, 6)).astype(np.float32)}
    distill_pass = registry.make_pass("distill", epochs=10, lr=3e-3, hidden=True)
    report = PassManager([distill_pass], data=calib, eval_data=held, budget=Budget(min_cosine=0.0)).run(
        student, original=teacher
    )
    record = next(r for r in report.passes if r.name == "distill")
    assert record.modified, record.skipped
    assert "1 block output matched inside" in record.changes[0].what


def test_distill_hidden_weight_is_checked():
    from onnxopt.errors import UsageError

    with pytest.raises(UsageError, match="hidden_weight"):
        registry.make_pass("distill", hidden_weight=-1.0)


def _pruned_conv_pipeline(tmp_path, **distill_options):
    """prune (uniform ratio) then distill on a small image classifier (3x16x16 NCHW inputs)."""
    proto = builders.conv_net(channels=(3, 16, 16), size=16, seed=2)
    path = builders.save(proto, tmp_path / "cnn.onnx")
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((64, 3, 16, 16)).astype(np.float32)}
    held = {"x": rng.standard_normal((32, 3, 16, 16)).astype(np.float32)}
    passes = [
        registry.make_pass("prune", criterion="ratio", ratio=0.5, align=1, latency_guard=False),
        registry.make_pass("distill", **distill_options),
    ]
    report = PassManager(passes, data=calib, eval_data=held, budget=Budget(min_cosine=0.0)).run(path)
    return next(r for r in report.passes if r.name == "distill"), report.model


def test_distill_trains_an_image_model_on_new_views_each_epoch_with_the_teacher_run_on_them(tmp_path, monkeypatch):
    from onnxopt.passes import distill as distill_module

    seen = []
    original_run = distill_module._Teacher.run
    monkeypatch.setattr(distill_module._Teacher, "run", lambda self, feeds, outputs: (
        seen.append(feeds["x"].copy()), original_run(self, feeds, outputs))[1])  # fmt: skip
    record, _ = _pruned_conv_pipeline(tmp_path, epochs=3)
    assert len(seen) == 3 * 4  # 3 epochs of the 4 calibration batches of 16, each a new view
    calib = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)
    assert not any(np.allclose(view, calib[:16]) for view in seen)
    assert not np.allclose(seen[0], seen[4])  # the first batch in epochs 1 and 2: two views
    text = " ".join([c.what for c in record.changes] + [s.reason for s in record.skipped])
    assert "each of the 64 images seen as 3 random crops and flips" in text


def test_distill_without_augment_trains_on_the_images_as_given(tmp_path, monkeypatch):
    from onnxopt.passes import distill as distill_module

    monkeypatch.setattr(distill_module._Teacher, "run", lambda *a: pytest.fail("the teacher ran on a new view"))
    record, _ = _pruned_conv_pipeline(tmp_path, epochs=2, augment=False)
    text = " ".join([c.what for c in record.changes] + [s.reason for s in record.skipped])
    assert "distillation loss" in text and "random crops" not in text


def test_distill_judges_class_scores_by_their_distributions_not_their_offset():
    """The held-out loss ignores what softmax ignores: logits shifted by a constant per sample are the teacher's
    distribution (loss 0), though far off by squared error; another ranking of classes is not."""
    from onnxopt.passes.distill import _loss

    teacher = np.random.default_rng(0).standard_normal((8, 5))
    assert _loss(teacher + np.arange(8)[:, None] * 3.0, teacher, 2.0, False) == pytest.approx(0, abs=1e-12)
    assert _loss(teacher[:, ::-1], teacher, 2.0, False) > 0.1
    probabilities = np.exp(teacher) / np.exp(teacher).sum(axis=1, keepdims=True)
    assert _loss(probabilities, probabilities, 2.0, True) == pytest.approx(0, abs=1e-12)
    # any other output: squared error relative to the teacher's mean square
    features = np.random.default_rng(1).standard_normal((8, 1))
    assert _loss(features * 1.1, features, 2.0, False) == pytest.approx(0.01)


def test_distill_on_images_gives_the_same_weights_run_after_run(tmp_path):
    """Seeded views, seeded training order, one thread count: the same command trains the same model."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (first, one), (second, two) = (_pruned_conv_pipeline(tmp_path / d, epochs=20, lr=1e-2) for d in "ab")
    assert first.modified and second.modified, first.skipped
    for name, value in one.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), two.graph.initializers[name].const_value.numpy())


def test_when_the_views_do_not_help_distill_trains_on_the_images_as_given(tmp_path, monkeypatch):
    """Augmentation that fails on held-out data (here: every view blank) is not the end: the images as given are
    tried too, and the better of the two is kept; the report gives both losses."""
    import onnxopt.augment

    monkeypatch.setattr(onnxopt.augment, "augment_feeds", lambda feeds, rng: {k: v * 0 for k, v in feeds.items()})
    record, _ = _pruned_conv_pipeline(tmp_path, epochs=20, lr=1e-2)
    assert record.modified, record.skipped
    text = record.changes[0].what
    assert "random crops and flips; then -> " in text and text.endswith("the images as given")
    first, second = (float(part.split(" on ")[0]) for part in text.split("-> ")[1:3])
    assert second < first
