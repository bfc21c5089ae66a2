"""quant: QDQ structure, SQNR floor, float fallback for a badly quantizable layer, latency guard, modes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.manager import PassManager
from onnxopt.passes import quant as quant_module
from onnxopt.passes.quant import Int8QuantPass, QuantConfig
from onnxopt.runtime import Latency
from onnxopt.validate import Budget
from tests import builders


@pytest.fixture()
def net(tmp_path):
    proto = builders.conv_net(channels=(3, 32, 64), size=12, seed=1, opset=13)
    path = builders.save(proto, tmp_path / "net.onnx")
    x = np.random.default_rng(2).standard_normal((64, 3, 12, 12)).astype(np.float32)
    return proto, path, {"x": x}


def _fast_int8(monkeypatch, faster=True):
    """Latency is measured in bench/, not asserted in tests: make the guard's measurement deterministic."""
    float_us, int8_us = (100.0, 50.0) if faster else (50.0, 100.0)
    fake = [Latency(float_us, float_us, float_us, 1), Latency(int8_us, int8_us, int8_us, 1)]
    monkeypatch.setattr("onnxopt.runtime.measure_latency", lambda *a, **k: fake)


def _run(path, data, config=None, budget=None):
    config, budget = config or QuantConfig(), budget or Budget(min_cosine=0.99)
    return PassManager([Int8QuantPass(config)], data=data, budget=budget, simplify=False).run(path)


def _proto(report):
    import onnx_ir as ir

    return ir.to_proto(report.model)


def test_qdq_structure_per_axis_symmetric_int8(net, monkeypatch):
    _fast_int8(monkeypatch)
    monkeypatch.setattr(quant_module, "_more_accurate", lambda a, b: False)  # onnxopt's recipe kept
    _, path, data = net
    report = _run(path, data)
    assert report.ok and report.passes[0].modified
    out = _proto(report)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    ops = [n.op_type for n in out.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    weight_dq = [
        n for n in out.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4
    ]  # fmt: skip
    assert len(weight_dq) == 2
    for node in weight_dq:
        assert inits[node.input[0]].dtype == np.int8
        assert next(a.i for a in node.attribute if a.name == "axis") == 0  # per output channel
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric weights
        assert inits[node.input[1]].shape == inits[node.input[0]].shape[:1]
    assert report.after.bytes < 0.6 * report.before.bytes


def test_sqnr_floor_on_a_tiny_conv_net(net, monkeypatch):
    _fast_int8(monkeypatch)
    proto, path, data = net
    out = _proto(_run(path, data))
    x = np.random.default_rng(3).standard_normal((32, 3, 12, 12)).astype(np.float32)
    ref, got = builders.run(proto, {"x": x})["y"], builders.run(out, {"x": x})["y"]
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2))
    assert sqnr > 25.0


def _outlier_model():
    """fc1 → Relu → fc2 → Relu → fc3, where one hidden channel of fc2's input is 1000× the others."""
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((32, 16)).astype(np.float32) / 4
    w1[0] *= 1000.0  # channel 0 of fc1's output dwarfs the rest: per-tensor int8 activations lose them
    w2 = rng.standard_normal((16, 32)).astype(np.float32) / 6
    w2[:, 0] /= 1000.0
    w3 = rng.standard_normal((4, 16)).astype(np.float32) / 4
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "w2"], ["g2"], name="fc2", transB=1),
        helper.make_node("Relu", ["g2"], ["h2"], name="relu2"),
        helper.make_node("Gemm", ["h2", "w3"], ["y"], name="fc3", transB=1),
    ]
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
        opset=13,
    )


def test_fallback_keeps_the_badly_quantizable_layer_in_float(tmp_path, monkeypatch):
    _fast_int8(monkeypatch)
    proto = _outlier_model()
    path = builders.save(proto, tmp_path / "m.onnx")
    x = np.abs(np.random.default_rng(5).standard_normal((128, 16))).astype(np.float32)
    plain = _run(path, {"x": x}, QuantConfig(max_fallback=0), Budget(min_cosine=0.999))
    assert not plain.passes[0].modified and "misses the budget" in plain.passes[0].skipped[0].reason
    report = _run(path, {"x": x}, QuantConfig(), Budget(min_cosine=0.999))
    assert report.ok and report.passes[0].modified
    kept = [c.site for c in report.passes[0].changes if "float" in c.what]
    assert kept and len(kept) <= 4
    out = _proto(report)
    float_gemms = [
        n.name
        for n in out.graph.node
        if n.op_type == "Gemm"
        and n.input[1] in {i.name for i in out.graph.initializer if i.data_type == TensorProto.FLOAT}
    ]
    assert set(kept) & set(float_gemms) or set(kept) & {"relu1", "relu2"}


