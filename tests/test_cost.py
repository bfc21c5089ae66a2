"""Cost model: MAC formulas per op and the thesis's Table 2.3 (ResNet-34 3.6e9, ResNet-50 3.8e9 multiply-adds)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import cost, graph
from tests import builders

MODELS = Path(__file__).resolve().parents[1] / "models"


def _resnet_module():
    spec = importlib.util.spec_from_file_location("resnet", MODELS / "resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _single(node, x_shape, w_shape, y_shape=None, opset=17):
    w = np.zeros(w_shape, np.float32)
    proto = builders.make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape or [None] * len(x_shape))],
        [numpy_helper.from_array(w, "w")],
        opset=opset,
    )
    return cost.estimate(ir.from_proto(proto))


@pytest.mark.parametrize(
    ("attrs", "w_shape", "y_hw", "cin_per_group"),
    [
        ({"pads": [1, 1, 1, 1]}, (16, 8, 3, 3), (20, 20), 8),
        ({"strides": [2, 2]}, (16, 8, 3, 3), (9, 9), 8),
        ({"group": 8, "pads": [1, 1, 1, 1]}, (8, 1, 3, 3), (20, 20), 1),  # depthwise
        ({"group": 2, "dilations": [2, 2]}, (16, 4, 3, 3), (16, 16), 4),
    ],
)
def test_conv_macs(attrs, w_shape, y_hw, cin_per_group):
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], **attrs)
    result = _single(node, [2, 8, 20, 20], w_shape)
    expected = 2 * w_shape[0] * y_hw[0] * y_hw[1] * cin_per_group * 9
    assert result.macs == expected and result.params == int(np.prod(w_shape))


def test_conv_transpose_gemm_matmul_macs():
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    assert _single(node, [1, 8, 5, 5], (8, 4, 2, 2)).macs == 8 * 25 * 4 * 4
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    assert _single(gemm, [3, 7], (5, 7)).macs == 3 * 5 * 7
    gemm_t = helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)
    assert _single(gemm_t, [7, 3], (7, 5)).macs == 3 * 5 * 7
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    assert _single(matmul, [2, 4, 7], (7, 5)).macs == 2 * 4 * 5 * 7


@pytest.mark.parametrize(("arch", "table"), [("resnet34", 3.6e9), ("resnet50", 3.8e9)])
def test_resnets_match_table_2_3(arch, table):
    model = ir.from_proto(_resnet_module().build(arch))
    result = cost.estimate(model)
    assert abs(result.macs / table - 1) < 0.03, result.macs
    expected_params = {"resnet34": 21.8e6, "resnet50": 25.6e6}[arch]  # the paper's parameter counts
    assert abs(result.params / expected_params - 1) < 0.01


def test_light_resnet50_from_the_onnx_wheel():
    """The onnx wheel's light_resnet50 puts the stride on the 3x3 conv (ResNet "v1.5"): 4.09 GMACs, not 3.86."""
    path = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    if not path.exists():
        pytest.skip("this onnx wheel has no light models")
    result = cost.estimate(graph.load(path))
    assert result.macs == 4_089_184_256 and result.params == 25_610_152


def test_dynamic_dims_use_overrides():
    proto = builders.conv_net(size=10)
    model = ir.from_proto(proto)
    small = cost.estimate(model)
    big = cost.estimate(model, input_shapes={"x": [4, 3, 20, 20]})
    conv1 = next(n for n in big.nodes if n.name == "conv1")
    assert conv1.macs == 4 * 8 * 400 * 27 and conv1.output_shape == (4, 8, 20, 20)
    assert big.macs > 4 * small.macs - 1


