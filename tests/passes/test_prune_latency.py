"""prune's measured latency: kernel times mapped back to the model's layers, per-unit costs, and the allocation's
ranking of ratio steps by time saved against error."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt import runtime
from onnxopt.passes._channel_groups import analyze
from onnxopt.passes._prune_latency import LAYER_KERNELS, layer_times, unit_costs
from onnxopt.passes._prune_proxy import Curves
from onnxopt.passes._transformer_groups import HANDLERS
from tests import builders


def _model(proto):
    model = ir.from_proto(proto)
    ShapeInferencePass(strict_mode=False)(model)
    return model


@pytest.mark.parametrize("with_bn", [True, False])
def test_every_layer_kernel_is_attributed_to_a_layer_of_the_model(with_bn):
    # onnxruntime folds the BatchNorm, fuses the Relus and re-lays the Convs out in NCHWc, renaming them after the
    # values they write: every layer kernel's time still lands on a Conv or Gemm of the input model
    proto = builders.conv_net(channels=(3, 16, 32), size=24, with_bn=with_bn)
    model = _model(proto)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 24, 24)).astype(np.float32)}
    times = runtime.node_times(model, feeds, runs=3)
    layers = layer_times(model, times)
    assert {node.name for node in layers} == {"conv1", "conv2", "fc"}
    kernel_total = sum(us for op, us in times.values() if op in LAYER_KERNELS)
    assert sum(layers.values()) == pytest.approx(kernel_total)
    assert all(us > 0 for us in layers.values())


def test_unnamed_nodes_are_matched_by_the_names_onnxruntime_gives_them():
    proto = builders.conv_net(channels=(3, 8, 8), size=12, with_bn=False)
    for node in proto.graph.node:
        node.name = ""
    model = _model(proto)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)}
    layers = layer_times(model, runtime.node_times(model, feeds, runs=2))
    assert sorted(node.op_type for node in layers) == ["Conv", "Conv", "Gemm"]


def test_the_profile_is_kept_in_the_latency_record(monkeypatch):
    # conftest gives each test an empty record: the first call profiles, the second reads the record (the same
    # times, the same ranking), a changed model profiles again
    from onnxopt.passes import _prune_latency

    calls = []
    real = runtime.node_times
    monkeypatch.setattr(runtime, "node_times", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model(builders.conv_net(channels=(3, 8, 8), size=12, with_bn=False))
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)}
    first = _prune_latency.recorded_node_times(model, feeds)
    again = _prune_latency.recorded_node_times(model, feeds)
    assert len(calls) == 1 and again == first and all(isinstance(op, str) for op, _ in again.values())
    other = _model(builders.conv_net(channels=(3, 8, 16), size=12, with_bn=False))
    _prune_latency.recorded_node_times(other, feeds)
    assert len(calls) == 2


def test_unit_cost_is_the_time_per_channel_of_the_layers_a_group_touches():
    proto = builders.conv_net(channels=(3, 16, 32), size=24, with_bn=False)
    model = _model(proto)
    analysis = analyze(model, HANDLERS)
    nodes = {node.name: node for node in model.graph}
    groups = sorted({unit.group for unit in analysis.units if unit.blocked is None})
    # made-up times: conv1 writes the 16 channels conv2 reads; conv2 writes the 32 channels fc reads
    layer_us = {nodes["conv1"]: 160.0, nodes["conv2"]: 320.0, nodes["fc"]: 64.0}
    costs = unit_costs(analysis, layer_us, groups)
    owner = analysis._slot_owner()
    size_of = {unit.group: owner[unit.slots[0]].size for unit in analysis.units}
    by_size = {size_of[g]: costs[g] for g in groups}
    assert by_size[16] == pytest.approx(160 / 16 + 320 / 16)  # producer conv1 + consumer conv2
    assert by_size[32] == pytest.approx(320 / 32 + 64 / 32)  # producer conv2 + consumer fc
    # a group without a timed layer gets the mean of the others
    costs = unit_costs(analysis, {nodes["conv1"]: 160.0}, groups)
    assert costs[groups[0]] == pytest.approx(costs[groups[1]])


class _FakeProxy:
    """Errors by group: ``slope[g] · (ratio of the group removed)²``."""

    def __init__(self, slope):
        self.slope = slope

    def loss(self, removed, *, anchor=False):
        return float(sum(self.slope[g] * (len(ch) / 100) ** 2 for g, ch in removed.items()))


def _curves(costs, slope=None):
    slope = slope or {0: 1.0, 1: 1.0}

    def removal(per_group):
        removed = {g: np.arange(int(round(100 * r))) for g, r in per_group.items()}
        return sum(len(v) for v in removed.values()), removed

    grid = tuple(np.round(np.arange(0.1, 0.95, 0.1), 2))
    return Curves(_FakeProxy(slope), [0, 1], grid, removal, cap=0.5, costs=costs)


def test_costlier_groups_go_further_for_the_same_error():
    # equal error curves; group 0's units save 4x the time of group 1's: at every threshold group 0 goes at
    # least as far, and further at some; without costs both go equally far
    plain, ranked = _curves(None), _curves({0: 4e-3, 1: 1e-3})
    for tau in (0.01, 0.04, 0.2):
        a = plain.at(tau)
        assert a.get(0) == a.get(1)
    further = False
    lo, hi = np.log(min(ranked.first_errors())), np.log(ranked.top())
    for x in np.linspace(lo, hi, 12):
        r = ranked.at(float(np.exp(x)))
        assert r.get(0, 0) >= r.get(1, 0)
        further |= r.get(0, 0) > r.get(1, 0)
    assert further


def test_ranked_allocation_grows_with_the_threshold_and_never_takes_a_capped_step():
    curves = _curves({0: 4e-3, 1: 1e-3}, slope={0: 1.0, 1: 3.0})
    lo, hi = np.log(min(curves.first_errors())), np.log(curves.top())
    previous = {}
    for x in np.linspace(lo - 1, hi + 1, 20):
        ratios = curves.at(float(np.exp(x)))
        for g, r in previous.items():
            assert ratios.get(g, 0) >= r
        for g, r in ratios.items():
            assert curves.proxy.slope[g] * r**2 < 0.5  # the cap
        previous = ratios
    assert previous  # the top threshold takes steps
