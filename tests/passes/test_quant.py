"""quant: recipe enumeration and choice, QDQ structure (uint8 activations, per-axis int8 weights), dynamic int8
on a MatMul model, SQNR floor, float fallback for a badly quantizable layer, the float model kept when no
recipe is faster, modes.

Latency is measured in bench/ (bench/results/quant_recipes.md), never asserted here: where a decision is
tested, onnxruntime's timer is replaced by a table of latencies per recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import graph as graph_io
from onnxopt.manager import PassManager
from onnxopt.passes import _quant_recipes as recipes
from onnxopt.passes import quant as quant_module
from onnxopt.passes._quant_recipes import RECIPES, Outcome
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


class _Calls(list):
    """The model stems of each full timing at the data's batch; ``single``: those of each timing on one sample."""

    def __init__(self) -> None:
        super().__init__()
        self.single: list[list[str]] = []


def _timer(monkeypatch, table: dict[str, float], default: float = 1000.0, single: dict | None = None) -> _Calls:
    """Replace onnxruntime timing by ``table`` (recipe name or "float" → µs; ``single``: the same on one sample,
    default ``table``); returns the model stems of each full timing (the 3-round screens left out)."""
    calls = _Calls()

    def fake(models, feeds, **kwargs):
        stems = [Path(m).stem for m in models]
        one = all(len(v) == 1 for v in feeds.values())
        if one:
            calls.single.append(stems)
        elif kwargs.get("rounds") != 3:
            calls.append(stems)
        result = []
        for stem in stems:
            name = "float" if stem == "float" else stem.removeprefix("q_").removesuffix("_fallback")
            us = (single if one and single is not None else table).get(name, default)
            result.append(Latency(us, us * 0.9, us * 1.1, 1))
        return result

    monkeypatch.setattr("onnxopt.runtime.measure_latency", fake)
    return calls


def _fast_int8(monkeypatch):
    """Every recipe twice as fast as float, qdq-u8-pc faster still (by more than the margin)."""
    table = {"float": 100.0, **{r.name: 50.0 for r in RECIPES}, "qdq-u8-pc": 40.0}
    return _timer(monkeypatch, table)


def _run(path, data, config=None, budget=None):
    config, budget = config or QuantConfig(), budget or Budget(min_cosine=0.99)
    return PassManager([Int8QuantPass(config)], data=data, budget=budget, simplify=False).run(path)


def _proto(report):
    return ir.to_proto(report.model)


def _details(report) -> dict:
    return report.to_json()["passes"][0]["details"]


# ---- enumeration ---------------------------------------------------------------------------------------


def _names(prof, **kwargs):
    return [r.name for r in recipes.candidates(prof, **kwargs)]


def _vnni_names(prof, **kwargs):
    """The candidates on a CPU whose uint8 x int8 kernels do not saturate (VNNI, or not x86)."""
    return _names(prof, saturates=False, **kwargs)


def test_recipe_enumeration_prunes_by_model_and_objective(net):
    conv = recipes.profile(ir.from_proto(net[0]))
    dense = recipes.profile(ir.from_proto(builders.mlp()))
    assert conv.convs == 2 and dense == recipes.ModelProfile(convs=0, matmuls=2)
    # conv nets: static recipes only, QOperator only with unsigned activations
    assert _vnni_names(conv) == ["qdq-u8-pc", "qdq-u8-pt", "qdq-s8-pc", "qdq-s8-pt", "qop-u8-pc"]
    # where uint8 x int8 saturates, uint8 and 7-bit weights too
    assert _names(conv, saturates=True) == [
        "qdq-u8-pc", "qdq-u8-pt", "qdq-s8-pc", "qdq-s8-pt", "qdq-u8u8-pc", "qdq-u8-pc-r7", "qop-u8-pc"
    ]  # fmt: skip
    # MatMul models: static QDQ and dynamic int8, no QOperator; 4-bit weights only as a size option
    assert _vnni_names(dense) == ["qdq-u8-pc", "qdq-u8-pt", "qdq-s8-pc", "qdq-s8-pt", "dyn-pc", "dyn-pt", "dyn-s8-pt"]
    assert _vnni_names(dense, objective="size")[-1] == "w4" and "w4" not in _vnni_names(dense)
    assert _vnni_names(dense, has_data=False) == ["dyn-pc", "dyn-pt", "dyn-s8-pt"]
    assert _vnni_names(conv, has_data=False) == []
    assert _names(conv, per_tensor=True) == ["qdq-u8-pt", "qdq-s8-pt"]
    # asked for explicitly: tried even on a conv net
    assert _names(conv, mode="dynamic") == ["dyn-pc", "dyn-pt", "dyn-s8-pt"]
    assert _names(dense, mode="weight4") == ["w4"]
    assert _names(conv, names=["qdq-s8-pc", "qop-u8-pc", "qdq-s8-pc"]) == ["qdq-s8-pc", "qop-u8-pc"]
    with pytest.raises(ValueError, match="unknown quant recipe"):
        QuantConfig(recipes="qdq-u8-pc,qop-s8-pc")
    with pytest.raises(ValueError, match="margin"):
        QuantConfig(margin=1.5)