def test_latency_guard_keeps_float_when_int8_is_slower(net, monkeypatch):
    _fast_int8(monkeypatch, faster=False)
    _, path, data = net
    report = _run(path, data)
    assert not report.passes[0].modified
    assert "int8 is slower here (100 us vs 50 us float)" in report.passes[0].skipped[0].reason
    forced = _run(path, data, QuantConfig(force=True))
    assert forced.passes[0].modified
    by_size = _run(path, data, QuantConfig(objective="size"))
    assert by_size.passes[0].modified


def test_old_opset_models_are_converted_first(tmp_path, monkeypatch):
    _fast_int8(monkeypatch)
    proto = builders.conv_net(channels=(1, 8, 8), size=10, seed=6, opset=9, with_bn=False)
    path = builders.save(proto, tmp_path / "old.onnx")
    x = np.random.default_rng(7).standard_normal((16, 1, 10, 10)).astype(np.float32)
    report = _run(path, {"x": x})
    assert report.ok and report.passes[0].modified
    assert _proto(report).opset_import[0].version >= 13


@pytest.mark.parametrize(("mode", "op"), [("dynamic", "DynamicQuantizeLinear"), ("weight4", "MatMulNBits")])
def test_other_modes(mode, op, tmp_path, monkeypatch):
    _fast_int8(monkeypatch)
    proto = builders.mlp(sizes=(64, 128, 64), seed=8, opset=17)
    path = builders.save(proto, tmp_path / "mlp.onnx")
    x = np.random.default_rng(9).standard_normal((32, 64)).astype(np.float32)
    report = _run(path, {"x": x}, QuantConfig(mode=mode), Budget(min_cosine=0.98))
    assert report.ok and report.passes[0].modified, report.passes[0].skipped
    assert op in [n.op_type for n in _proto(report).graph.node]


def test_static_needs_data_and_config_is_checked():
    with pytest.raises(ValueError, match="mode"):
        QuantConfig(mode="int3")
    assert quant_module.Int8QuantPass.simplify_after is False
    proto = builders.mlp()
    import onnx_ir as ir

    with pytest.raises(ir.passes.PreconditionError, match="calibration data"):
        Int8QuantPass()(ir.from_proto(proto))
    assert onnx.checker.check_model(proto) is None


def test_size_objective_keeps_biases_float(net, monkeypatch):
    """--quant-objective size: no int32 bias with per-channel scale and zero point, so a smaller file."""
    _fast_int8(monkeypatch)
    _, path, data = net
    files = {}
    for objective in ("speed", "size"):
        report = _run(path, data, QuantConfig(objective=objective))
        assert report.ok and report.passes[0].modified
        out = _proto(report)
        dtypes = {numpy_helper.to_array(i).dtype for i in out.graph.initializer}
        assert (np.dtype(np.int32) in dtypes) == (objective == "speed")
        files[objective] = out.ByteSize()
    assert files["size"] < files["speed"]


def test_onnxruntime_recipe_is_kept_when_it_validates_better(net, monkeypatch):
    """Both recipes are validated; the more accurate one (here: made so) is kept and named in the report."""
    _fast_int8(monkeypatch)
    monkeypatch.setattr(quant_module, "_more_accurate", lambda a, b: True)
    _, path, data = net
    report = _run(path, data)
    assert report.ok and "per-tensor weights, uint8 activations" in report.passes[0].changes[0].what
    out = _proto(report)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    weight_dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                 and inits[n.input[0]].ndim == 4]  # fmt: skip
    assert weight_dq and all(inits[n.input[1]].ndim == 0 for n in weight_dq)  # one scale per tensor
    activation_zero_points = [inits[n.input[2]] for n in out.graph.node
                              if n.op_type == "QuantizeLinear" and len(n.input) > 2]  # fmt: skip
    assert activation_zero_points and all(z.dtype == np.uint8 for z in activation_zero_points)


def test_more_accurate_prefers_passing_then_accuracy():
    from onnxopt.validate import ValidationReport

    def report(ok, acc):
        return ValidationReport(ok=ok, samples=1, data="d", budget=Budget(), accuracy={"before": 99.0, "after": acc})

    assert quant_module._more_accurate(report(True, 97.0), report(False, 99.0))
    assert quant_module._more_accurate(report(True, 98.5), report(True, 98.4))
    assert not quant_module._more_accurate(report(True, 98.4), report(True, 98.4))
