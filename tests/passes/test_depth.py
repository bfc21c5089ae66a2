"""depth: the block the budget spares goes and the one it needs stays, the mean form,
the greedy limit, numerics against onnxruntime on the original, and the error without data."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import cli
from onnxopt.blocks import blocks
from onnxopt.budget import Budget
from onnxopt.manager import PassManager
from onnxopt.passes.depth import DepthConfig, DepthPass
from tests import builders


def _data(n=48, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)


def _run(proto, tmp_path, budget, config=None):
    path = builders.save(proto, tmp_path / "m.onnx")
    manager = PassManager([DepthPass(config)], data={"x": _data()}, eval_data={"x": _data(seed=2)}, budget=budget)
    report = manager.run(path)
    return report, ir.to_proto(report.model)


def _cosine(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float((np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_the_block_the_budget_spares_goes_and_the_one_it_needs_stays(tmp_path):
    proto = builders.residual_net(scales=(1e-4, 1.0))
    report, out = _run(proto, tmp_path, Budget(min_cosine=0.999))
    names = [n.name for n in out.graph.node]
    assert "b0.c1" not in names and "b0.c2" not in names and "b0.add" not in names
    assert {"b1.c1", "b1.c2", "b1.add"} <= set(names)
    record = next(r for r in report.passes if r.name == "depth")
    assert [c.site for c in record.changes] == ["b0.add"] and "dropped" in record.changes[0].what
    x = _data(seed=3)
    before, after = builders.run(proto, {"x": x})["y"], builders.run(out, {"x": x})["y"]
    assert _cosine(before, after) >= 0.999 and not np.allclose(before, after, atol=0)
    onnx.checker.check_model(out, full_check=True)
    _, again = _run(proto, tmp_path, Budget(min_cosine=0.999))
    assert again.SerializeToString() == out.SerializeToString()  # the same command, the same model


def test_a_branch_that_only_shifts_its_input_is_replaced_by_its_mean(tmp_path):
    """Block 0's branch is a constant 0.5 (zero weights, bias 0.5): dropping it breaks a tight budget, its mean
    keeps the output to rounding."""
    proto = builders.residual_net(scales=(0.0, 1.0), biases=(0.5, 0.0))
    report, out = _run(proto, tmp_path, Budget(min_cosine=0.99999))
    record = next(r for r in report.passes if r.name == "depth")
    assert [c.site for c in record.changes] == ["b0.add"] and "mean" in record.changes[0].what
    names = [n.name for n in out.graph.node]
    assert "b0.c1" not in names and "b0.c2" not in names and "b0.add" in names  # x + the constant
    x = _data(seed=3)
    np.testing.assert_allclose(builders.run(out, {"x": x})["y"], builders.run(proto, {"x": x})["y"], atol=1e-5)
    zeros, _ = _run(proto, tmp_path, Budget(min_cosine=0.99999), DepthConfig(refit=False))
    assert not next(r for r in zeros.passes if r.name == "depth").changes


def test_max_blocks_stops_the_greedy_search(tmp_path):
    proto = builders.residual_net(scales=(1e-4, 1e-4))
    both, _ = _run(proto, tmp_path, Budget(min_cosine=0.999))
    assert len(next(r for r in both.passes if r.name == "depth").changes) == 2
    one, out = _run(proto, tmp_path, Budget(min_cosine=0.999), DepthConfig(max_blocks=1))
    record = next(r for r in one.passes if r.name == "depth")
    assert len(record.changes) == 1 and any("max_blocks=1" in s.reason for s in record.skipped)
    assert sum(n.op_type == "Add" for n in out.graph.node) == 1


def test_without_a_budget_check_it_is_a_usage_error(tmp_path, capsys):
    path = builders.save(builders.residual_net(), tmp_path / "m.onnx")
    code = cli.main(["run", str(path), "--passes", "depth", "-o", str(tmp_path / "out.onnx")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "pass 'depth' needs calibration data: give --data" in err
    assert not (tmp_path / "out.onnx").exists()


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_blocks"):
        DepthConfig(max_blocks=-1)


def test_a_transformer_encoders_attention_and_ffn_residuals_are_blocks():
    """The attention branch reads the shared mask too, which is made once outside every block and stays; with no
    budget every block goes, leaving the embeddings and the LayerNorms, and the model still runs."""
    proto = builders.tiny_bert()
    assert [b.name for b in blocks(ir.from_proto(proto), shapes={})] == [
        "layer0/attn/residual", "layer0/ffn/residual", "layer1/attn/residual", "layer1/ffn/residual"
    ]  # fmt: skip
    data, held = builders.tiny_bert_feeds(batch=48), builders.tiny_bert_feeds(batch=48, seed=1)
    manager = PassManager([DepthPass()], data=data, eval_data=held, budget=Budget(min_cosine=0.0))
    report = manager.run(ir.from_proto(proto))
    assert len(next(r for r in report.passes if r.name == "depth").changes) == 4
    out = ir.to_proto(report.model)
    assert not {"MatMul", "Softmax"} & {n.op_type for n in out.graph.node}
    got = builders.run(out, builders.tiny_bert_feeds(batch=2))["last_hidden_state"]
    assert got.shape == (2, 16, 32) and np.isfinite(got).all()