# ---- the choice, from measurements ---------------------------------------------------------------------


def _outcome(name, us, passed=True, score=1.0, size=1000):
    recipe = recipes.BY_NAME[name]
    return Outcome(recipe, passed=passed, score=score, latency_us=us, bytes=size)


def test_fastest_recipe_that_holds_the_budget_wins():
    outcomes = [_outcome("qdq-u8-pc", 46.0), _outcome("qdq-s8-pc", 80.0), _outcome("qdq-u8-pt", 60.0)]
    winner, why = recipes.choose(100.0, outcomes)
    assert winner.recipe.name == "qdq-u8-pc" and why == "the fastest recipe that holds the budget"


def test_a_faster_recipe_outside_the_budget_loses():
    outcomes = [_outcome("qdq-u8-pc", 40.0, passed=False), _outcome("qdq-s8-pc", 70.0)]
    assert recipes.choose(100.0, outcomes)[0].recipe.name == "qdq-s8-pc"
    winner, why = recipes.choose(100.0, [_outcome("qdq-u8-pc", 40.0, passed=False)])
    assert winner is None and "misses the budget" in why and "qdq-u8-pc" in why


def test_margin_and_tie_break_make_the_choice_deterministic():
    # within 5% of the fastest: a tie, won by the more accurate recipe ...
    tied = [_outcome("qdq-u8-pc", 50.0, score=79.0), _outcome("qdq-s8-pt", 48.0, score=79.5)]
    assert recipes.choose(100.0, tied)[0].recipe.name == "qdq-s8-pt"
    tied[1].score = 78.0
    winner, why = recipes.choose(100.0, tied)
    assert winner.recipe.name == "qdq-u8-pc" and "ties within 5%" in why
    # ... then by the fixed order, whatever order the outcomes come in
    equal = [_outcome("qop-u8-pc", 48.5), _outcome("qdq-u8-pt", 50.0), _outcome("qdq-s8-pc", 49.0)]
    for permutation in (equal, equal[::-1], equal[1:] + equal[:1]):
        assert recipes.choose(100.0, permutation)[0].recipe.name == "qdq-u8-pt"
    # outside the margin the faster one wins even when it is less accurate
    apart = [_outcome("qdq-u8-pc", 50.0, score=79.0), _outcome("qdq-s8-pt", 44.0, score=78.0)]
    assert recipes.choose(100.0, apart)[0].recipe.name == "qdq-s8-pt"
    # a recipe must beat float by the margin too
    assert recipes.choose(100.0, [_outcome("qdq-u8-pc", 96.0)])[0] is None
    assert recipes.choose(100.0, [_outcome("qdq-u8-pc", 94.0)])[0] is not None
    assert recipes.choose(100.0, [_outcome("qdq-u8-pc", 96.0)], margin=0.02)[0] is not None


def test_choice_when_nothing_is_faster_force_and_size():
    slow = [_outcome("qdq-u8-pc", 120.0, size=300), _outcome("qdq-s8-pc", 110.0, size=200)]
    winner, why = recipes.choose(100.0, slow)
    assert winner is None and "not 5% faster than float" in why and "qdq-s8-pc: 110 us vs 100 us" in why
    assert recipes.choose(100.0, slow, force=True)[0].recipe.name == "qdq-s8-pc"
    assert recipes.choose(100.0, slow, objective="size")[0].recipe.name == "qdq-s8-pc"


# ---- the pass, with a stubbed timer -------------------------------------------------------------------


