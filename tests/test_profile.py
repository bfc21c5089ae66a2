"""Where the time goes (onnxopt.profile, `onnxopt bench --profile`): kernels sorted into kinds of work."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import cli, profile
from onnxopt.profile import Kernel, Profile
from tests import builders

C = 16


def mobile_block(batch="N", size: int = 16) -> onnx.ModelProto:
    """3x3 stem -> depthwise 3x3 -> 1x1 -> grouped 3x3 (4 groups of 4) -> pool -> Gemm, each conv with a Relu."""
    rng = np.random.default_rng(0)

    def weight(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [weight("w_stem", (C, 3, 3, 3)), weight("w_dw", (C, 1, 3, 3)), weight("w_pw", (C, C, 1, 1)),
             weight("w_gr", (C, C // 4, 3, 3)), weight("w_fc", (10, C)), weight("b_fc", (10,))]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["a"], name="stem", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["a1"], name="stem_relu"),
        helper.make_node("Conv", ["a1", "w_dw"], ["b"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=C),
        helper.make_node("Relu", ["b"], ["b1"], name="dw_relu"),
        helper.make_node("Conv", ["b1", "w_pw"], ["c"], name="pw", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c"], ["c1"], name="pw_relu"),
        helper.make_node("Conv", ["c1", "w_gr"], ["d"], name="grouped", kernel_shape=[3, 3], pads=[1] * 4, group=4),
        helper.make_node("Relu", ["d"], ["d1"], name="gr_relu"),
        helper.make_node("GlobalAveragePool", ["d1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["y"], name="fc", transB=1),
    ]
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        inits,
    )


def feeds(batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).random((batch, 3, 16, 16), dtype=np.float32)}


@pytest.fixture()
def models(tmp_path):
    """The float block and its int8 QDQ form (onnxruntime's quantize_static, uint8 activations, int8 weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_path = builders.save(mobile_block(), tmp_path / "block.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([feeds(seed=s) for s in range(4)])

        def get_next(self):
            return next(self.batches, None)

    int8_path = str(tmp_path / "block_int8.onnx")
    quantize_static(float_path, int8_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return float_path, int8_path


def test_kernels_of_a_float_and_an_int8_model_are_sorted_into_kinds(models):
    float_path, int8_path = models
    for path, conv_op in ((float_path, {"Conv", "FusedConv"}), (int8_path, {"QLinearConv"})):
        before = hashlib.sha256(open(path, "rb").read()).hexdigest()
        prof = profile.profile(path, feeds(), runs=3)
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before  # the model is left as it was
        kinds = prof.by_kind()
        # every conv of the block, whatever onnxruntime fused or re-laid out, is told apart by its group and weight
        for kind in ("depthwise conv", "1x1 conv", "spatial conv", "grouped conv", "matmul/gemm"):
            assert kinds.get(kind, 0) > 0, (path, kind, prof.kernels)
        convs = [k for k in prof.kernels if k.kind.endswith("conv")]
        assert len(convs) == 4 and {k.op for k in convs} <= conv_op, convs
        assert "other" not in kinds, [k for k in prof.kernels if k.kind == "other"]
        assert list(kinds) == [k for k in profile.KIND_ORDER if k in kinds]
        assert prof.total_us == pytest.approx(sum(kinds.values()))
        assert prof.feeds == {"x": [2, 3, 16, 16]} and prof.runs == 3 and prof.threads == 1
    # the int8 model quantizes its input and dequantizes its output: kernels the float model does not have
    assert profile.profile(int8_path, feeds(), runs=1).by_kind().get("quantize/dequantize", 0) > 0


def test_a_transformer_encoders_kernels_are_matmuls_attention_and_norms(tmp_path):
    # the encoder's ops as onnxruntime fuses them (SkipLayerNormalization, BiasGelu, ...) are all in the table
    path = builders.save(builders.tiny_bert(layers=2, hidden=32, heads=4, ffn=64), tmp_path / "bert.onnx")
    kinds = profile.profile(path, builders.tiny_bert_feeds(2, 16), runs=2).by_kind()
    assert {"matmul/gemm", "attention", "normalization"} <= set(kinds), kinds
    assert "other" not in kinds and not any(k.endswith("conv") for k in kinds)


def test_without_the_optimized_graph_kinds_come_from_op_types(models, monkeypatch):
    from onnxopt import runtime

    class NoSave(runtime.Session):
        def __init__(self, *args, save_optimized=False, **kwargs):
            if save_optimized:
                raise RuntimeError("cannot write the optimized model")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(runtime, "Session", NoSave)
    kinds = profile.profile(models[0], feeds(), runs=1).by_kind()
    # every conv is a "spatial conv" then: nothing tells a depthwise one apart
    assert kinds.get("spatial conv", 0) > 0 and "depthwise conv" not in kinds and "matmul/gemm" in kinds


def test_kind_of_without_the_graph_and_for_unknown_ops():
    assert profile.kind_of("Conv") == "spatial conv"  # a conv whose node is not found: no guess at depthwise
    assert profile.kind_of("QLinearMatMul") == "matmul/gemm"
    assert profile.kind_of("ReorderInput") == "layout/copy"
    assert profile.kind_of("SkipLayerNormalization") == "normalization"
    assert profile.kind_of("NoSuchOp") == "other"


def test_kinds_rows_put_profiles_side_by_side_with_ratios_to_the_first():
    a = Profile([Kernel("c1", "Conv", "1x1 conv", 300.0), Kernel("c2", "Conv", "depthwise conv", 100.0)],
                {"x": [1, 3]}, 1, 5)  # fmt: skip
    b = Profile([Kernel("q1", "QLinearConv", "1x1 conv", 100.0), Kernel("q2", "QLinearConv", "depthwise conv", 90.0),
                 Kernel("t", "Transpose", "layout/copy", 10.0)], {"x": [1, 3]}, 1, 5)  # fmt: skip
    rows = profile.kinds_rows([("float", a), ("int8", b)])
    assert rows[0] == ("kind", "float", "int8", "x first")
    table = {row[0]: row[1:] for row in rows[1:]}
    assert list(table) == ["depthwise conv", "1x1 conv", "layout/copy", "total"]
    assert table["depthwise conv"] == ("100 (25%)", "90 (45%)", "0.90")
    assert table["1x1 conv"] == ("300 (75%)", "100 (50%)", "0.33")
    assert table["layout/copy"] == ("-", "10 (5%)", "-")  # a kind the first model lacks has no ratio
    assert table["total"] == ("400", "200", "0.50")
    assert profile.kinds_rows([("float", a)])[0] == ("kind", "float")  # one profile: no ratio column
    assert b.top(1) == [Kernel("q1", "QLinearConv", "1x1 conv", 100.0)]
    assert b.to_json(top=2)["kinds_us"] == {"depthwise conv": 90.0, "1x1 conv": 100.0, "layout/copy": 10.0}


def test_bench_profile_prints_and_reports_where_the_time_goes(models, tmp_path, capsys):
    float_path, int8_path = models
    np.savez(tmp_path / "data.npz", **feeds(batch=4))
    argv = ["bench", float_path, int8_path, "--threads", "1", "--rounds", "2", "--data", str(tmp_path / "data.npz")]
    code = cli.main([*argv, "--profile"])
    out = capsys.readouterr().out
    assert code == 0
    assert "where the time goes" in out and "x first" in out
    lines = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines() if " conv " in line[:20]}
    assert {"depthwise conv", "1x1 conv", "spatial conv", "grouped conv"} <= set(lines)
    assert "block_int8.onnx: slowest kernels on x=4x3x16x16" in out
    code = cli.main([*argv, "--profile", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["profile"]["feeds"] for r in rows] == [{"x": [4, 3, 16, 16]}] * 2
    assert rows[1]["profile"]["kinds_us"]["depthwise conv"] > 0 and len(rows[1]["profile"]["top"]) <= 10
    code = cli.main([*argv, "--json"])  # without --profile: no profile taken
    assert code == 0 and all(r["profile"] is None for r in json.loads(capsys.readouterr().out))