def test_runtime_computed_shapes_are_measured(tmp_path):
    """Pads computed at run time defeat static inference; the cost model measures those shapes once."""
    shared = Path(os.environ.get("ONNXOPT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    path = shared / "models/cifar10/cifar10_resnet20_akamaster_bn.onnx"
    if not path.exists():
        pytest.skip("../shared is absent")
    result = cost.estimate(graph.load(path))
    assert all(n.output_shape is not None for n in result.nodes)
    assert abs(result.macs / 40.55e6 - 1) < 0.01  # ResNet-20's well-known 40.55 M MACs


# --- the cost model on real shapes (issue 15 part 2): data shapes, partial counts, subgraphs ---

BERT_SHAPES = {"input_ids": [1, 16], "attention_mask": [1, 16]}


@pytest.mark.parametrize(("opset", "symbolic_seq"), [(13, True), (17, True), (17, False)])
def test_tiny_bert_macs_match_the_hand_count(opset, symbolic_seq):
    model = ir.from_proto(builders.tiny_bert(opset=opset, symbolic_seq=symbolic_seq, seq=16))
    result = cost.estimate(model, input_shapes=BERT_SHAPES)
    assert result.macs == 2 * 16 * (4 * 32**2 + 2 * 32 * 64 + 2 * 16 * 32) == builders.tiny_bert_macs()
    assert not result.macs_partial and result.uncounted == ()
    assert result.input_shapes == {"input_ids": (1, 16), "attention_mask": (1, 16)}
    declared = cost.estimate(model)  # batch 1; the sequence length is known only when it is not symbolic
    assert declared.macs == (0 if symbolic_seq else result.macs)
    assert declared.macs_partial == symbolic_seq


def test_a_partial_count_names_what_it_left_out():
    result = cost.estimate(ir.from_proto(builders.tiny_bert()))
    assert result.macs == 0 and result.macs_partial
    matmuls = {f"layer{i}/{n}" for i in range(2) for n in ("q", "k", "v", "scores", "context", "out", "ffn1", "ffn2")}
    assert {u.node for u in result.uncounted} == matmuls
    assert {(u.op_type, u.reason) for u in result.uncounted} == {("MatMul", "unknown shapes")}
    report = result.to_json()
    assert report["macs_partial"] is True and len(report["uncounted"]) == 16
    assert report["input_shapes"] == {"input_ids": [1, None], "attention_mask": [1, None]}


def test_shapes_from_feeds_count_per_sample_and_keep_a_fixed_batch():
    bert = ir.from_proto(builders.tiny_bert())
    feeds = builders.tiny_bert_feeds(8, 24)
    assert cost.shapes_from_feeds(bert, feeds) == {"input_ids": [1, 24], "attention_mask": [1, 24]}
    assert cost.shapes_from_feeds(bert, feeds, per_sample=False) == {"input_ids": [8, 24], "attention_mask": [8, 24]}
    fixed = ir.from_proto(builders.conv_net(batch=4, size=10))
    x = np.zeros((4, 3, 10, 10), np.float32)
    assert cost.shapes_from_feeds(fixed, {"x": x}) == {"x": [4, 3, 10, 10]}  # as inspect counts it


def test_lstm_macs_and_unmodelled_ops_mark_the_count_partial():
    hidden, inputs, seq, batch = 5, 3, 7, 2
    w = numpy_helper.from_array(np.zeros((1, 4 * hidden, inputs), np.float32), "w")
    r = numpy_helper.from_array(np.zeros((1, 4 * hidden, hidden), np.float32), "r")
    proto = builders.make_model(
        [helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=hidden)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, batch, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        [w, r],
    )
    result = cost.estimate(ir.from_proto(proto))
    assert result.macs == seq * batch * 4 * hidden * (inputs + hidden) and not result.macs_partial
    einsum = builders.make_model(
        [helper.make_node("Einsum", ["x", "w"], ["y"], name="mix", equation="ij,jk->ik")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")],
    )
    partial = cost.estimate(ir.from_proto(einsum))
    assert partial.macs_partial and partial.uncounted == (
        cost.Uncounted("mix", "Einsum", "MACs of Einsum are not modelled"),
    )


def _matmul_graph(name, x, w, out, *, extra=0):
    """A subgraph computing ``out = x @ w`` (then ``extra`` more MatMuls by w2 of shape 5x5)."""
    nodes = [helper.make_node("MatMul", [x, w], [f"{name}_0" if extra else out], name=f"{name}/mm0")]
    for i in range(extra):
        last = i == extra - 1
        nodes.append(
            helper.make_node(
                "MatMul", [f"{name}_{i}", "w2"], [out if last else f"{name}_{i + 1}"], name=f"{name}/mm{i + 1}"
            )
        )
    return nodes


def test_if_counts_the_larger_branch_and_the_parameters_of_both(tmp_path, capsys):
    then_g = helper.make_graph(
        _matmul_graph("then", "x", "w", "t"), "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)]
    )
    else_g = helper.make_graph(
        _matmul_graph("else", "x", "w", "e", extra=2),
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((5, 5), np.float32), "w2")],  # a weight inside the subgraph
    )
    proto = builders.make_model(
        [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(np.ones((4, 5), np.float32), "w")],
    )
    result = cost.estimate(ir.from_proto(proto), input_shapes={"x": [3, 4]})
    (node,) = result.nodes
    assert node.macs == result.macs == 3 * 4 * 5 + 2 * 3 * 5 * 5  # else: x@w, then two 5x5 MatMuls
    assert result.params == node.params == 4 * 5 + 5 * 5  # the outer weight once, plus else's own
    assert "larger branch, else_branch" in node.note and "then_branch 60" in node.note
    assert not result.macs_partial
    from onnxopt import cli

    assert cli.main(["inspect", builders.save(proto, tmp_path / "if.onnx"), "--input-shape", "x=3,4"]) == 0
    out = capsys.readouterr().out
    assert "total: 45 params, 210 MACs" in out and "branch (If): MACs of the larger branch, else_branch" in out


def _loop_model(trip_count, *, constant: bool):
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "w"], ["h_out"], name="step"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, 6]),  # as exporters annotate it
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, 6]),
        ],
    )
    inits = [numpy_helper.from_array(np.eye(6, dtype=np.float32), "w")]
    inputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 6])]
    if constant:
        inits.append(numpy_helper.from_array(np.array(trip_count, np.int64), "m"))
    else:
        inputs.append(helper.make_tensor_value_info("m", TensorProto.INT64, []))
    return builders.make_model(
        [helper.make_node("Loop", ["m", "", "h"], ["y"], name="loop", body=body)],
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        inits,
    )