def test_u8_activation_qdq_structure_per_axis_int8_weights(net, monkeypatch):
    calls = _fast_int8(monkeypatch)
    proto, path, data = net
    report = _run(path, data)
    assert report.ok and report.passes[0].modified
    assert "[qdq-u8-pc]" in report.passes[0].changes[0].what
    assert calls[0][0] == "float" and len(calls) == 1  # one interleaved timing of float and every candidate
    out = _proto(report)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    weight_dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].ndim == 4]  # fmt: skip
    assert len(weight_dq) == 2
    for node in weight_dq:
        assert inits[node.input[0]].dtype == np.int8
        assert next(a.i for a in node.attribute if a.name == "axis") == 0  # per output channel
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric weights
        assert inits[node.input[1]].shape == inits[node.input[0]].shape[:1]
    activation_zero_points = [inits[n.input[2]] for n in out.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_zero_points and all(z.dtype == np.uint8 for z in activation_zero_points)
    assert report.after.bytes < 0.6 * report.before.bytes
    x = np.random.default_rng(3).standard_normal((32, 3, 12, 12)).astype(np.float32)
    ref, got = builders.run(proto, {"x": x})["y"], builders.run(out, {"x": x})["y"]
    assert 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)) > 25.0  # SQNR floor


def test_int8_saturation_is_detected_per_cpu(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert recipes.int8_saturates() is False
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert recipes.int8_saturates() == (not {"avx512_vnni", "avx_vnni"} & set(flags))


def test_recipe_table_in_the_report(net, monkeypatch):
    """Every candidate appears with its latency ratio and verdict, as skips and as JSON details."""
    _timer(monkeypatch, {"float": 100.0, "qdq-u8-pc": 46.0, "qdq-u8-pt": 60.0, "qdq-s8-pc": 98.0})
    _, path, data = net
    report = _run(path, data, QuantConfig(recipes="qdq-u8-pc,qdq-u8-pt,qdq-s8-pc", check_all=True))
    record = report.passes[0]
    assert "latency 0.46x float" in record.changes[0].what and "holds the budget" in record.changes[0].what
    skips = {s.site: s.reason for s in record.skipped}
    assert "latency 0.60x float" in skips["recipe qdq-u8-pt"] and "qdq-u8-pc wins" in skips["recipe qdq-u8-pt"]
    assert "not 5% faster than float; not checked" in skips["recipe qdq-s8-pc"]
    details = json.loads(json.dumps(_details(report)))  # JSON-ready
    assert details["quant_chosen"] == "qdq-u8-pc" and details["quant_float_latency_us"] == 100.0
    assert details["quant_latency_feeds"] == {"x": [16, 3, 12, 12]}  # the data's batch (16), not batch 1
    rows = {row["recipe"]: row for row in details["quant_recipes"]}
    assert rows["qdq-u8-pc"]["latency_ratio"] == 0.46 and rows["qdq-u8-pc"]["passed"] is True
    assert rows["qdq-s8-pc"]["passed"] is None and rows["qdq-s8-pc"]["latency_ratio"] == 0.98
    # without check_all, a recipe the fastest passing one beats is not checked (the run stays fast)
    quick = _run(path, data, QuantConfig(recipes="qdq-u8-pc,qdq-u8-pt,qdq-s8-pc"))
    skips = {s.site: s.reason for s in quick.passes[0].skipped}
    assert "qdq-u8-pc holds the budget and is faster; not checked" in skips["recipe qdq-u8-pt"]
    assert {r["recipe"]: r["passed"] for r in _details(quick)["quant_recipes"]}["qdq-u8-pt"] is None


def test_a_far_slower_recipe_is_screened_out_before_full_timing(net, monkeypatch):
    calls = _timer(monkeypatch, {"float": 100.0, "qdq-u8-pc": 60.0, "qdq-u8u8-pc": 660.0})
    _, path, data = net
    report = _run(path, data, QuantConfig(recipes="qdq-u8-pc,qdq-u8u8-pc"))
    assert calls == [["float", "q_qdq-u8-pc"]]  # the slow one is not in the full timing
    skips = {s.site: s.reason for s in report.passes[0].skipped}
    assert "6.60x float" in skips["recipe qdq-u8u8-pc"] and "3-round screen; not checked" in skips["recipe qdq-u8u8-pc"]


def test_float_is_kept_when_no_recipe_is_faster(net, monkeypatch):
    _timer(monkeypatch, {"float": 50.0}, default=100.0)
    _, path, data = net
    config = QuantConfig(recipes="qdq-u8-pc,qdq-s8-pc")
    report = _run(path, data, config)
    assert not report.passes[0].modified
    assert "int8 is not 5% faster than float with any recipe (fastest qdq-u8-pc: 100 us vs 50 us float)" in (
        report.passes[0].skipped[0].reason
    )
    forced = _run(path, data, dataclass_replace(config, force=True))
    assert forced.passes[0].modified and "[qdq-u8-pc]" in forced.passes[0].changes[0].what
    by_size = _run(path, data, dataclass_replace(config, objective="size"))
    assert by_size.passes[0].modified


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def _matmul_model():
    """x[N, 64] → MatMul → Add → Relu → MatMul → y[N, 32]: the shape of a transformer's FFN."""
    rng = np.random.default_rng(10)
    w1 = (rng.standard_normal((64, 128)) / 8).astype(np.float32)
    b1 = (rng.standard_normal(128) / 4).astype(np.float32)
    w2 = (rng.standard_normal((128, 32)) / 11).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="ffn_in"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="ffn_bias"),
        helper.make_node("Relu", ["a1"], ["h1"], name="ffn_act"),
        helper.make_node("MatMul", ["h1", "w2"], ["y"], name="ffn_out"),
    ]
    return builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        inits,
        opset=17,
    )


