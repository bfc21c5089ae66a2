"""prune's masked proxy (one session scores every candidate) and the per-group allocation search built on it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt import data, stats
from onnxopt.manager import PassManager
from onnxopt.passes._channel_groups import analyze, rebind
from onnxopt.passes._prune_apply import apply_removal
from onnxopt.passes._prune_proxy import MaskedProxy, masked_model
from onnxopt.passes._prune_scores import score_units
from onnxopt.passes._prune_select import removed_and_means, select
from onnxopt.passes._transformer_groups import HANDLERS
from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
from onnxopt.validate import Budget
from tests import builders
from tests.passes.test_prune import _Net

DEEP = (8, 32, 32, 32, 32, 32, 32, 4)  # six hidden layers: six layer groups, more than the greedy phase takes


def _feeds(n=64, seed=1, width=8):
    return {"x": np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)}


def _analysed(proto, feeds):
    model = ir.from_proto(proto)
    ShapeInferencePass(strict_mode=False)(model)
    analysis = analyze(model, HANDLERS)
    pass_ = ChannelPrunePass(PruneConfig(ratio=0.5))
    source = data.as_source(feeds, model, batch_size=16)
    table = stats.collect_stats(model, source, pass_.stats_request(model))
    stats.attach_stats(model, table)
    return model, analysis, table, source


def _conv_chain():
    """Conv(3x3, pad 1) → Relu → Conv(1x1) → Relu → Conv(3x3, pad 1), channel 2 of the second layer dead."""
    net = _Net([("x", ["N", 3, 6, 6])], rng=np.random.default_rng(3))
    h = net.node("Relu", [net.conv("x", 3, 8)])
    h = net.node("Relu", [net.conv(h, 8, 8, k=1, pad=0, dead=(2,))])
    return net.model(net.conv(h, 8, 4), ["N", 4, 6, 6])


def test_masked_model_without_removal_computes_the_original_exactly():
    proto = _conv_chain()
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 3, 6, 6)).astype(np.float32)}
    model, analysis, _, _ = _analysed(proto, feeds)
    masked, inputs = masked_model(model, analysis)
    assert len(inputs) == 2  # the two values a consumer reads
    extra = {}
    for mask, fill, shape in inputs.values():
        assert shape == (1, 8, 1, 1)
        extra[mask], extra[fill] = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    got = builders.run(ir.to_proto(masked), {**feeds, **extra})
    want = builders.run(proto, feeds)
    np.testing.assert_array_equal(got[proto.graph.output[0].name], want[proto.graph.output[0].name])
    assert [v.name for v in model.graph.inputs] == ["x"]  # the input model is left alone


def test_proxy_equals_the_pruned_model_for_gemm_consumers():
    """For Gemm consumers the masked model is the pruned model (means folded into the bias): the proxy's error is
    the real candidate's error against the original, to rounding."""
    proto = builders.mlp(sizes=DEEP, seed=2)
    feeds = _feeds()
    model, analysis, table, source = _analysed(proto, feeds)
    proxy = MaskedProxy(model, analysis, table, source, samples=64)
    assert proxy.samples == 64 and proxy.loss({}) == 0.0
    config = PruneConfig(ratio=0.25, align=1)
    chosen = select(analysis, score_units(analysis, table), config, 0.25)
    removed = analysis.removed_by_space([item.unit for item in chosen])
    names = {id(s.value): s.value.name for s in analysis.spaces.values()}
    proxy_error = proxy.loss({names[k]: v for k, v in removed.items()})
    result_model = ir.from_proto(proto)
    pass_ = ChannelPrunePass(config)
    stats.attach_stats(result_model, stats.collect_stats(result_model, source, pass_.stats_request(result_model)))
    pass_(result_model)
    ref, got = builders.run(proto, feeds)["y"], builders.run(ir.to_proto(result_model), feeds)["y"]
    real_error = float(np.sum((got.astype(np.float64) - ref) ** 2) / np.sum(ref.astype(np.float64) ** 2))
    assert proxy_error > 1e-4
    np.testing.assert_allclose(proxy_error, real_error, rtol=1e-4)


