"""Tiny ONNX models for tests, built with onnx.helper from seeded weights. IR version pinned (onnx writes 14)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8


def make_model(nodes, inputs, outputs, inits, *, opset: int = 17, ir_version: int = IR_VERSION) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def mlp(*, sizes=(8, 16, 4), batch="N", seed: int = 0, opset: int = 17, bias_shift: float = 0.0) -> onnx.ModelProto:
    """Gemm → Relu → ... → Gemm. Hidden activations are named ``h1``, ``h2``...; output ``y``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i, (cin, cout) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        w = numpy_helper.from_array((rng.standard_normal((cout, cin)) / np.sqrt(cin)).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array((rng.standard_normal(cout) * 0.5 + bias_shift).astype(np.float32), f"b{i}")
        inits += [w, b]
        last = i == len(sizes) - 1
        out = "y" if last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, sizes[-1]])],
        inits,
        opset=opset,
    )


def conv_net(
    *, channels=(3, 8, 6), size: int = 10, batch="N", seed: int = 0, opset: int = 17, with_bn: bool = True
) -> onnx.ModelProto:
    """Conv(3×3, pad 1) → [BatchNorm] → Relu → Conv(3×3, stride 2) → Relu → GlobalAveragePool → Flatten → Gemm."""
    rng = np.random.default_rng(seed)
    c0, c1, c2 = channels
    inits = [
        numpy_helper.from_array(rng.standard_normal((c1, c0, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(c1).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((c2, c1, 3, 3)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.standard_normal((5, c2)).astype(np.float32), "wf"),
        numpy_helper.from_array(np.zeros(5, np.float32), "bf"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4)]
    act_in = "c1"
    if with_bn:
        inits += [
            numpy_helper.from_array((1 + 0.2 * rng.random(c1)).astype(np.float32), "bn_s"),
            numpy_helper.from_array((0.1 * rng.standard_normal(c1)).astype(np.float32), "bn_b"),
            numpy_helper.from_array((0.1 * rng.standard_normal(c1)).astype(np.float32), "bn_m"),
            numpy_helper.from_array((1 + 0.1 * rng.random(c1)).astype(np.float32), "bn_v"),
        ]
        nodes.append(
            helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn1"], name="bn1")
        )
        act_in = "bn1"
    nodes += [
        helper.make_node("Relu", [act_in], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c0, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        inits,
        opset=opset,
    )


def expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with intermediate values ``names`` added as float outputs (a test oracle)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in names:
        copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, optimize: bool = False) -> dict[str, np.ndarray]:
    """Outputs of ``model`` under onnxruntime: no graph optimizations unless ``optimize`` (all of them, as deployed;
    a QDQ model then runs integer kernels instead of its float simulation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def tiny_bert(
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    ffn: int = 64,
    vocab: int = 100,
    max_positions: int = 64,
    symbolic_seq: bool = True,
    seq: int = 16,
    opset: int = 17,
    seed: int = 0,
) -> onnx.ModelProto:
    """A BERT-like encoder: inputs ``input_ids``/``attention_mask`` (int64, [batch, seq]), output ``last_hidden_state``.

    Word + position embeddings (Gather) and LayerNorm, then ``layers`` post-LN blocks: Q/K/V/output projections
    as MatMul + Add, heads split by Reshape/Transpose, scaled scores plus the additive mask, Softmax, an FFN with
    exact Gelu (Erf), residual Adds. The batch dim is symbolic, the sequence too unless ``symbolic_seq=False``
    (then ``seq``). LayerNormalization from opset 17; below it, its ReduceMean decomposition (opset >= 13).
    MACs per sample at ``s`` tokens (:func:`tiny_bert_macs`): ``layers · s · (4·hidden² + 2·hidden·ffn + 2·s·hidden)``.
    Node names: ``layer{i}/q``, ``/k``, ``/v``, ``/scores``, ``/context``, ``/out``, ``/ffn1``, ``/ffn2``...
    """
    if opset < 13:
        raise ValueError("tiny_bert needs opset >= 13")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(name, shape, scale):
        return const(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def layer_norm(x, prefix):
        gamma = const(f"{prefix}.gamma", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        beta = const(f"{prefix}.beta", (0.1 * rng.standard_normal(hidden)).astype(np.float32))
        if opset >= 17:
            return node("LayerNormalization", [x, gamma, beta], f"{prefix}/ln", axis=-1, epsilon=1e-12)
        mean = node("ReduceMean", [x], f"{prefix}/mean", axes=[-1])
        centred = node("Sub", [x, mean], f"{prefix}/centred")
        var = node("ReduceMean", [node("Mul", [centred, centred], f"{prefix}/sq")], f"{prefix}/var", axes=[-1])
        eps = node("Add", [var, const(f"{prefix}.eps", np.float32(1e-12))], f"{prefix}/var_eps")
        scaled = node("Mul", [node("Div", [centred, node("Sqrt", [eps], f"{prefix}/std")], f"{prefix}/norm"), gamma],
                      f"{prefix}/scaled")  # fmt: skip
        return node("Add", [scaled, beta], f"{prefix}/ln")

    def linear(x, prefix, cin, cout):
        y = node("MatMul", [x, weight(f"{prefix}.weight", (cin, cout), 1 / np.sqrt(cin))], prefix)
        return node("Add", [y, weight(f"{prefix}.bias", cout, 0.02)], f"{prefix}/bias")

    def heads_of(x, prefix, perm):
        return node("Transpose", [node("Reshape", [x, split], f"{prefix}/split")], f"{prefix}/heads", perm=perm)

    split = const("heads_shape", np.array([0, -1, heads, head_dim], np.int64))
    merge = const("hidden_shape", np.array([0, -1, hidden], np.int64))
    # embeddings: word + position (positions 0..seq-1 from the run-time sequence length)
    words = node("Gather", [weight("embeddings.word", (vocab, hidden), 1.0), "input_ids"], "embed/words")
    length = node("Gather", [node("Shape", ["input_ids"], "embed/shape"), const("one", np.int64(1))], "embed/len")
    positions = node("Range", [const("zero", np.int64(0)), length, "one"], "embed/positions")
    pos = node("Gather", [weight("embeddings.position", (max_positions, hidden), 1.0), positions], "embed/pos")
    x = layer_norm(node("Add", [words, pos], "embed/sum"), "embed")
    # additive mask [batch, 1, 1, seq]: 0 where attended, -10000 where padded
    mask = node("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    mask = node("Sub", [const("one_f", np.float32(1)), mask], "mask/inverted")
    mask = node("Mul", [mask, const("mask_value", np.float32(-10000))], "mask/scaled")
    mask = node("Unsqueeze", [mask, const("mask_axes", np.array([1, 2], np.int64))], "mask/additive")
    scale = const("score_scale", np.float32(np.sqrt(head_dim)))
    for i in range(layers):
        p = f"layer{i}"
        q = heads_of(linear(x, f"{p}/q", hidden, hidden), f"{p}/q", [0, 2, 1, 3])
        k = heads_of(linear(x, f"{p}/k", hidden, hidden), f"{p}/k", [0, 2, 3, 1])
        v = heads_of(linear(x, f"{p}/v", hidden, hidden), f"{p}/v", [0, 2, 1, 3])
        scores = node("Div", [node("MatMul", [q, k], f"{p}/scores"), scale], f"{p}/scores/scaled")
        probs = node("Softmax", [node("Add", [scores, mask], f"{p}/scores/masked")], f"{p}/probs", axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v], f"{p}/context")], f"{p}/context/t", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, merge], f"{p}/context/merged")
        x = layer_norm(node("Add", [linear(context, f"{p}/out", hidden, hidden), x], f"{p}/attn/residual"), f"{p}/attn")
        h = linear(x, f"{p}/ffn1", hidden, ffn)
        erf = node("Erf", [node("Div", [h, const(f"{p}.sqrt2", np.float32(np.sqrt(2)))], f"{p}/gelu/div")],
                   f"{p}/gelu/erf")  # fmt: skip
        gelu = node("Mul", [h, node("Add", [erf, const(f"{p}.gelu_one", np.float32(1))], f"{p}/gelu/add")],
                    f"{p}/gelu/mul")  # fmt: skip
        gelu = node("Mul", [gelu, const(f"{p}.half", np.float32(0.5))], f"{p}/gelu")
        x = layer_norm(node("Add", [linear(gelu, f"{p}/ffn2", ffn, hidden), x], f"{p}/ffn/residual"), f"{p}/ffn")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    seq_dim = "seq" if symbolic_seq else seq
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq_dim]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq_dim]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", seq_dim, hidden])],
        inits,
        opset=opset,
        ir_version=10,
    )


def tiny_bert_macs(*, layers: int = 2, hidden: int = 32, ffn: int = 64, tokens: int = 16) -> int:
    """The hand count of :func:`tiny_bert`'s MACs per sample: projections, FFN, attention scores and context."""
    return layers * tokens * (4 * hidden * hidden + 2 * hidden * ffn + 2 * tokens * hidden)


def tiny_bert_feeds(batch: int = 1, tokens: int = 16, *, vocab: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for :func:`tiny_bert`: random token ids and a mask with each row after the first tail-padded."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, tokens), np.int64)
    for row in range(1, batch):
        mask[row, rng.integers(max(1, tokens // 2), tokens + 1) :] = 0
    return {"input_ids": rng.integers(0, vocab, (batch, tokens)).astype(np.int64), "attention_mask": mask}


def residual_net(scales=(1e-4, 1.0), biases=(0.0, 0.0), seed=0, extra=None, channels=8) -> onnx.ModelProto:
    """x (N,4,8,8) -> Conv+Relu -> two residual blocks (Conv 3x3, Relu, Conv 1x1 whose weights are scaled by
    ``scales[i]`` and whose bias is ``biases[i]``) -> GlobalAveragePool -> Flatten -> Gemm (5 classes). ``extra``:
    ``"projection"`` makes the first block's skip a 1x1 Conv of its input (not a block), ``"exposed"`` makes the
    first block's Relu a graph output too (not a block either)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name, src, cin, cout, k, scale=1.0, bias=0.0):
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k) * scale).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        inits.append(numpy_helper.from_array(np.full(cout, bias, np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Conv", [src, f"{name}.w", f"{name}.b"], [name], name=name,
                                      pads=[k // 2] * 4))  # fmt: skip
        return name

    def relu(src):
        nodes.append(helper.make_node("Relu", [src], [f"{src}.relu"], name=f"{src}.relu"))
        return f"{src}.relu"

    h = relu(conv("stem", "x", 4, channels, 3))
    outputs = []
    for i, (scale, bias) in enumerate(zip(scales, biases, strict=True)):
        inner = relu(conv(f"b{i}.c1", h, channels, channels, 3))
        if extra == "exposed" and i == 0:
            outputs.append(helper.make_tensor_value_info(inner, TensorProto.FLOAT, ["N", channels, 8, 8]))
        branch = conv(f"b{i}.c2", inner, channels, channels, 1, scale, bias)
        skip = conv(f"b{i}.proj", h, channels, channels, 1) if extra == "projection" and i == 0 else h
        nodes.append(helper.make_node("Add", [skip, branch], [f"b{i}.add"], name=f"b{i}.add"))
        h = f"b{i}.add"
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flat"))
    inits.append(numpy_helper.from_array((rng.standard_normal((channels, 5)) / 3).astype(np.float32), "fc.w"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w"], ["y"], name="fc"))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]), *outputs],
        inits,
    )
