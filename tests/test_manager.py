"""PassManager: order, statistics lifecycle, cleanup, failure naming, report schema; registry."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import registry, stats
from onnxopt.errors import CalibrationError, UnknownPassError
from onnxopt.manager import PassManager
from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig
from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
from onnxopt.validate import Budget
from tests import builders


class _NeedsStats(OptPass):
    """Records the statistics it was given; changes nothing."""

    name = "needs_stats"
    seen: list

    def __init__(self, config=None):
        super().__init__(config)
        self.seen = []

    def stats_request(self, model):
        return stats.StatsRequest(values=frozenset({"h1"}))

    def call(self, model):
        self.seen.append(stats.get_stats(model))
        return OptResult(model, modified=False)


@dataclasses.dataclass(frozen=True)
class _ScaleConfig(PassConfig):
    factor: float = 1.0


class _ScaleOutput(OptPass):
    """Multiplies the last weight (lossy unless factor is 1) and leaves a dangling node for cleanup."""

    name = "scale"
    exact = False
    config_class = _ScaleConfig

    def call(self, model):
        w = model.graph.initializers["w2"]
        w.const_value = ir.tensor(w.const_value.numpy() * self.config.factor, name="w2")
        dangling = ir.node("Relu", [model.graph.inputs[0]], name="dangling")
        model.graph.append(dangling)
        return OptResult(model, modified=True, changes=[Change("w2", f"scaled by {self.config.factor}")])


class _Boom(OptPass):
    name = "boom"

    def call(self, model):
        raise RuntimeError("kaput")


@pytest.fixture()
def mlp_file(tmp_path):
    return builders.save(builders.mlp(sizes=(8, 16, 4)), tmp_path / "mlp.onnx")


def _data(n=32):
    return {"x": np.random.default_rng(3).standard_normal((n, 8)).astype(np.float32)}


def test_stats_collected_before_and_invalidated_after_a_modifying_pass(mlp_file):
    first, second = _NeedsStats(), _NeedsStats()
    report = PassManager([first, _ScaleOutput(), second], simplify=False, data=_data(), budget=None).run(mlp_file)
    table1, table2 = first.seen[0], second.seen[0]
    assert table1 is not None and table2 is not None and table1 is not table2  # re-collected after 'scale'
    assert table1.channels["h1"].samples == 32
    assert [r.name for r in report.passes] == ["needs_stats", "scale", "needs_stats"]
    assert report.passes[1].modified and report.passes[1].changes[0].site == "w2"
    assert report.passes[0].stats_seconds > 0 and report.passes[2].stats_seconds > 0
    assert all(node.name != "dangling" for node in report.model.graph)  # cleanup removed the unused node


def test_stats_reused_while_the_model_is_unchanged(mlp_file):
    first, second = _NeedsStats(), _NeedsStats()
    PassManager([first, second], simplify=False, data=_data()).run(mlp_file)
    assert first.seen[0] is second.seen[0]


def test_pass_needing_stats_without_data_is_a_clear_error(mlp_file):
    with pytest.raises(CalibrationError, match="'needs_stats' needs calibration data"):
        PassManager([_NeedsStats()], simplify=False).run(mlp_file)


def test_failing_pass_is_named_with_the_passes_before(mlp_file):
    with pytest.raises(ir.passes.PassError, match=r"pass 'boom' failed after \['scale'\]: kaput"):
        PassManager([_ScaleOutput(), _Boom()], simplify=False, data=_data()).run(mlp_file)


def test_validation_budget_and_report_schema(mlp_file):
    exact = PassManager([_ScaleOutput(_ScaleConfig(1.0))], simplify=False, data=_data()).run(mlp_file)
    assert exact.ok and exact.validation.outputs["y"].max_abs == 0
    lossy = PassManager(
        [_ScaleOutput(_ScaleConfig(1.5))], simplify=False, data=_data(), budget=Budget(max_abs=1e-3)
    ).run(mlp_file)
    assert not lossy.ok and "max abs" in lossy.validation.failures[0]
    payload = lossy.to_json()
    assert set(payload["model"]) == {"before", "after", "input_shapes_from"}
    assert {"params", "macs", "bytes"} <= set(payload["model"]["before"])
    assert {"name", "changed", "skipped", "seconds"} <= set(payload["passes"][0])
    assert {"ok", "outputs", "accuracy"} <= set(payload["validation"])
    assert {"max_abs", "cosine", "rel_l2", "top1_agreement"} <= set(payload["validation"]["outputs"]["y"])


def test_in_memory_model_is_compared_with_its_state_before_the_passes():
    model = ir.from_proto(builders.mlp(sizes=(8, 16, 4)))
    report = PassManager([_ScaleOutput(_ScaleConfig(2.0))], simplify=False, data=_data(), budget=None).run(model)
    assert report.model is model
    assert report.validation.outputs["y"].max_abs > 0.1


def test_simplify_wraps_a_pipeline_by_default(mlp_file):
    report = PassManager([_ScaleOutput()], data=_data()).run(mlp_file)
    assert [r.name for r in report.passes] == ["simplify", "scale", "simplify"]
    assert report.ok  # factor 1: exact, so the default budget is exact too

    class _Final(_ScaleOutput):
        simplify_after = False

    assert [p.name for p in PassManager([_Final()]).passes] == ["simplify", "scale"]
    assert [p.name for p in PassManager(["simplify"]).passes] == ["simplify"]
    assert PassManager([]).passes == []


def test_registry_lists_and_imports_every_pass():
    for name in registry.available():
        cls = registry.get_pass(name)
        assert issubclass(cls, OptPass) and cls.name == name and cls.summary()
    assert importlib.import_module("onnxopt.passes.simplify").SimplifyPass is registry.get_pass("simplify")
    with pytest.raises(UnknownPassError, match="unknown pass 'nope'; choose from .*simplify"):
        registry.get_pass("nope")


def test_entry_point_passes_are_found(monkeypatch):
    class _EP:
        name, value = "third", "tests.test_manager:_Boom"

    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [_EP()])
    assert registry.available()["third"] == "tests.test_manager:_Boom"
    assert registry.get_pass("third") is _Boom


# --- search cost: early-stopped budget checks ---------------------------------------------------------------------
def _labelled(model_file, n, seed):
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    y = builders.run(builders.onnx.load(model_file), {"x": x})["y"].argmax(axis=1)  # the original is 100% right
    return {"x": x, "labels": y}


@pytest.mark.parametrize(
    "budget",
    [Budget(max_accuracy_drop=2.0), Budget(max_accuracy_drop=6.0, confidence=0.95), Budget(min_cosine=0.98)],
    ids=["top1", "top1-confidence", "cosine"],
)
def test_search_chooses_the_same_with_and_without_early_stop(tmp_path, monkeypatch, budget):
    model_file = builders.save(builders.mlp(sizes=(8, 48, 48, 6), seed=2), tmp_path / "m.onnx")
    calib, held_out = _labelled(model_file, 128, 0), _labelled(model_file, 160, 1)
    runs, verdicts = {}, {"off": [], "on": []}
    for mode in ("off", "on"):
        monkeypatch.setenv("ONNXOPT_EARLY_STOP", mode)
        trials = verdicts[mode]
        runs[mode] = PassManager(  # align 8: 48-neuron layers have enough settings for the search to go both ways
            [ChannelPrunePass(PruneConfig(align=8))], data=calib, eval_data=held_out, budget=budget, batch_size=16,
            progress=lambda e, trials=trials: trials.append(e.ok) if e.kind == "trial" else None,
        ).run(model_file)  # fmt: skip
    off, on = runs["off"], runs["on"]
    assert verdicts["on"] == verdicts["off"] and True in verdicts["on"] and False in verdicts["on"]  # one path
    prune_off, prune_on = (next(p for p in r.passes if p.name == "prune") for r in (off, on))
    assert prune_on.changes == prune_off.changes  # the same setting chosen
    assert ir.to_proto(on.model).SerializeToString() == ir.to_proto(off.model).SerializeToString()
    assert on.validation.to_json() == off.validation.to_json()  # the final validation never stops early
    search_off, search_on = prune_off.details["search"], prune_on.details["search"]
    assert search_off["candidates"] == search_on["candidates"] > 5
    assert search_off["stopped_early"] == 0 and search_off["repeated"] == search_on["repeated"]
    assert search_off["samples_scored"] + 160 * search_off["repeated"] == search_off["samples_if_full"]
    assert search_on["stopped_early"] == search_on["stopped_exact"] > 0 and search_on["stopped_statistical"] == 0
    assert search_on["samples_scored"] < search_on["samples_if_full"] == 160 * search_on["candidates"]
    assert on.to_json()["passes"][1]["details"]["search"] == search_on  # in the --report JSON


def test_early_stop_summary_in_the_verbose_log(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("ONNXOPT_EARLY_STOP", raising=False)  # on by default
    model_file = builders.save(builders.mlp(sizes=(8, 48, 48, 6), seed=2), tmp_path / "m.onnx")
    calib, held_out = _labelled(model_file, 128, 0), _labelled(model_file, 160, 1)
    with caplog.at_level("INFO", logger="onnxopt.manager"):
        PassManager(["prune"], data=calib, eval_data=held_out, budget=Budget(max_accuracy_drop=2.0)).run(model_file)
    lines = [r.getMessage() for r in caplog.records if "budget checks" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("pass prune: ") and "stopped early (" in lines[0]


@dataclasses.dataclass(frozen=True)
class _SearchConfig(PassConfig):
    checked: float = 1.0  # the factor of the one candidate the "search" checks
    factor: float = 1.0  # the factor of the model the pass returns


def _scaled(model, factor):
    w = model.graph.initializers["w2"]
    w.const_value = ir.tensor(w.const_value.numpy() * factor, name="w2")  # a new tensor: clones keep the old one
    return model


class _SearchThenScale(OptPass):
    """A lossy pass that checks one candidate (w2 scaled by ``checked``) and returns w2 scaled by ``factor``."""

    name = "search_scale"
    exact = False
    config_class = _SearchConfig

    def call(self, model):
        self.verdicts = [self.context.check(_scaled(model.clone(), self.config.checked)).ok]
        _scaled(model, self.config.factor)
        return OptResult(model, modified=True, changes=[Change("w2", f"scaled by {self.config.factor}")])


def _counting_validations(monkeypatch):
    from onnxopt import manager

    calls = []
    real = manager.validate

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "validate", counted)
    return calls


def test_a_searching_pass_whose_result_misses_the_budget_is_reverted_and_reported(mlp_file, monkeypatch):
    from onnxopt import html_report, progress

    first, lossy, last = _NeedsStats(), _SearchThenScale(_SearchConfig(checked=1.0, factor=1.5)), _NeedsStats()
    calls = _counting_validations(monkeypatch)
    report = PassManager([first, lossy, last], simplify=False, data=_data(), budget=Budget(max_abs=1e-3)).run(mlp_file)
    assert lossy.verdicts == [True]  # its search checked a candidate that holds, then returned another one
    # the search's check of a candidate with the input's weights (scaled by 1.0) and the guard's check of the
    # result; the final validation of the restored input is the search's check (the same fingerprint)
    assert len(calls) == 2
    record = report.passes[1]
    assert not record.modified and record.changes == []
    assert record.reverted.startswith("result outside the budget: ") and "max abs" in record.reverted
    assert record.skipped[0].site == "model" and record.skipped[0].reason == f"reverted: {record.reverted}"
    assert record.details["reverted_changes"] == [{"site": "w2", "what": "scaled by 1.5"}]
    # the input came back: the run holds the budget exactly, and the statistics of the input still apply
    assert report.ok and report.validation.outputs["y"].max_abs == 0
    assert first.seen[0] is last.seen[0]
    assert report.stages[2].source == "unchanged"
    payload = report.to_json()["passes"][1]
    assert payload["modified"] is False and payload["reverted"] == record.reverted
    assert "reverted" not in report.to_json()["passes"][0]
    assert progress.pass_lines(record)[:2] == [
        f"pass search_scale: reverted (result outside the budget), 0 sites rewritten, 1 skipped, "
        f"{record.seconds:.2f} s",
        f"  skipped model: reverted: {record.reverted}",
    ]
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    page = html_report.render(report)
    assert 'class="badge fail"' in page and "Reverted: result outside the budget" in page


def test_a_result_the_search_already_checked_is_not_checked_again(mlp_file, monkeypatch):
    budget = Budget(max_abs=1e-2)
    calls = _counting_validations(monkeypatch)
    same = _SearchThenScale(_SearchConfig(checked=1.001, factor=1.001))
    report = PassManager([same], simplify=False, data=_data(), budget=budget).run(mlp_file)
    assert report.ok and report.passes[0].modified and report.passes[0].reverted is None
    assert len(calls) == 1  # the search's check, of the very result: the guard and the final validation reuse it
    calls.clear()
    other = _SearchThenScale(_SearchConfig(checked=1.001, factor=1.002))  # holds too, but was never checked
    report = PassManager([other], simplify=False, data=_data(), budget=budget).run(mlp_file)
    assert report.ok and report.passes[0].modified and report.passes[0].reverted is None
    assert len(calls) == 2 and calls[1] is report.model  # the guard checked the result itself, the validation reuses it


def test_the_final_validation_of_a_checked_result_is_its_check_with_the_same_figures(mlp_file, monkeypatch):
    """The result is the candidate the search checked: the final validation takes that check's report (every sample
    scored) instead of running the model again. Its figures are those of a fresh validation; onnx's full checker,
    which budget checks skip, still runs and still fails the run."""
    import onnx

    from onnxopt import data as data_mod
    from onnxopt import manager

    budget = Budget(max_abs=1e-2)
    data = _data()
    events = []
    report = PassManager(
        [_SearchThenScale(_SearchConfig(checked=1.001, factor=1.001))], simplify=False, data=data, budget=budget,
        progress=events.append,
    ).run(mlp_file)  # fmt: skip
    fresh = manager.validate(mlp_file, report.model, data_mod.as_source(data, report.model), budget)
    got, want = report.validation.to_json(), fresh.to_json()
    assert got.keys() == want.keys() and got["ok"] and got["samples"] == want["samples"] == 32
    for name, diff in want["outputs"].items():
        for field, value in diff.items():
            assert got["outputs"][name][field] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, field)
    assert [(e.stage, e.done, e.total) for e in events if e.kind == "samples"][-1] == ("validating", 32, 32)

    check_model = onnx.checker.check_model

    def broken(model, full_check=False, **kwargs):  # the validation's full check fails; loading's plain one passes
        if full_check:
            raise onnx.checker.ValidationError("made up for the test")
        return check_model(model, full_check=full_check, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    calls = _counting_validations(monkeypatch)
    report = PassManager(
        [_SearchThenScale(_SearchConfig(checked=1.001, factor=1.001))], simplify=False, data=data, budget=budget
    ).run(mlp_file)
    assert len(calls) == 1 and not report.ok  # the search's check only; the reused report carries the checker's
    assert report.validation.checker_error == "made up for the test"
    assert report.validation.failures == ["checker: made up for the test"]


def test_a_fixed_setting_is_not_second_guessed(mlp_file, monkeypatch):
    """A lossy pass that checked nothing (a setting the user fixed) is judged by the final validation only."""
    calls = _counting_validations(monkeypatch)
    report = PassManager(
        [_ScaleOutput(_ScaleConfig(1.5))], simplify=False, data=_data(), budget=Budget(max_abs=1e-3)
    ).run(mlp_file)
    assert len(calls) == 1 and not report.ok and report.passes[0].modified and report.passes[0].reverted is None


def test_fingerprint_sees_weights_attributes_and_wiring_but_not_shape_annotations():
    from onnx_ir.passes.common import ShapeInferencePass

    from onnxopt.fingerprint import fingerprint

    model = ir.from_proto(builders.conv_net(channels=(3, 8, 8), seed=1))
    key = fingerprint(model)
    clone = model.clone()
    for value in clone.graph.inputs:
        value.shape = None
    ShapeInferencePass(strict_mode=False)(clone)
    assert fingerprint(clone) == key  # same computation, other shape annotations
    assert fingerprint(_scaled_first_weight(model.clone(), 1.0 + 1e-7)) != key  # one weight, one ulp or so
    changed = model.clone()
    conv = next(node for node in changed.graph if node.op_type == "Conv")
    conv.attributes["dilations"] = ir.AttrInt64s("dilations", [2, 2])
    assert fingerprint(changed) != key
    rewired = model.clone()
    relu = next(node for node in rewired.graph if node.op_type == "Relu")
    relu.replace_input_with(0, rewired.graph.inputs[0])
    assert fingerprint(rewired) != key


def _scaled_first_weight(model, factor):
    value = next(iter(model.graph.initializers.values()))
    value.const_value = ir.tensor(value.const_value.numpy() * np.float32(factor), name=value.name)
    return model


def test_checker_does_not_score_the_same_candidate_twice(tmp_path, monkeypatch):
    from onnxopt import data as data_mod
    from onnxopt import graph as graph_io

    monkeypatch.setenv("ONNXOPT_EARLY_STOP", "off")
    model_file = builders.save(builders.mlp(sizes=(8, 16, 4)), tmp_path / "m.onnx")
    model = graph_io.load(model_file)
    source = data_mod.as_source(_data(48), model, batch_size=16)
    passed = []
    check = PassManager._checker(model_file, source, Budget(min_cosine=0.99), passed)
    first = check(model.clone())
    again = check(model.clone())  # another object, the same computation
    changed = model.clone()
    w = changed.graph.initializers["w2"]
    w.const_value = ir.tensor(w.const_value.numpy() * 0.5, name="w2")
    other = check(changed)
    assert first.ok and again is first and not other.ok and other.samples == 48
    assert passed == [first, first]  # a repeat that passes still counts as a passing check of its pass
    tally = check.cost.take()
    assert tally["candidates"] == 3 and tally["repeated"] == 1
    assert tally["samples_scored"] == 96 and tally["samples_if_full"] == 144


class _BudgetSpy(OptPass):
    """Lossy; records the budget its context gives, and its check's report on w2 scaled by 1.1."""

    name = "spy"
    exact = False

    def __init__(self, config=None):
        super().__init__(config)
        self.budgets, self.reports = [], []

    def call(self, model):
        self.budgets.append(self.context.budget)
        self.reports.append(self.context.check(_scaled(model.clone(), 1.1)))
        return OptResult(model, modified=False)