def test_proxy_of_a_dead_channel_behind_a_padded_conv_is_exact():
    proto = _conv_chain()
    feeds = {"x": np.random.default_rng(0).standard_normal((8, 3, 6, 6)).astype(np.float32)}
    model, analysis, table, source = _analysed(proto, feeds)
    proxy = MaskedProxy(model, analysis, table, source)
    padded = [a for a in analysis.actions if a.kind == "consumer" and a.node.inputs[1].shape == ir.Shape([4, 8, 3, 3])]
    dead_value = padded[0].space.value.name  # what the padded 3x3 Conv reads
    assert proxy.loss({dead_value: np.array([2])}) < 1e-12  # dead on every input: removing it changes nothing
    assert proxy.loss({dead_value: np.array([0, 1])}) > 1e-4


def _search(path, feeds, evaluation, **config):
    return PassManager(
        [ChannelPrunePass(PruneConfig(align=1, latency_guard=False, **config))], data=feeds, eval_data=evaluation,
        budget=Budget(min_cosine=0.99), simplify=False,
    ).run(path)  # fmt: skip


def test_many_groups_are_allocated_by_the_proxy_and_the_result_holds(tmp_path, monkeypatch):
    proto = builders.mlp(sizes=DEEP, seed=2)
    path = builders.save(proto, tmp_path / "m.onnx")
    losses = []
    original_loss = MaskedProxy.loss
    counted = lambda self, removed, **k: losses.append(1) or original_loss(self, removed, **k)  # noqa: E731
    monkeypatch.setattr(MaskedProxy, "loss", counted)
    report = _search(path, _feeds(), _feeds(seed=2))
    record = report.passes[0]
    assert report.ok and record.modified
    assert losses  # the proxy scored the groups' steps
    search = record.details["search"]
    assert search["candidates"] <= 7  # at most `steps` budget checks, not a bisection per group
    ratios = {c.what.split("; ratio ")[1].rstrip(")") for c in record.changes}
    assert len(ratios) > 1  # groups got different ratios
    assert report.validation.outputs["y"].cosine >= 0.99
    again = _search(path, _feeds(), _feeds(seed=2))  # deterministic: the same command, the same model
    assert [c.what for c in again.passes[0].changes] == [c.what for c in record.changes]


def test_allocation_backs_off_when_nothing_holds(tmp_path):
    proto = builders.mlp(sizes=DEEP, seed=2)
    path = builders.save(proto, tmp_path / "m.onnx")
    report = PassManager(
        [ChannelPrunePass(PruneConfig(align=1, latency_guard=False))], data=_feeds(), eval_data=_feeds(seed=2),
        budget=Budget(min_cosine=0.999999), simplify=False,
    ).run(path)  # fmt: skip
    assert report.ok and report.validation.outputs["y"].max_abs == 0  # no live neuron can go: the input, unchanged


def test_few_groups_keep_the_greedy_per_group_search(tmp_path, monkeypatch):
    proto = builders.mlp(sizes=(8, 64, 48, 4), seed=1)
    path = builders.save(proto, tmp_path / "m.onnx")
    called = []
    monkeypatch.setattr(ChannelPrunePass, "_allocate", lambda self, *a: called.append(1))
    report = _search(path, _feeds(), _feeds(seed=2))
    assert report.ok and not called


def test_many_small_batches_run_side_by_side_with_the_losses_of_one_after_another(monkeypatch):
    """Batches of one sample (a model of fixed batch 1) are scored on worker threads, one onnxruntime thread each:
    the same reference and losses as scoring them one after another."""
    import threading

    from onnxopt import runtime

    proto = builders.mlp(sizes=DEEP, seed=2)
    feeds = _feeds(n=8)
    model, analysis, table, _ = _analysed(proto, feeds)
    source = data.as_source(feeds, model, batch_size=1)
    threads, run = [], runtime.Session.run
    monkeypatch.setattr(
        runtime.Session, "run", lambda self, *a: threads.append(threading.current_thread()) or run(self, *a)
    )
    losses = {}
    for count in ("1", "2"):
        monkeypatch.setenv("ONNXOPT_THREADS", count)
        threads.clear()
        proxy = MaskedProxy(model, analysis, table, source, samples=8)
        assert len(proxy.batches) == 8 and proxy.workers == int(count)
        assert proxy.session.inner.get_session_options().intra_op_num_threads == 1
        names = sorted(proxy.inputs)  # the values a masked consumer reads
        removals = [{}, {names[0]: np.array([0, 3])}, {names[0]: np.array([1]), names[-1]: np.array([2, 5, 7])}]
        losses[count] = [proxy.loss(removed) for removed in removals]
        on_main = [t is threading.main_thread() for t in threads]  # the reference's 8 runs, then 8 per loss
        assert len(on_main) == 8 * 4 and (all(on_main) if count == "1" else not any(on_main))
    assert losses["1"][0] == 0.0 and min(losses["1"][1:]) > 1e-6
    assert losses["2"] == losses["1"]


