"""prune on transformer encoders: attention heads and FFN neurons of tiny_bert, exactness, shapes, scores, refit."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from onnxopt import data, registry, stats
from onnxopt.manager import PassManager
from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
from onnxopt.validate import Budget
from tests import builders
from tests.passes.test_prune import _prune

LAYERS, HIDDEN, HEADS, FFN = 2, 32, 4, 64
DEPTH = HIDDEN // HEADS


def _bert(activation="erf", targets="const", opset=17, seed=0):
    proto = builders.tiny_bert(layers=LAYERS, hidden=HIDDEN, heads=HEADS, ffn=FFN, opset=opset, seed=seed)
    if activation != "erf":
        proto = _with_activation(proto, activation)
    if targets == "concat":
        proto = _with_shape_targets(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _with_activation(proto, op):
    """Replace each layer's erf-GELU subgraph (div, erf, add, mul, mul) by one ``op`` node (Gelu or Relu)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = []
    for node in proto.graph.node:
        if "/gelu/" in node.name:
            continue
        if node.name.endswith("/gelu"):
            layer = node.name.split("/")[0]
            node = helper.make_node(op, [f"{layer}/ffn1/bias"], [node.output[0]], name=node.name)
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _with_shape_targets(proto):
    """Reshape targets as torch's ``x.view(x.size(0), x.size(1), H, D)``: Concat of Shape dims and constants."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    extra = [
        numpy_helper.from_array(np.array(0, np.int64), "dim0"),
        numpy_helper.from_array(np.array(1, np.int64), "dim1"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([HEADS, DEPTH], np.int64), "tail_heads"),
        numpy_helper.from_array(np.array([HIDDEN], np.int64), "tail_hidden"),
    ]
    nodes = []
    for node in proto.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            tail = "tail_heads" if inits[node.input[1]].size == 4 else "tail_hidden"
            p = node.name
            nodes.append(helper.make_node("Shape", [node.input[0]], [f"{p}/shape"], name=f"{p}/shape"))
            for i in (0, 1):
                nodes.append(helper.make_node("Gather", [f"{p}/shape", f"dim{i}"], [f"{p}/g{i}"], name=f"{p}/g{i}"))
                nodes.append(helper.make_node("Unsqueeze", [f"{p}/g{i}", "axis0"], [f"{p}/u{i}"], name=f"{p}/u{i}"))
            nodes.append(
                helper.make_node("Concat", [f"{p}/u0", f"{p}/u1", tail], [f"{p}/target"], name=f"{p}/target", axis=0)
            )
            node = helper.make_node("Reshape", [node.input[0], f"{p}/target"], list(node.output), name=p)
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept = [i for i in out.graph.initializer if i.name not in ("heads_shape", "hidden_shape")]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + extra)
    return out


def _set(proto, name, array):
    for i, init in enumerate(proto.graph.initializer):
        if init.name == name:
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
            return
    raise KeyError(name)


def _inits(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _zero_units(proto, head=1, neurons=range(0, FFN, 4)):
    """Zero head ``head``'s rows of every output projection and the FFN second-layer rows ``neurons``."""
    inits = _inits(proto)
    for layer in range(LAYERS):
        wo = inits[f"layer{layer}/out.weight"].copy()
        wo[head * DEPTH : (head + 1) * DEPTH] = 0
        _set(proto, f"layer{layer}/out.weight", wo)
        w2 = inits[f"layer{layer}/ffn2.weight"].copy()
        w2[list(neurons)] = 0
        _set(proto, f"layer{layer}/ffn2.weight", w2)
    return proto