class _Recovers(_BudgetSpy):
    name = "recovers"
    spends_budget = False  # as distill: brings the model closer to the original


def test_budget_shares():
    budget = Budget(max_accuracy_drop=1.0, min_cosine=0.99, metric_limit=40.0, confidence=0.95, max_abs=0.2)
    half = budget.share(0.5)
    assert half.max_accuracy_drop == 0.5 and half.max_abs == 0.1
    assert half.min_cosine == pytest.approx(0.995)
    assert half.metric_limit == 40.0 and half.confidence == 0.95  # a bar and a confidence are not amounts
    assert budget.share(1.0) == budget
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        budget.share(0)


def test_lossy_passes_split_the_budget_k_of_n(mlp_file):
    # three passes spend budget, one recovers: the spenders get 1/3, 2/3 and all of it, the recovering pass all
    a, b, r, c = _BudgetSpy(), _BudgetSpy(), _Recovers(), _BudgetSpy()
    report = PassManager([a, b, r, c], simplify=False, data=_data(), budget=Budget(min_cosine=0.99)).run(mlp_file)
    assert [s.budgets[0].min_cosine for s in (a, b, r, c)] == pytest.approx([1 - 0.01 / 3, 1 - 0.02 / 3, 0.99, 0.99])
    assert [rec.details.get("budget_share") for rec in report.passes] == [0.3333, 0.6667, None, None]


def test_a_shared_budget_check_refuses_what_the_whole_budget_allows(mlp_file):
    probe = _BudgetSpy()
    PassManager([probe], simplify=False, data=_data(), budget=Budget(min_cosine=0.5)).run(mlp_file)
    loss = 1 - probe.reports[0].outputs["y"].cosine  # what w2 x 1.1 costs
    assert loss > 0
    first, last = _BudgetSpy(), _BudgetSpy()
    budget = Budget(min_cosine=1 - 1.5 * loss)
    PassManager([first, last], simplify=False, data=_data(), budget=budget).run(mlp_file)
    assert not first.reports[0].ok and last.reports[0].ok  # 0.75x the loss allowed in the first, 1.5x in the last


def test_budget_split_off_gives_every_pass_the_whole_budget(mlp_file):
    a, b = _BudgetSpy(), _BudgetSpy()
    budget = Budget(max_abs=0.5)
    PassManager([a, b], simplify=False, data=_data(), budget=budget, budget_split=False).run(mlp_file)
    assert a.budgets[0] == b.budgets[0] == budget
