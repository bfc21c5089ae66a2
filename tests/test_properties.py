"""Property tests: random small graphs through every exact setting stay exact; lossy runs keep the validator honest.

The graphs are Conv chains with BatchNorm, residual Add, Concat, depthwise Convs, convolutions whose kernels
really are low rank (so ``split`` has exact work to do), then Flatten → Gemm (low-rank weight, so ``svd`` has
exact work to do) → Relu → Gemm, at default opsets 11 to 21, random sizes and a dynamic batch axis. Some
channels and neurons are dead (zero weights, negative bias before a Relu).

Exact settings: ``prune --prune-criterion dead``, ``split --split-energy 1`` (spatial and depthwise: the
numerical rank, exact by the SVD), ``svd --svd-energy 1`` (data-aware and plain), and all of them in one run.
Oracle: onnxruntime on the unmodified model, on fresh inputs.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt import graph, registry
from onnxopt.manager import PassManager
from onnxopt.validate import Budget
from tests import builders
from tests.passes.test_prune import _Net

# ONNXOPT_EXAMPLES=N runs N examples of each property instead (the CI default keeps the suite fast)
EXACT_EXAMPLES = int(os.environ.get("ONNXOPT_EXAMPLES", 24))
HONEST_EXAMPLES = int(os.environ.get("ONNXOPT_EXAMPLES", 16))
# each example runs onnxruntime a dozen times: shrinking a failure would take minutes, the example is printed anyway
SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow],
    "phases": [Phase.explicit, Phase.reuse, Phase.generate],
}


class _Graph(_Net):
    """``_Net`` with a seeded generator, low-rank kernels and dense layers, for the strategies below."""

    def __init__(self, rng: np.random.Generator):
        super().__init__([], rng=rng)

    def conv(self, x, cin, cout, *, k=3, dead=(), group=1, rank=0, bias=True):
        w = self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)
        if rank:  # W[l, c, i, j] = Σ_p A[(c, i), p]·B[p, (l, j)]: spatial-split rank ``rank``
            a = self.rng.standard_normal((cin * k, rank))
            b = self.rng.standard_normal((rank, cout * k)) / np.sqrt(cin * k * rank)
            w = (a @ b).reshape(cin, k, cout, k).transpose(2, 0, 1, 3)
        b = self.rng.standard_normal(cout) * 0.1
        for c in dead:  # a zero filter with a negative bias: the Relu after it is 0 for every input
            w[c], b[c] = 0, -1.0
        inputs = [x, self.init(w, "w")] + ([self.init(b, "b")] if bias else [])
        return self.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)

    def dense(self, x, k, m, *, rank=0, dead=(), matmul=False):
        w = self.rng.standard_normal((k, m)) / np.sqrt(k)  # x·W orientation
        if rank:
            w = self.rng.standard_normal((k, rank)) @ self.rng.standard_normal((rank, m)) / np.sqrt(k * rank)
        b = self.rng.standard_normal(m) * 0.1
        for c in dead:
            w[:, c], b[c] = 0, -1.0
        if matmul:
            return self.node("Add", [self.node("MatMul", [x, self.init(w, "w")]), self.init(b, "b")])
        return self.node("Gemm", [x, self.init(w.T, "w"), self.init(b, "b")], transB=1)


@st.composite
def random_nets(draw):
    """(model proto, input shape without the batch axis)."""
    opset = draw(st.integers(11, 21))
    size = draw(st.integers(4, 7))
    c0 = draw(st.integers(1, 3))
    g = _Graph(np.random.default_rng(draw(st.integers(0, 2**16))))
    x, channels = "x", c0
    kinds = draw(st.lists(st.sampled_from(["conv", "bn", "residual", "concat", "depthwise", "lowrank"]), max_size=3))
    for index, kind in enumerate(["lowrank", *kinds]):  # at least one kernel that splits exactly
        width = draw(st.integers(2, 6))
        dead = draw(st.sets(st.integers(0, width - 1), max_size=width - 1))
        if kind == "conv":
            x, channels = (
                g.node("Relu", [g.conv(x, channels, width, k=draw(st.sampled_from([1, 3])), dead=dead)]),
                width,
            )
        elif kind == "lowrank":
            # rank 1 always saves work (K + L < 3·K·L); rank 2 only for some channel counts
            rank = 1 if index == 0 else draw(st.integers(1, 2))
            x, channels = g.node("Relu", [g.conv(x, channels, width, rank=rank)]), width
        elif kind == "bn":
            c = g.conv(x, channels, width, dead=dead)
            params = [g.init(v) for v in (np.ones(width) * 1.3, np.zeros(width), np.zeros(width), np.ones(width))]
            x, channels = g.node("Relu", [g.node("BatchNormalization", [c, *params])]), width
        elif kind == "residual":
            a, b = g.conv(x, channels, width, dead=dead), g.conv(x, channels, width, dead=dead)
            x, channels = g.node("Relu", [g.node("Add", [a, b])]), width
        elif kind == "concat":
            a = g.node("Relu", [g.conv(x, channels, width, dead=dead)])
            b = g.node("Relu", [g.conv(x, channels, 2)])
            x, channels = g.node("Concat", [a, b], axis=1), width + 2
        else:
            a = g.node("Relu", [g.conv(x, channels, width, dead=dead)])
            x, channels = g.node("Relu", [g.conv(a, width, width, group=width, bias=False)]), width
    hidden = draw(st.integers(20, 26))  # at least 16 (svd's min_size) once the dead neurons are pruned
    dead = draw(st.sets(st.integers(0, hidden - 1), max_size=3))
    flat = g.node("Flatten", [x])
    h = g.node("Relu", [g.dense(flat, channels * size * size, hidden, rank=draw(st.integers(1, 3)), dead=dead,
                                matmul=draw(st.booleans()))])  # fmt: skip
    outputs = draw(st.integers(2, 5))
    y = g.dense(h, hidden, outputs)
    proto = builders.make_model(
        g.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c0, size, size])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", outputs])],
        g.inits,
        opset=opset,
        ir_version=10 if opset >= 21 else 9 if opset >= 19 else builders.IR_VERSION,
    )
    return proto, (c0, size, size)


def _inputs(shape, n, seed):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _io(model: onnx.ModelProto):
    return [(v.name, v.type.SerializeToString()) for v in [*model.graph.input, *model.graph.output]]


EXACT_SETTINGS = {
    "prune dead": [("prune", {"criterion": "dead"})],
    "split spatial": [("split", {"energy": 1.0})],
    "split depthwise": [("split", {"energy": 1.0, "mode": "depthwise"})],
    "svd data-aware": [("svd", {"energy": 1.0})],
    "svd plain": [("svd", {"energy": 1.0, "data_aware": False})],
    "all": [("prune", {"criterion": "dead"}), ("split", {"energy": 1.0}), ("svd", {"energy": 1.0})],
}


@settings(max_examples=EXACT_EXAMPLES, **SETTINGS)
@given(random_nets(), st.sampled_from(sorted(EXACT_SETTINGS)), st.integers(0, 2**16))
def test_exact_settings_keep_outputs_names_dtypes_and_shapes(net, setting, seed):
    proto, shape = net
    passes = [registry.make_pass(name, **options) for name, options in EXACT_SETTINGS[setting]]
    calib, test = _inputs(shape, 16, seed), _inputs(shape, 6, seed + 1)
    report = PassManager(passes, data={"x": calib}, budget=Budget(max_abs=1e-4)).run(graph.from_proto(proto))
    out = graph.to_proto(report.model)
    onnx.checker.check_model(out, full_check=True)
    assert _io(out) == _io(proto)
    name = proto.graph.output[0].name
    # "dead" is judged on the calibration data: a Relu fed only non-negative values can be off on all 16 samples
    # and fire on a 17th, so pruning is exact on the data it saw; split and svd at full rank are exact anywhere
    for x in (calib,) if "prune" in str(EXACT_SETTINGS[setting]) else (calib, test):
        np.testing.assert_allclose(
            builders.run(out, {"x": x})[name], builders.run(proto, {"x": x})[name], rtol=1e-4, atol=1e-4
        )
    assert report.ok, report.validation.failures
    changed = {r.name: len(r.changes) for r in report.passes if r.name != "simplify"}
    if setting in ("split spatial", "all"):  # the low-rank kernel always splits exactly, and saves work
        assert changed["split"] >= 1, report.passes
    if setting.startswith("svd"):  # so does the low-rank Gemm (unless pruning left it under min_size, in "all")
        assert changed["svd"] >= 1, report.passes


LOSSY_SETTINGS = {
    "prune ratio 0.5": ("prune", {"ratio": 0.5, "align": 1}),
    "prune search": ("prune", {}),
    "split rank 1": ("split", {"rank": 1}),
    "split search": ("split", {}),
    "svd rank 1": ("svd", {"rank": 1}),
    "svd search": ("svd", {}),
    "share 2 bits": ("share", {"bits": 2, "min_size": 64}),
    "share search": ("share", {"min_size": 64}),
    "quant": ("quant", {"force": True}),
}
BUDGETS = [Budget(min_cosine=0.999), Budget(max_rel_l2=0.05), Budget(max_abs=0.01), Budget(min_cosine=0.9)]


@settings(max_examples=HONEST_EXAMPLES, **SETTINGS)
@given(random_nets(), st.sampled_from(sorted(LOSSY_SETTINGS)), st.sampled_from(BUDGETS), st.integers(0, 2**16))
def test_lossy_passes_never_report_ok_beyond_the_budget(net, setting, budget, seed):
    proto, shape = net
    name, options = LOSSY_SETTINGS[setting]
    calib, held_out = _inputs(shape, 16, seed), _inputs(shape, 8, seed + 1)
    report = PassManager([registry.make_pass(name, **options)], data={"x": calib}, eval_data={"x": held_out},
                         budget=budget).run(graph.from_proto(proto))  # fmt: skip
    out = graph.to_proto(report.model)
    output = proto.graph.output[0].name
    # measured here, independently of onnxopt.validate, and like it with onnxruntime's optimizations on (as deployed:
    # an int8 QDQ model then runs integer kernels, whose rounding differs from the float simulation)
    ref = builders.run(proto, {"x": held_out}, optimize=True)[output].astype(np.float64)
    got = builders.run(out, {"x": held_out}, optimize=True)[output].astype(np.float64)
    cosine = min(float(r @ g / (np.linalg.norm(r) * np.linalg.norm(g) + 1e-30)) for r, g in zip(ref, got, strict=True))
    rel_l2 = max(float(np.linalg.norm(g - r) / (np.linalg.norm(r) + 1e-30)) for r, g in zip(ref, got, strict=True))
    scaled_abs = float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max()))
    within = (
        (budget.min_cosine is None or cosine >= budget.min_cosine)
        and (budget.max_rel_l2 is None or rel_l2 <= budget.max_rel_l2)
        and (budget.max_abs is None or scaled_abs <= budget.max_abs)
    )
    event("validation ok" if report.ok else "validation failed")  # pytest --hypothesis-show-statistics
    diff = report.validation.outputs[output]
    assert diff.cosine == pytest.approx(cosine, abs=1e-5)
    assert diff.rel_l2 == pytest.approx(rel_l2, rel=1e-3, abs=1e-6)
    assert diff.scaled_abs == pytest.approx(scaled_abs, rel=1e-3, abs=1e-6)
    if report.ok:
        assert within, (setting, budget, cosine, rel_l2, scaled_abs)
        onnx.checker.check_model(out, full_check=True)
        assert _io(out) == _io(proto)
    elif report.validation.checker_error is None:
        # not ok: the measured error is really over the budget (allowing float32 rounding at the edge)
        margin = Budget(
            min_cosine=None if budget.min_cosine is None else budget.min_cosine + 1e-6,
            max_rel_l2=None if budget.max_rel_l2 is None else budget.max_rel_l2 * (1 - 1e-4),
            max_abs=None if budget.max_abs is None else budget.max_abs * (1 - 1e-4),
        )
        assert not (
            (margin.min_cosine is None or cosine >= margin.min_cosine)
            and (margin.max_rel_l2 is None or rel_l2 <= margin.max_rel_l2)
            and (margin.max_abs is None or scaled_abs <= margin.max_abs)
        ), (setting, budget, report.validation.failures)