def test_removals_that_differ_from_the_anchor_downstream_run_from_a_cut_with_the_losses_of_whole_runs(monkeypatch):
    """After the anchor (the search's base removal), a removal that changes only later layers' masks runs the
    masked model from a cut, on the anchor's values before it: the losses of whole-model runs; a removal that
    changes the first layer's masks, or none, runs whole."""
    from onnxopt.passes import _proxy_cuts

    proto = builders.mlp(sizes=DEEP, seed=2)
    feeds = _feeds()
    model, analysis, table, source = _analysed(proto, feeds)
    cut_runs = []
    runner = _proxy_cuts.Cuts.runner
    monkeypatch.setattr(_proxy_cuts.Cuts, "runner", lambda self, cut: cut_runs.append(cut) or runner(self, cut))
    proxies = {}
    for mode in ("cuts", "whole"):
        proxy = MaskedProxy(model, analysis, table, source, samples=32)
        if mode == "whole":
            proxy.cuts.cuts = []
        proxies[mode] = proxy
    cuts = proxies["cuts"].cuts
    names = sorted(cuts.at, key=cuts.at.get)  # the masked values in graph order
    assert len(names) == 6 and len(cuts.cuts) >= 4 and cuts.cuts[0] > 0
    base = {names[1]: np.array([0, 5])}
    removals = [
        {**base, names[-1]: np.array([1, 2])},
        {**base, names[3]: np.array([4])},
        {names[1]: np.array([0, 5, 7])},  # the anchor's layer itself, changed
        {**base, names[0]: np.array([3])},  # the first layer: before every cut
        base,  # the anchor again
    ]
    losses = {}
    for mode, proxy in proxies.items():
        cut_runs.clear()
        losses[mode] = [proxy.loss(base, anchor=True)] + [proxy.loss(removed) for removed in removals]
        if mode == "cuts":  # the first three removals from their layer's cut, the last two whole
            where = [cuts.at[names[-1]], cuts.at[names[3]], cuts.at[names[1]]]
            assert cut_runs == where
        else:
            assert cut_runs == []
    assert min(losses["whole"][1:]) > 1e-6
    np.testing.assert_allclose(losses["cuts"], losses["whole"], rtol=1e-6, atol=0)
    cut_runs.clear()
    proxies["cuts"].close_cuts()  # the anchor's values and the suffix sessions freed: whole runs, the same loss
    np.testing.assert_allclose(proxies["cuts"].loss(removals[0]), losses["cuts"][1], rtol=1e-6, atol=0)
    assert cut_runs == [] and proxies["cuts"].cuts.cuts == []


def test_select_asked_many_settings_of_one_analysis_gives_what_a_fresh_analysis_gives():
    """select() keeps each analysis's per-group plan between calls (the allocation asks it a hundred times): the
    units it picks are those picked from a fresh analysis and scoring, whatever was asked of it before."""
    proto = builders.mlp(sizes=DEEP, seed=2)
    feeds = _feeds()
    model, analysis, table, _ = _analysed(proto, feeds)
    scored = score_units(analysis, table)
    groups = sorted({item.unit.group for item in scored.values()})
    asks = [
        (PruneConfig(ratio=0.5, align=1), 0.5, None),
        (PruneConfig(ratio=0.5, align=8), 0.5, None),
        (PruneConfig(ratio=0.5, align=1), 0.25, {groups[0]: 0.75, groups[2]: 0.9}),
        (PruneConfig(ratio=0.5, align=1, min_channels=30), 0.9, None),
        (PruneConfig(ratio=0.5, align=1, score="mean"), 0.375, None),
        (PruneConfig(criterion="apoz", threshold=0.3), 0.3, None),
        (PruneConfig(criterion="constant", threshold=0.5), 0.5, None),
        (PruneConfig(ratio=0.5, align=1), 0.5, None),  # the first ask again, after all the others
    ]
    picked = set()
    for config, setting, per_group in asks:
        got = [item.unit.slots for item in select(analysis, scored, config, setting, per_group)]
        fresh_analysis = analyze(model, HANDLERS)
        fresh = select(fresh_analysis, score_units(fresh_analysis, table), config, setting, per_group)
        assert got == [item.unit.slots for item in fresh], (config, setting, per_group)
        picked.add(len(got))
    assert len(picked) >= 4  # the asks differ in what they remove


