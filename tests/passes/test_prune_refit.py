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


def _refit_note(report):
    record = report.passes[0]
    notes = [c.what for c in record.changes if c.site == "refit"] + [
        s.reason for s in record.skipped if s.site == "refit"
    ]
    assert len(notes) <= 1
    return notes[0] if notes else None


@pytest.mark.parametrize(("sizes", "min_cosine"), [(FEW, 0.999), (DEEP, 0.99)], ids=["bisection", "allocation"])
def test_auto_keeps_the_result_without_refit_when_refit_does_not_hold_a_stronger_setting(
    sizes, min_cosine, reconstructions
):
    proto = builders.mlp(sizes=sizes, seed=2)
    plain, without = _run(proto, min_cosine, refit=False)
    assert not reconstructions and plain.passes[0].modified and _refit_note(plain) is None
    auto, result = _run(proto, min_cosine, refit=None)
    assert len(reconstructions) == 1  # the first setting above the one that holds without refit, re-fitted: missed
    assert auto.ok and [c.what for c in auto.passes[0].changes] == [c.what for c in plain.passes[0].changes]
    weights, expected = _initializers(result), _initializers(without)
    assert weights.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    note = _refit_note(auto)
    assert note.startswith("refit did not hold a stronger setting than ") and "re-fitted misses: " in note
    # forced on: the same search, and the setting that holds without refit is handed on re-fitted
    on, _ = _run(proto, min_cosine, refit=True)
    assert on.ok and on.after.macs == auto.after.macs
    assert any("re-fitted to the original outputs" in c.what for c in on.passes[0].changes)
    assert _refit_note(on).startswith(note) and _refit_note(on).endswith(" re-fitted holds")


def test_auto_uses_refit_when_it_holds_a_stronger_setting(reconstructions):
    proto = builders.mlp(sizes=FEW, seed=2)
    plain, _ = _run(proto, 0.99, refit=False)
    auto, _ = _run(proto, 0.99, refit=None)
    assert auto.ok and auto.validation.outputs["y"].cosine >= 0.99
    assert auto.after.macs < plain.after.macs  # refit let prune go further within the budget
    assert 1 <= len(reconstructions) <= 3  # the refit phase's checks only, and the result is not built again
    assert _refit_note(auto).startswith("held ratio ")
    assert ", stronger than ratio " in _refit_note(auto)
    assert any("re-fitted to the original outputs" in c.what for c in auto.passes[0].changes)


def test_a_fixed_setting_is_re_fitted_only_when_refit_is_on(reconstructions):
    proto = builders.mlp(sizes=FEW, seed=2)
    for refit, fits in ((None, 0), (False, 0), (True, 1)):
        report, _ = _run(proto, refit=refit, ratio=0.25)
        assert report.passes[0].modified and len(reconstructions) == fits
        reconstructions.clear()


def test_refit_accepts_on_off_and_unset_only():
    with pytest.raises(ValueError, match="refit must be true, false or unset"):
        PruneConfig(refit="yes")


def test_the_cli_forces_refit_on_or_off_and_leaves_it_auto_without_a_flag(capsys):
    from onnxopt import cli, recipe

    parser = cli.build_parser()

    def options(*flags):
        args = parser.parse_args(["run", "m.onnx", "--passes", "prune", "-o", "out.onnx", *flags])
        return cli._pass_options(args, ["prune"]).get("prune", {})

    assert options() == {} and PruneConfig().refit is None  # the pass's default: auto
    assert options("--prune-refit") == {"refit": True}
    assert options("--no-prune-refit") == {"refit": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    assert "(default: auto)" in " ".join(capsys.readouterr().out.split())
    # the recipe that repeats a run leaves auto out (TOML has no null): re-read, the option is the default again
    args = parser.parse_args(["run", "m.onnx", "--passes", "prune", "-o", "out.onnx"])
    written = recipe.effective(args, [ChannelPrunePass()], None)["options"]["prune"]
    assert "refit" not in written and written["steps"] == 7
    assert recipe.effective(args, [ChannelPrunePass(PruneConfig(refit=True))], None)["options"]["prune"]["refit"]


def test_refit_is_not_tried_when_the_search_ends_at_its_result(reconstructions):
    proto = builders.mlp(sizes=FEW, seed=2, bias_shift=-2.0)  # dead neurons: ratio 0 removes them
    report, _ = _run(proto, refit=None, max_ratio=0.0)
    assert report.ok and report.passes[0].modified and not reconstructions
    assert _refit_note(report).startswith("refit not tried: the search ends at ratio 0")
    assert not any("re-fitted" in c.what for c in report.passes[0].changes)


@pytest.mark.parametrize("refit", [None, True])
def test_candidates_built_ahead_for_an_executor_give_the_same_search(refit, monkeypatch):
    """With an executor that scores 3 candidates at once the search builds them ahead (speculate) and takes the
    same path: the same settings, the same model (refit phase included)."""
    from onnxopt.executor import LocalExecutor
    from onnxopt.passes import _prune_search

    class Wide:  # the local executor, asked for 3 candidates at once (as Ray with 3 task slots to spare)
        def __init__(self):
            self.local = LocalExecutor()

        def candidates_at_once(self, source):
            return 3

        def __getattr__(self, name):
            return getattr(self.local, name)

    built = []
    original = _prune_search.speculate
    monkeypatch.setattr(_prune_search, "speculate", lambda *a: built.append(a[0].parallel) or original(*a))
    proto = builders.mlp(sizes=FEW, seed=2)
    one, alone = _run(proto, refit=refit)
    built.clear()
    model = ir.from_proto(proto)
    wide = PassManager(
        [ChannelPrunePass(PruneConfig(align=1, latency_guard=False, refit=refit))], data=_feeds(),
        eval_data=_feeds(seed=2), budget=Budget(min_cosine=0.99), simplify=False, executor=Wide(),
    ).run(model)  # fmt: skip
    assert set(built) == {3} and wide.ok
    assert [c.what for c in wide.passes[0].changes] == [c.what for c in one.passes[0].changes]
    weights, expected = _initializers(ir.to_proto(model)), _initializers(alone)
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