@pytest.mark.parametrize("winner", ["dyn-pc", "dyn-pt", "dyn-s8-pt"])
def test_dynamic_int8_wins_on_a_matmul_model(winner, tmp_path, monkeypatch):
    _timer(monkeypatch, {"float": 100.0, winner: 40.0}, default=70.0)
    proto = _matmul_model()
    path = builders.save(proto, tmp_path / "ffn.onnx")
    x = np.random.default_rng(11).standard_normal((48, 64)).astype(np.float32)
    report = _run(path, {"x": x}, budget=Budget(min_cosine=0.99))
    record = report.passes[0]
    assert report.ok and record.modified and f"[{winner}]" in record.changes[0].what, record.skipped
    assert {s.site for s in record.skipped} == {f"recipe {n}" for n in _names(recipes.profile(ir.from_proto(proto)))
                                                 if n != winner}  # fmt: skip
    out = _proto(report)
    ops = [n.op_type for n in out.graph.node]
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops and "QuantizeLinear" not in ops
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    int8_weights = [a for a in inits.values() if a.dtype in (np.int8, np.uint8) and a.ndim == 2]
    assert len(int8_weights) == 2
    assert {a.dtype for a in int8_weights} == {np.dtype(np.uint8 if winner == "dyn-pt" else np.int8)}
    scales = [a for n, a in inits.items() if n.endswith("_scale") and a.dtype == np.float32]
    assert any(s.size > 1 for s in scales) == (winner == "dyn-pc")  # per output channel
    ref, got = builders.run(proto, {"x": x})["y"], builders.run(out, {"x": x})["y"]
    cosine = np.sum(ref * got, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.99


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
    calls = _fast_int8(monkeypatch)
    proto = _outlier_model()
    path = builders.save(proto, tmp_path / "m.onnx")
    x = np.abs(np.random.default_rng(5).standard_normal((128, 16))).astype(np.float32)
    config = QuantConfig(recipes="qdq-u8-pc", max_fallback=0)
    plain = _run(path, {"x": x}, config, Budget(min_cosine=0.999))
    assert not plain.passes[0].modified and "misses the budget" in plain.passes[0].skipped[0].reason
    calls.clear()
    report = _run(path, {"x": x}, dataclass_replace(config, max_fallback=32), Budget(min_cosine=0.999))
    assert report.ok and report.passes[0].modified
    assert calls[-1] == ["float", "q_qdq-u8-pc_fallback"]  # the fallback model is timed again
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


def test_no_fallback_for_a_recipe_a_passing_one_already_beats(net, monkeypatch):
    """A fallback only adds float layers: a failing recipe slower than a passing one is not repaired.

    Which of per-channel and per-tensor weights is the more accurate here depends on the CPU's int8 kernels (uint8 x
    int8 products saturate without VNNI), so each recipe's cosine is measured first and the budget set between them."""
    _, path, data = net
    cosine = {}
    for name in ("qdq-u8-pc", "qdq-u8-pt"):
        _timer(monkeypatch, {"float": 100.0, name: 50.0})
        alone = _run(path, data, QuantConfig(recipes=name), Budget(min_cosine=0.0))
        assert alone.passes[0].modified
        cosine[name] = min(d.cosine for d in alone.validation.outputs.values())
    worse, better = sorted(cosine, key=cosine.get)
    assert cosine[better] - cosine[worse] > 1e-5, cosine
    calls = _timer(monkeypatch, {"float": 100.0, worse: 50.0, better: 40.0})
    budget = Budget(min_cosine=(cosine[worse] + cosine[better]) / 2)
    report = _run(path, data, QuantConfig(recipes="qdq-u8-pc,qdq-u8-pt", check_all=True), budget)
    verdicts = {row["recipe"]: row["passed"] for row in _details(report)["quant_recipes"]}
    assert verdicts == {worse: False, better: True}
    assert f"[{better}]" in report.passes[0].changes[0].what and len(calls) == 1  # nothing re-timed
    skip = next(s.reason for s in report.passes[0].skipped if s.site == f"recipe {worse}")
    assert f"{better} holds the budget and is faster; no fallback tried" in skip


def test_old_opset_models_are_converted_first(tmp_path, monkeypatch):
    _fast_int8(monkeypatch)
    proto = builders.conv_net(channels=(1, 8, 8), size=10, seed=6, opset=9, with_bn=False)
    path = builders.save(proto, tmp_path / "old.onnx")
    x = np.random.default_rng(7).standard_normal((16, 1, 10, 10)).astype(np.float32)
    report = _run(path, {"x": x}, QuantConfig(recipes="qdq-u8-pc"))
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
    proto = builders.conv_net()
    with pytest.raises(ir.passes.PreconditionError, match="calibration data"):
        Int8QuantPass()(ir.from_proto(proto))
    assert onnx.checker.check_model(proto) is None


def test_size_objective_keeps_biases_float(net, monkeypatch):
    """--quant-objective size: no int32 bias with per-channel scale and zero point, so a smaller file."""
    _fast_int8(monkeypatch)
    _, path, data = net
    files = {}
    for objective in ("speed", "size"):
        report = _run(path, data, QuantConfig(objective=objective, recipes="qdq-u8-pc"))
        assert report.ok and report.passes[0].modified
        out = _proto(report)
        dtypes = {numpy_helper.to_array(i).dtype for i in out.graph.initializer}
        assert (np.dtype(np.int32) in dtypes) == (objective == "speed")
        files[objective] = out.ByteSize()
    assert files["size"] < files["speed"]


def test_score_prefers_accuracy_then_mse_then_cosine():
    from onnxopt.validate import OutputDiff, ValidationReport

    def report(**kw):
        return ValidationReport(ok=True, samples=1, data="d", budget=Budget(), **kw)

    assert recipes.score(report(accuracy={"before": 99.0, "after": 98.5})) == 98.5
    assert recipes.score(report(task_mse={"before": 1.0, "after": 2.0})) == -2.0
    diff = OutputDiff(0.1, 0.1, 0.1, 0.97, 0.1, None)
    assert recipes.score(report(outputs={"y": diff, "z": dataclass_replace(diff, cosine=0.99)})) == 0.97


def test_a_recipe_onnxruntime_cannot_make_is_left_out(tmp_path, monkeypatch):
    """A quantizer error (or an output onnx's checker rejects) rules that recipe out; the others still compete."""
    _timer(monkeypatch, {"float": 100.0, "dyn-pc": 40.0, "dyn-pt": 50.0})
    real = quant_module.q.quantize_dynamic

    def broken_per_channel(src, dst, **kwargs):
        if kwargs.get("per_channel"):
            raise RuntimeError("Nodes in a graph must be topologically sorted")
        return real(src, dst, **kwargs)

    monkeypatch.setattr(quant_module.q, "quantize_dynamic", broken_per_channel)
    path = builders.save(_matmul_model(), tmp_path / "ffn.onnx")
    x = np.random.default_rng(11).standard_normal((48, 64)).astype(np.float32)
    report = _run(path, {"x": x}, QuantConfig(recipes="dyn-pc,dyn-pt"))
    assert report.ok and "[dyn-pt]" in report.passes[0].changes[0].what
    skip = next(s.reason for s in report.passes[0].skipped if s.site == "recipe dyn-pc")
    assert skip == "onnxruntime failed: Nodes in a graph must be topologically sorted"


# ---- first-layer channel padding ----------------------------------------------------------------------


def test_stem_channels_are_zero_padded_to_four_and_compute_the_same(net):
    from onnxopt import quantize as q

    proto, _, _ = net
    model = ir.from_proto(proto)
    assert q.pad_stem_channels(model) == ["conv1_channel_pad"]
    out = ir.to_proto(model)
    pad = next(n for n in out.graph.node if n.op_type == "Pad")
    conv1 = next(n for n in out.graph.node if n.name == "conv1")
    assert pad.input[0] == "x" and conv1.input[0] == pad.output[0]
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert inits[conv1.input[1]].shape == (32, 4, 3, 3) and not inits[conv1.input[1]][:, 3].any()
    assert "w1" not in inits  # the 3-channel weight is gone, not left unused
    assert inits["w2"].shape == (64, 32, 3, 3)  # conv2 reads conv1's output: not a first layer
    x = np.random.default_rng(4).standard_normal((4, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(
        builders.run(out, {"x": x})["y"], builders.run(proto, {"x": x})["y"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("channels", [(4, 8, 6), (1, 8, 6), (3, 3, 6), (7, 8, 6)])
def test_only_first_layers_one_channel_short_are_padded(channels):
    from onnxopt import quantize as q

    model = ir.from_proto(builders.conv_net(channels=channels, size=8, opset=13))
    padded = q.pad_stem_channels(model)
    # 4 input channels need nothing, 1 would cost 4x the input for no gain; a 3-channel Conv fed by another
    # Conv (conv2 in 3,3,6) is no first layer; 7 channels were not measured
    assert padded == (["conv1_channel_pad"] if channels[0] == 3 else [])


def test_static_int8_pads_the_stem_in_uint8_after_quantizing_the_input(net, monkeypatch):
    _fast_int8(monkeypatch)
    proto, path, data = net
    report = _run(path, data)
    assert report.ok and "[qdq-u8-pc]" in report.passes[0].changes[0].what
    assert [c.site for c in report.passes[0].changes[1:]] == ["conv1_channel_pad"]
    out = _proto(report)
    assert not [n for n in out.graph.node if n.op_type == "Pad"]
    quant = next(n for n in out.graph.node if n.input[0] == "x")
    assert quant.op_type == "QuantizeLinear"  # the model input, quantized once, then its channels gathered
    gather = next(n for n in out.graph.node if quant.output[0] in n.input)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert gather.op_type == "Gather" and inits[gather.input[1]].tolist() == [0, 1, 2, 0]
    assert [n.op_type for n in out.graph.node if gather.output[0] in n.input] == ["DequantizeLinear"]
    x = np.random.default_rng(3).standard_normal((32, 3, 12, 12)).astype(np.float32)
    ref, got = builders.run(proto, {"x": x})["y"], builders.run(out, {"x": x})["y"]
    assert 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)) > 25.0  # SQNR floor


@pytest.mark.parametrize("fmt", ["qdq", "qop"])
def test_the_uint8_gather_computes_what_the_float_pad_did_to_the_bit(net, tmp_path, fmt):
    from onnxopt import data as data_mod
    from onnxopt import graph as graph_io
    from onnxopt import quantize as q

    proto, _, data = net
    model = ir.from_proto(proto)
    pads = q.pad_stem_channels(model)
    padded = graph_io.save(model, tmp_path / "padded.onnx")
    x = np.random.default_rng(5).standard_normal((8, 3, 12, 12)).astype(np.float32)
    calib = data_mod.as_source(data, model)
    quantized = q.quantize_static(padded, tmp_path / "int8.onnx", calib, exclude=pads, quant_format=fmt)
    before = onnx.load(str(quantized))
    gathered = graph_io.load(quantized)
    assert q.gather_stem_channels(gathered, pads) == pads
    after = graph_io.to_proto(gathered)
    onnx.checker.check_model(after, full_check=True)
    assert [n.op_type for n in after.graph.node].count("Pad") == 0 and "Gather" in [n.op_type for n in after.graph.node]
    used = {name for n in after.graph.node for name in n.input}
    assert all(i.name in used for i in after.graph.initializer)  # the Pad's pads went with it
    for optimize in (True, False):  # onnxruntime's int8 kernels, and its float simulation of the Q/DQ pairs
        np.testing.assert_array_equal(builders.run(after, {"x": x}, optimize=optimize)["y"],
                                      builders.run(before, {"x": x}, optimize=optimize)["y"])  # fmt: skip
    assert q.gather_stem_channels(gathered, pads) == []  # nothing left to rewrite
    assert q.gather_stem_channels(graph_io.load(padded), pads) == []  # a Pad that feeds no QuantizeLinear stays


# ---- one sample ---------------------------------------------------------------------------------------------


def test_a_recipe_slower_on_one_sample_is_not_chosen(net, monkeypatch):
    # int8 wins at the data's batch (64) but loses on one sample: a device runs one input at a time
    table = {"float": 100.0, **{r.name: 50.0 for r in RECIPES}}
    calls = _timer(monkeypatch, table, single={"float": 10.0, **{r.name: 13.0 for r in RECIPES}, "qdq-u8-pt": 9.0})
    proto, path, data = net
    report = _run(path, data)
    assert calls.single and calls.single[0][0] == "float"
    assert "[qdq-u8-pt]" in report.passes[0].changes[0].what  # the one recipe not slower on one sample
    recipes_json = {r["recipe"]: r for r in _details(report)["quant_recipes"]}
    assert recipes_json["qdq-u8-pc"]["latency_ratio_batch1"] == pytest.approx(1.3)
    assert recipes_json["qdq-u8-pc"]["note"].startswith("slower than float on one sample (13 us against 10 us, 1.30x)")
    assert recipes_json["qdq-u8-pc"]["passed"] is None  # out before its (costly) budget check


def test_float_is_kept_when_every_recipe_is_slower_on_one_sample(net, monkeypatch):
    table = {"float": 100.0, **{r.name: 50.0 for r in RECIPES}}
    _timer(monkeypatch, table, single={"float": 10.0, **{r.name: 13.0 for r in RECIPES}})
    proto, path, data = net
    report = _run(path, data)
    assert not report.passes[0].modified
    assert report.passes[0].skipped[0].reason.startswith("no recipe 5% faster than float can be used: qdq-u8-pc slower")


def test_no_single_sample_timing_for_a_fixed_batch(tmp_path, monkeypatch):
    calls = _fast_int8(monkeypatch)
    proto = builders.conv_net(channels=(3, 8, 16), size=12, seed=1, opset=13, batch=4)
    path = builders.save(proto, tmp_path / "fixed.onnx")
    x = np.random.default_rng(2).standard_normal((16, 3, 12, 12)).astype(np.float32)
    report = _run(path, {"x": x})
    assert report.passes[0].modified and calls and not calls.single  # batch 4 is the model's: nothing to slice


@pytest.mark.parametrize("annotated", [False, True])
def test_recipes_are_timed_as_the_run_writes_them(tmp_path, monkeypatch, annotated):
    """onnxruntime's quantizers annotate every intermediate shape; a run whose original has no annotations writes
    its model without them, and with them onnxruntime fuses differently (MiniLM's int8 ran 13% slower): so the
    recipes are timed without them then, and as they are when the original has them too."""
    proto = builders.conv_net(channels=(3, 32, 64), size=12, seed=1, opset=13)
    if annotated:
        proto = onnx.shape_inference.infer_shapes(proto)
        assert len(proto.graph.value_info) > 0
    path = builders.save(proto, tmp_path / "net.onnx")
    data = {"x": np.random.default_rng(2).standard_normal((64, 3, 12, 12)).astype(np.float32)}
    annotations: list[bool] = []  # per recipe file timed: whether it annotates intermediate shapes
    fake_table = {"float": 100.0, "qdq-u8-pc": 40.0}

    def fake(models, feeds, **kwargs):
        annotations.extend(graph_io.has_value_info(m) for m in models if Path(m).stem.startswith("q_"))
        stems = ["float" if Path(m).stem == "float" else Path(m).stem.removeprefix("q_") for m in models]
        return [Latency(fake_table.get(s, 50.0), 1.0, 1.0, 1) for s in stems]

    monkeypatch.setattr("onnxopt.runtime.measure_latency", fake)
    report = _run(path, data)
    assert report.ok and report.passes[0].modified
    assert annotations
    assert all(annotations) if annotated else not any(annotations)