def test_loop_counts_its_body_per_iteration_when_the_trip_count_is_constant():
    proto = _loop_model(5, constant=True)
    result = cost.estimate(ir.from_proto(proto))
    assert result.macs == 5 * 2 * 6 * 6 and result.params == 36 and not result.macs_partial
    assert result.nodes[0].note.startswith("body x 5 iterations")
    out = builders.run(proto, {"h": np.ones((2, 6), np.float32)})  # the model is valid: it runs
    assert out["y"].shape == (2, 6)
    dynamic = cost.estimate(ir.from_proto(_loop_model(5, constant=False)))
    assert dynamic.macs == 2 * 6 * 6 and dynamic.macs_partial  # once, and said so
    assert dynamic.uncounted == (cost.Uncounted("loop", "Loop", "trip count not a constant: body counted once"),)


def test_scan_counts_its_body_per_scanned_element():
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["row", "w"], ["proj"], name="proj"),
            helper.make_node("Add", ["acc_in", "proj"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("row", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [3])],
    )
    proto = builders.make_model(
        [
            helper.make_node(
                "Scan", ["acc", "xs"], ["total"], name="scan", body=body, num_scan_inputs=1, scan_input_axes=[1]
            )
        ],
        [
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("xs", TensorProto.FLOAT, [4, "T"]),  # scanned along axis 1
        ],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")],
    )
    result = cost.estimate(ir.from_proto(proto), input_shapes={"xs": [4, 7]})
    assert result.macs == 7 * 4 * 3 and result.nodes[0].note.startswith("body x 7")
    unknown = cost.estimate(ir.from_proto(proto))  # T unknown: counted once, partial
    assert unknown.macs == 4 * 3 and unknown.macs_partial


def test_latency_feeds_are_the_first_batch_of_the_data_as_given(tmp_path):
    from onnxopt.errors import DataError
    from onnxopt.runtime import latency_feeds

    model = ir.from_proto(builders.tiny_bert())
    feeds = builders.tiny_bert_feeds(5, 24, seed=3)
    np.savez(tmp_path / "d.npz", **feeds)
    timing = latency_feeds(model, tmp_path / "d.npz", batch_size=4)
    assert timing.shapes == {"input_ids": [4, 24], "attention_mask": [4, 24]}
    np.testing.assert_array_equal(timing.feeds["input_ids"], feeds["input_ids"][:4])
    assert latency_feeds(model, None, input_shapes=BERT_SHAPES).shapes == BERT_SHAPES
    with pytest.raises(DataError, match="dynamic dim 1"):  # random inputs need a concrete sequence length
        latency_feeds(model, None)