def _reshape_tails(proto):
    """Per Reshape, the constant tail of its target: ``[H, D]`` (head split) or ``[H·D]`` (merge)."""
    inits = _inits(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    tails = []
    for node in proto.graph.node:
        if node.op_type != "Reshape":
            continue
        target = node.input[1]
        if target in inits:
            tails.append(inits[target].tolist()[2:])
        else:
            concat = producers[target]
            assert concat.op_type == "Concat"
            tails.append(inits[concat.input[-1]].tolist())
    return tails


def _close(reference, candidate, feeds, tol):
    ref, got = builders.run(reference, feeds), builders.run(candidate, feeds)
    for name, value in ref.items():
        assert got[name].shape == value.shape
        np.testing.assert_allclose(got[name], value, rtol=tol, atol=tol)


CALIB = builders.tiny_bert_feeds(32, 12, seed=1)
QUARTER = PruneConfig(ratio=0.25)


@pytest.mark.parametrize(
    ("activation", "targets", "opset"),
    [("erf", "const", 17), ("erf", "concat", 17), ("Gelu", "const", 20), ("Relu", "concat", 17)],
)
def test_zero_head_and_ffn_rows_are_removed_exactly(activation, targets, opset):
    proto = _zero_units(_bert(activation, targets, opset))
    result, out = _prune(proto, QUARTER, CALIB)
    assert result.modified
    heads = sorted(c.what for c in result.changes if "heads" in c.what)
    assert heads == ["4 -> 3 attention heads"] * LAYERS
    inits = _inits(out)
    for layer in range(LAYERS):
        p = f"layer{layer}"
        assert inits[f"{p}/q.weight"].shape == (HIDDEN, HIDDEN - DEPTH)
        assert inits[f"{p}/v.bias"].shape == (HIDDEN - DEPTH,)
        assert inits[f"{p}/out.weight"].shape == (HIDDEN - DEPTH, HIDDEN)
        assert inits[f"{p}/ffn1.weight"].shape == (HIDDEN, FFN * 3 // 4)
        assert inits[f"{p}/ffn2.weight"].shape == (FFN * 3 // 4, HIDDEN)
        # the zeroed head (1) and neurons (multiples of 4) are the ones that went
        original = _inits(proto)
        kept = [c for c in range(HIDDEN) if not DEPTH <= c < 2 * DEPTH]
        np.testing.assert_array_equal(inits[f"{p}/k.weight"], original[f"{p}/k.weight"][:, kept])
        np.testing.assert_array_equal(
            inits[f"{p}/ffn2.weight"], np.delete(original[f"{p}/ffn2.weight"], range(0, FFN, 4), 0)
        )
    # Reshape targets: heads and merged widths updated, whether constant or a Concat of Shape dims and constants
    tails = sorted(_reshape_tails(out))
    assert tails == sorted([[HEADS - 1, DEPTH]] * 3 * LAYERS + [[HIDDEN - DEPTH]] * LAYERS)
    for batch, tokens in ((1, 7), (8, 16)):
        _close(proto, out, builders.tiny_bert_feeds(batch, tokens, seed=batch), 1e-5)


def test_hidden_size_is_kept_with_a_reason():
    proto = _bert()
    result, out = _prune(proto, QUARTER, CALIB)
    reasons = [s.reason for s in result.skipped]
    assert any("hidden size" in r and "residual Add" in r for r in reasons)
    assert out.graph.output[0].type.tensor_type.shape.dim[2].dim_value == HIDDEN
    assert _inits(out)["layer0/attn.gamma"].shape == (HIDDEN,)


def test_apoz_removes_gelu_neurons_whose_inputs_are_never_positive():
    proto = _bert()
    bias = _inits(proto)["layer0/ffn1.bias"].copy()
    bias[[3, 9, 30]] = -60.0  # GELU(x - 60) is exactly 0 in float32: these neurons never fire
    _set(proto, "layer0/ffn1.bias", bias)
    result, out = _prune(proto, PruneConfig(criterion="apoz", threshold=0.99), CALIB)
    assert [c.what for c in result.changes] == ["64 -> 61 channels (0.0469 removed; apoz 0.99)"]
    assert _inits(out)["layer0/ffn1.weight"].shape == (HIDDEN, 61)
    _close(proto, out, builders.tiny_bert_feeds(4, 9, seed=5), 1e-5)


def test_head_score_follows_the_output_projection():
    """A head whose output-projection rows are scaled down scores lowest and goes first."""
    proto = _bert()
    wo = _inits(proto)["layer1/out.weight"].copy()
    wo[2 * DEPTH : 3 * DEPTH] *= 1e-3
    _set(proto, "layer1/out.weight", wo)
    result, out = _prune(proto, QUARTER, CALIB)
    kept = [c for c in range(HIDDEN) if not 2 * DEPTH <= c < 3 * DEPTH]
    np.testing.assert_array_equal(_inits(out)["layer1/out.weight"], wo[kept])


def _cosine(reference, candidate, feeds):
    a = builders.run(reference, feeds)["last_hidden_state"].ravel()
    b = builders.run(candidate, feeds)["last_hidden_state"].ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_refit_of_the_matmul_projections_reduces_the_error():
    proto = _bert()
    held_out = builders.tiny_bert_feeds(16, 12, seed=9)
    cosines = {}
    for refit in (False, True):
        config = PruneConfig(ratio=0.5, refit=refit)
        report = PassManager([ChannelPrunePass(config)], data=CALIB, budget=Budget(min_cosine=0.0)).run(
            ir.from_proto(proto)
        )
        out = ir.to_proto(report.model)
        assert _inits(out)["layer0/out.weight"].shape == (HIDDEN // 2, HIDDEN)
        refitted = [c for r in report.passes for c in r.changes if "re-fitted" in c.what]
        assert bool(refitted) == refit
        cosines[refit] = _cosine(proto, out, held_out)
    assert cosines[True] > cosines[False] + 0.01


def test_budget_search_prunes_heads_and_neurons_within_the_budget():
    proto = _zero_units(_bert())
    report = PassManager(
        [ChannelPrunePass(PruneConfig(steps=4))],
        data=CALIB,
        eval_data=builders.tiny_bert_feeds(16, 10, seed=4),
        budget=Budget(min_cosine=0.9999),
    ).run(ir.from_proto(proto))
    assert report.validation.ok
    out = ir.to_proto(report.model)
    inits = _inits(out)
    assert inits["layer0/out.weight"].shape[0] <= HIDDEN - DEPTH
    assert inits["layer0/ffn2.weight"].shape[0] <= FFN * 3 // 4
    assert _cosine(proto, out, builders.tiny_bert_feeds(8, 12, seed=11)) >= 0.999


def _torch_encoder():
    """A two-layer post-LN encoder written as BERT is (no ``transformers``): hidden 32, 4 heads, FFN 64, GELU."""
    torch = pytest.importorskip("torch")

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
            self.ln1, self.ln2 = torch.nn.LayerNorm(HIDDEN), torch.nn.LayerNorm(HIDDEN)
            self.f1, self.f2 = torch.nn.Linear(HIDDEN, FFN), torch.nn.Linear(FFN, HIDDEN)

        def forward(self, x, mask):
            b, n, _ = x.shape

            def split(t):
                return t.view(b, n, HEADS, DEPTH).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            scores = q @ k.transpose(-1, -2) / DEPTH**0.5 + mask
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, HIDDEN)
            x = self.ln1(x + self.o(context))
            return self.ln2(x + self.f2(torch.nn.functional.gelu(self.f1(x))))

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS))

        def forward(self, x, attention_mask):
            mask = (1.0 - attention_mask[:, None, None, :]) * -10000.0
            for layer in self.layers:
                x = layer(x, mask)
            return x

    torch.manual_seed(0)
    return torch, Encoder().eval()


def _export_encoder(tmp_path, dynamo: bool):
    """:func:`_torch_encoder` exported with ``torch.onnx.export(dynamo=...)``, batch and tokens dynamic: (torch, module,
    path)."""
    torch, module = _torch_encoder()
    x, mask = torch.randn(2, 7, HIDDEN), torch.ones(2, 7)
    path = tmp_path / "encoder.onnx"
    if dynamo:
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
        extra = {"dynamic_shapes": (dims, dims), "external_data": False, "opset_version": 18}
    else:
        axes = {0: "batch", 1: "seq"}
        extra = {"dynamic_axes": {"x": axes, "attention_mask": axes}, "opset_version": 17}
    torch.onnx.export(
        module, (x, mask), str(path), input_names=["x", "attention_mask"], output_names=["y"], dynamo=dynamo, **extra
    )
    return torch, module, path


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_exports_of_an_encoder_lose_heads_and_neurons(tmp_path, dynamo):
    torch, module, path = _export_encoder(tmp_path, dynamo)
    rng = np.random.default_rng(0)
    calib = {
        "x": rng.standard_normal((32, 9, HIDDEN)).astype(np.float32),
        "attention_mask": np.ones((32, 9), np.float32),
    }
    report = PassManager([ChannelPrunePass(QUARTER)], data=calib, budget=Budget(min_cosine=0.0)).run(path)
    changes = [c.what for r in report.passes for c in r.changes]
    assert changes.count(f"{HEADS} -> {HEADS - 1} attention heads") == LAYERS
    assert changes.count(f"{FFN} -> {FFN * 3 // 4} channels (0.25 removed; ratio 0.25)") == LAYERS
    out = ir.to_proto(report.model)
    onnx.checker.check_model(out, full_check=True)
    assert sum(numpy_helper.to_array(i).size for i in out.graph.initializer) < sum(
        numpy_helper.to_array(i).size for i in onnx.load(str(path)).graph.initializer
    )
    for batch, tokens in ((1, 5), (8, 16)):
        feeds = {"x": rng.standard_normal((batch, tokens, HIDDEN)).astype(np.float32)}
        feeds["attention_mask"] = np.ones((batch, tokens), np.float32)
        got = builders.run(out, feeds)["y"]
        want = module(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["attention_mask"])).detach().numpy()
        assert got.shape == want.shape
        cosine = float(got.ravel() @ want.ravel() / np.linalg.norm(got) / np.linalg.norm(want))
        assert 0.5 < cosine < 1 - 1e-6  # pruned: close to the module, not identical


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("spec", ["simplify", "prune", "split", "svd", "share", "quant", "fuse", "prune,distill"])
def test_torch_exports_of_an_encoder_go_through_every_pass(tmp_path, dynamo, spec):
    """Both exports of the same module through each pass: no error, a model onnx's full check accepts, within a
    cosine budget against the export, and every pass either changed something or says why not."""
    torch, _, path = _export_encoder(tmp_path, dynamo)
    rng = np.random.default_rng(1)
    calib = {
        "x": rng.standard_normal((64, 9, HIDDEN)).astype(np.float32),
        "attention_mask": np.ones((64, 9), np.float32),
    }
    names = spec.split(",")
    options = {"prune": {"ratio": 0.25}, "distill": {"epochs": 1}}
    passes = [registry.make_pass(name, **options.get(name, {})) for name in names]
    budget = None if names == ["simplify"] else Budget(min_cosine=0.0 if "prune" in names else 0.99)
    report = PassManager(passes, data=calib, budget=budget).run(path)
    out = ir.to_proto(report.model)
    onnx.checker.check_model(out, full_check=True)
    assert report.ok, report.validation.failures
    for record in report.passes:
        if record.name != "simplify":
            assert record.changes or record.skipped, record
            assert all(s.reason for s in record.skipped), record
    feeds = {
        "x": rng.standard_normal((8, 16, HIDDEN)).astype(np.float32),
        "attention_mask": np.ones((8, 16), np.float32),
    }
    assert builders.run(out, feeds)["y"].shape == (8, 16, HIDDEN)


def test_statistics_of_token_activations_are_per_feature():
    """(batch, tokens, features) values are reduced over batch and tokens, per feature (not per token)."""
    proto = _bert()
    model = ir.from_proto(proto)
    request = ChannelPrunePass(QUARTER).stats_request(model)
    assert ("layer0/gelu", 2) in request.axes and "layer0/gelu/div" in request.values  # FFN2 input, GELU gate
    assert request.grams == {"layer0/out", "layer1/out"}  # output projections, for head scores
    table = stats.collect_stats(model, data.as_source(CALIB, model, batch_size=8), request)
    gelu = builders.run(builders.expose(proto, ["layer0/gelu"]), CALIB)["layer0/gelu"]
    channel = table.channels["layer0/gelu"]
    assert channel.channels == FFN
    np.testing.assert_allclose(channel.abs_mean, np.abs(gelu).mean(axis=(0, 1)), rtol=1e-4, atol=1e-6)
    assert table.grams["layer0/out"].xtx.shape == (HIDDEN, HIDDEN)
