"""prune's search with ``refit``: the checked candidate is handed on as built, and the refit modes (on, off, auto)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnxopt.manager import PassManager
from onnxopt.passes import prune as prune_mod
from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
from onnxopt.validate import Budget
from tests import builders

DEEP = (8, 32, 32, 32, 32, 32, 32, 4)  # six layer groups: the proxy allocation
FEW = (8, 64, 48, 4)  # two layer groups: the bisection and the per-group phase


def _feeds(n=64, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)}


def _run(proto, min_cosine=0.99, **config):
    """The prune search on ``proto`` (calibration and evaluation data differ); the report and the pruned proto."""
    model = ir.from_proto(proto)
    report = PassManager(
        [ChannelPrunePass(PruneConfig(align=1, latency_guard=False, **config))], data=_feeds(),
        eval_data=_feeds(seed=2), budget=Budget(min_cosine=min_cosine), simplify=False,
    ).run(model)  # fmt: skip
    return report, ir.to_proto(model)


def _initializers(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


@pytest.fixture
def reconstructions(monkeypatch):
    """The least-squares refits run (one entry per reconstruct call)."""
    calls = []
    original = prune_mod.reconstruct

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(prune_mod, "reconstruct", counted)
    return calls


@pytest.mark.parametrize("sizes", [FEW, DEEP], ids=["bisection", "allocation"])
def test_the_checked_candidate_is_handed_on_as_it_was_built(sizes, monkeypatch, reconstructions):
    proto = builders.mlp(sizes=sizes, seed=2)
    report, reused = _run(proto, refit=True)
    assert report.ok and report.passes[0].modified
    fits = len(reconstructions)
    # the same search with nothing kept: the pass builds the chosen setting again (one more refit) after the search
    monkeypatch.setattr(ChannelPrunePass, "_keep", lambda self, key, candidate: None)
    again, rebuilt = _run(proto, refit=True)
    assert len(reconstructions) - fits == fits + 1
    assert [c.what for c in again.passes[0].changes] == [c.what for c in report.passes[0].changes]
    assert [(n.op_type, list(n.input)) for n in reused.graph.node] == [
        (n.op_type, list(n.input)) for n in rebuilt.graph.node
    ]
    weights, expected = _initializers(reused), _initializers(rebuilt)
    assert weights.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