def test_stacked_feeds_are_counted_as_they_are(tmp_path):
    """A stacked feed (no shared batch axis: a state whose axis 0 is its layers, a scalar) is one sample already."""
    from onnxopt.manager import PassManager

    proto = builders.make_model(
        [
            helper.make_node("MatMul", ["state", "w"], ["h"], name="proj"),
            helper.make_node("Mul", ["h", "rate"], ["y"], name="scale"),
        ],
        [
            helper.make_tensor_value_info("state", TensorProto.FLOAT, ["L", 4]),
            helper.make_tensor_value_info("rate", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["L", 5])],
        [numpy_helper.from_array(np.ones((4, 5), np.float32), "w")],
    )
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "feeds.npz", state=rng.standard_normal((2, 3, 4)).astype(np.float32), rate=np.ones(2, np.float32)
    )
    report = PassManager(["simplify"], data=tmp_path / "feeds.npz").run(ir.from_proto(proto))
    assert report.before.macs == report.after.macs == 3 * 4 * 5  # L = 3 from the feed, not normalised to 1
    assert report.to_json()["model"]["input_shapes_from"].startswith("first feed of")


def _minilm() -> Path | None:
    cache = Path(os.environ.get("ONNXOPT_CACHE", Path(__file__).resolve().parents[2] / "cache"))
    found = sorted(cache.glob("minilm/x/**/paraphrase-MiniLM-L3-v2.onnx"))  # where bench/real.py downloads it
    return found[0] if found else None