def _rebind_case(kind):
    if kind == "conv":
        return _conv_chain(), {"x": np.random.default_rng(0).standard_normal((16, 3, 6, 6)).astype(np.float32)}
    proto = builders.tiny_bert(layers=2, hidden=32, heads=4, ffn=64, opset=17, seed=0)  # heads, gates, head inputs
    return proto, builders.tiny_bert_feeds(16, 8, seed=1)


@pytest.mark.parametrize("kind", ["conv", "bert"])
def test_an_analysis_rebound_to_a_clone_prunes_it_as_the_clone_own_analysis_does(kind):
    """Each prune candidate carries the search's analysis onto its clone (rebind) instead of analyzing the clone
    again: the units are the same objects, every value and node it refers to is the clone's, the clone pruned through
    it is the clone pruned through an analysis of its own, and the analyzed model stays as it was."""
    proto, feeds = _rebind_case(kind)
    model, analysis, table, _ = _analysed(proto, feeds)
    before = ir.to_proto(model).SerializeToString()
    scored = score_units(analysis, table)
    chosen = select(analysis, scored, PruneConfig(ratio=0.5, align=1), 0.5, None)
    assert chosen
    clone, fresh = model.clone(), model.clone()
    bound = rebind(analysis, model, clone)
    assert bound.units is analysis.units
    clone_values = {id(v) for v in clone.graph.inputs} | {id(v) for node in clone.graph for v in node.outputs}
    clone_values |= {id(v) for v in clone.graph.initializers.values()}
    assert all(id(space.value) in clone_values for space in bound.spaces.values())
    assert set(bound.spaces) == {id(space.value) for space in bound.spaces.values()}
    clone_nodes = {id(node) for node in clone.graph}
    assert all(id(action.node) in clone_nodes for action in bound.actions)
    assert len(bound.gates) == len(analysis.gates) and len(bound.head_inputs) == len(analysis.head_inputs)
    if kind == "bert":
        assert bound.gates and bound.head_inputs  # the transformer's spaces are carried too
    apply_removal(clone, bound, *removed_and_means(bound, chosen, table))
    own = analyze(fresh, HANDLERS)
    own_chosen = select(own, score_units(own, table), PruneConfig(ratio=0.5, align=1), 0.5, None)
    assert [item.unit.slots for item in own_chosen] == [item.unit.slots for item in chosen]
    apply_removal(fresh, own, *removed_and_means(own, own_chosen, table))
    assert ir.to_proto(clone).SerializeToString() == ir.to_proto(fresh).SerializeToString()
    assert ir.to_proto(model).SerializeToString() == before  # the search's model is untouched
    # a graph that is not the analyzed one's clone is refused, and the pass analyzes the candidate instead
    other = model.clone()
    other.graph.remove(other.graph[len(other.graph) - 1], safe=False)
    with pytest.raises(ValueError, match="differs"):
        rebind(analysis, model, other)


def test_the_search_analyzes_the_model_once_and_carries_it_to_every_candidate(tmp_path, monkeypatch):
    path = builders.save(builders.mlp(sizes=DEEP, seed=2), tmp_path / "m.onnx")
    analyzed, bound = [], []
    original_analyze = ChannelPrunePass._analyze
    monkeypatch.setattr(ChannelPrunePass, "_analyze", staticmethod(lambda m: analyzed.append(1) or original_analyze(m)))
    import onnxopt.passes.prune as prune_module

    monkeypatch.setattr(prune_module, "rebind", lambda *a: bound.append(1) or rebind(*a))
    report = _search(path, _feeds(), _feeds(seed=2))
    record = report.passes[0]
    assert report.ok and record.modified and record.details["search"]["candidates"] >= 2
    assert len(analyzed) == 2  # stats_request() and call(); before, once more per candidate
    assert len(bound) == record.details["search"]["candidates"]  # every candidate checked was built on it