@pytest.mark.shared
@pytest.mark.slow
def test_minilm_run_bench_and_inspect_report_the_hand_count(tmp_path, capsys):
    """paraphrase-MiniLM-L3-v2 at 1 x 64 tokens: 3 layers x 64 x (4·384² + 2·384·1536 + 2·64·384) MACs everywhere."""
    from onnxopt import cli

    model = _minilm()
    if model is None:
        pytest.skip("paraphrase-MiniLM-L3-v2 is not in the cache (bench/real.py downloads it)")
    hand = 3 * 64 * (4 * 384**2 + 2 * 384 * 1536 + 2 * 64 * 384)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30522, (1, 64)).astype(np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=np.ones((1, 64), np.int64))
    shapes = ["--input-shape", "input_ids=1,64", "--input-shape", "attention_mask=1,64"]
    assert cli.main(["inspect", str(model), *shapes, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == hand
    argv = [
        "run",
        str(model),
        "--passes",
        "simplify",
        "--data",
        str(tmp_path / "d.npz"),
        "-o",
        str(tmp_path / "o.onnx"),
    ]
    assert cli.main([*argv, "--report", str(tmp_path / "r.json")]) == 0
    counted = json.loads((tmp_path / "r.json").read_text())["model"]
    assert counted["before"]["macs"] == counted["after"]["macs"] == hand
    capsys.readouterr()
    argv = ["bench", str(model), "--data", str(tmp_path / "d.npz"), "--threads", "1", "--rounds", "1", "--json"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)[0]["macs"] == hand


# --- quantized models count the MACs of the float layers they quantize (int8 MACs) ---


def _residual_net(channels: int = 8, size: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Conv → Relu → [Conv → Relu → Conv] + skip → Relu → Conv → GlobalAveragePool, a CIFAR ResNet's block.

    Quantized to QOperator, the Add becomes com.microsoft's ``QLinearAdd``, whose output ONNX shape inference
    leaves without shape or type, and the ``QLinearConv`` after it with unknown shapes (ResNet-20 pruned and
    quantized counted 0.127 of its MACs)."""
    rng = np.random.default_rng(seed)
    c = channels
    shapes = {"w0": (c, 3, 3, 3), "w1": (c, c, 3, 3), "w2": (c, c, 3, 3), "w3": (c, c, 3, 3)}
    inits = []
    for name, shape in shapes.items():
        w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        inits += [numpy_helper.from_array(w.astype(np.float32), name)]
        inits += [numpy_helper.from_array((0.1 * rng.standard_normal(shape[0])).astype(np.float32), f"b{name[1]}")]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", **conv),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", **conv),
        helper.make_node("Add", ["c2", "r0"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", **conv),
        helper.make_node("GlobalAveragePool", ["c3"], ["y"], name="gap"),
    ]
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 1, 1])],
        inits,
        opset=13,
    )


def _quantized(proto: onnx.ModelProto, x: np.ndarray, fmt: str, tmp_path: Path) -> ir.Model:
    """``proto`` through onnxruntime's quantize_static (per-channel int8 weights), QDQ or QOperator."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": x[i : i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.batches, None)

    src, dst = tmp_path / f"float_{fmt}.onnx", tmp_path / f"int8_{fmt}.onnx"
    builders.save(proto, src)
    quant_format = QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator
    quantize_static(str(src), str(dst), Reader(), quant_format=quant_format, per_channel=True)
    return graph.load(dst)


def _conv_macs(model: ir.Model, size: int) -> int:
    """Hand count: every Conv (3×3, pad 1) of ``model`` over a size×size map: H·W·M·C·9."""
    return sum(size * size * int(np.prod(n.inputs[1].const_value.shape)) for n in model.graph if n.op_type == "Conv")


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_a_quantized_conv_model_counts_the_float_models_macs(tmp_path, fmt):
    """QuantizeLinear/DequantizeLinear around Conv, or QLinearConv after com.microsoft's QLinearAdd: the int8
    model counts the float Convs' MACs (the QOperator model used to lose the Convs after the QLinearAdd)."""
    proto = _residual_net()
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    model = _quantized(proto, x, fmt, tmp_path)
    ops = {n.op_type for n in model.graph}
    if fmt == "qdq":
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    else:
        assert {"QLinearConv", "QLinearAdd"} <= ops and "Conv" not in ops
    float_cost = cost.estimate(ir.from_proto(proto), batch=2)
    assert float_cost.macs == 2 * _conv_macs(ir.from_proto(proto), 8) > 0
    quant_cost = cost.estimate(model, batch=2)
    assert not quant_cost.macs_partial, quant_cost.uncounted
    assert quant_cost.macs == float_cost.macs
    # and the quantized model still computes the float one's outputs (what was counted is what runs)
    expected = builders.run(proto, {"x": x})["y"]
    got = builders.run(graph.to_proto(model), {"x": x})["y"]
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()


def test_a_pruned_then_quantized_model_counts_the_pruned_float_models_macs(tmp_path):
    """prune then quant (QOperator): the MACs of the pruned float model, fewer than the original's."""
    from onnxopt.manager import PassManager
    from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
    from onnxopt.validate import Budget

    proto = _residual_net(channels=16)
    x = np.random.default_rng(2).standard_normal((48, 3, 8, 8)).astype(np.float32)
    config = PruneConfig(ratio=0.5, align=1, score="mean", latency_guard=False)
    report = PassManager(
        [ChannelPrunePass(config)], data={"x": x[:32]}, eval_data={"x": x[32:]}, budget=Budget(), simplify=False
    ).run(ir.from_proto(proto))
    pruned = graph.to_proto(report.model)
    pruned_macs = cost.estimate(ir.from_proto(pruned)).macs
    assert pruned_macs == _conv_macs(ir.from_proto(pruned), 8) < cost.estimate(ir.from_proto(proto)).macs
    quantized = cost.estimate(_quantized(pruned, x[:8], "qoperator", tmp_path))
    assert not quantized.macs_partial, quantized.uncounted
    assert quantized.macs == pruned_macs


def test_onnxruntimes_fused_com_microsoft_ops_count_the_float_models_macs(tmp_path):
    """Saved by onnxruntime after its extended fusions (Conv+Relu → com.microsoft FusedConv, untyped for ONNX's
    shape inference): the same MACs as the model it was optimized from."""
    import onnxruntime as ort

    proto = _residual_net()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = graph.load(tmp_path / "fused.onnx")
    assert "FusedConv" in {n.op_type for n in fused.graph}
    result = cost.estimate(fused, batch=2)
    assert not result.macs_partial, result.uncounted
    assert result.macs == cost.estimate(ir.from_proto(proto), batch=2).macs
