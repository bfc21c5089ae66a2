"""Executors: merged reducer states equal one pass; statistics on Ray equal the single-process run, also after a
worker dies. The Ray tests (slow: a head takes ~15 s to start) start a local head on loopback and skip where the
``ray`` extra is not installed."""

from __future__ import annotations

import os
import socket
import sys

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import data, stats, validate
from onnxopt.errors import CalibrationError
from onnxopt.executor import ExecutorError, Job, LocalExecutor, RayExecutor, make_executor
from tests import builders

REQUEST = stats.StatsRequest(values=frozenset({"c1", "r1", "c2", "gap", "y"}), grams=frozenset({"conv2", "fc"}))


def _model_and_source(samples=30, batch_size=4, seed=3):
    model = ir.from_proto(builders.conv_net(seed=seed, with_bn=False))
    x = np.random.default_rng(seed).standard_normal((samples, 3, 10, 10)).astype(np.float32)
    return model, data.as_source({"x": x}, model, batch_size=batch_size)


def _assert_tables_equal(got: stats.StatsTable, want: stats.StatsTable, rtol=1e-6):
    assert got.samples == want.samples
    assert got.channels.keys() == want.channels.keys() and got.grams.keys() == want.grams.keys()
    for name, w in want.channels.items():
        g = got.channels[name]
        assert (g.samples, g.count) == (w.samples, w.count), name
        for field in ("zero_frac", "pos_frac", "mean", "abs_mean", "sq_mean", "min", "max"):
            expected = getattr(w, field)
            np.testing.assert_allclose(
                getattr(g, field), expected, rtol=rtol, atol=rtol * float(np.abs(expected).max()), err_msg=name
            )
        np.testing.assert_array_equal(g.min, w.min)  # extremes combine exactly
        np.testing.assert_array_equal(g.max, w.max)
    for name, w in want.grams.items():
        g = got.grams[name]
        assert g.rows == w.rows, name
        np.testing.assert_allclose(g.xtx, w.xtx, rtol=rtol, atol=rtol * float(np.abs(w.xtx).max()), err_msg=name)
        np.testing.assert_allclose(g.sum, w.sum, rtol=rtol, atol=rtol * float(np.abs(w.sum).max()), err_msg=name)


def test_channel_reducer_merge_of_two_halves_equals_one_pass():
    rng = np.random.default_rng(0)
    batches = [np.maximum(rng.standard_normal((3, 5, 4, 4)), 0) for _ in range(6)]
    whole, first, second = (stats.ChannelReducer("v") for _ in range(3))
    for b in batches:
        whole.update(b)
    for b in batches[:2]:
        first.update(b)
    for b in batches[2:]:
        second.update(b)
    first.merge(second)
    merged, expected = first.result(), whole.result()
    assert (merged.samples, merged.count) == (expected.samples, expected.count) == (18, 18 * 16)
    for field in ("zero_frac", "pos_frac", "mean", "abs_mean", "sq_mean", "min", "max"):
        np.testing.assert_allclose(getattr(merged, field), getattr(expected, field), rtol=1e-6)
    assert merged.zero_frac.min() > 0  # the ReLU'd data has zeros: APoZ counts merged, not just sums


def test_gram_reducer_merge_of_two_halves_equals_one_pass_and_empty_part_is_neutral():
    model = ir.from_proto(builders.conv_net(seed=1, with_bn=False))
    node = next(n for n in model.graph if n.name == "conv2")
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((2, 8, 10, 10)) for _ in range(4)]
    whole, first, second, empty = (stats.GramReducer(node) for _ in range(4))
    for b in batches:
        whole.update(b)
    for b in batches[:3]:
        first.update(b)
    second.update(batches[3])
    empty.merge(first)  # an empty reducer takes the other's state
    empty.merge(second)
    merged, expected = empty.result(), whole.result()
    assert merged.rows == expected.rows == 4 * 2 * 4 * 4
    np.testing.assert_allclose(merged.xtx, expected.xtx, rtol=1e-6)
    np.testing.assert_allclose(merged.sum, expected.sum, rtol=1e-6)


def test_channel_reducer_merge_refuses_different_channel_counts():
    a, b = stats.ChannelReducer("v"), stats.ChannelReducer("v")
    a.update(np.ones((2, 3)))
    b.update(np.ones((2, 4)))
    with pytest.raises(CalibrationError, match="'v': 4 channels in one part, 3 in another"):
        a.merge(b)


def test_local_executor_statistics_equal_the_default_loop():
    model, source = _model_and_source()
    want = stats.collect_stats(model, source, REQUEST)
    seen = []
    got = stats.collect_stats(model, source, REQUEST, executor=LocalExecutor(), progress=lambda d, t: seen.append(d))
    _assert_tables_equal(got, want, rtol=0)  # one shard, the same order: identical
    assert seen[-1] == 30


def test_candidates_at_once_fill_the_task_slots_a_set_of_batches_leaves_free():
    model, source = _model_and_source(samples=30, batch_size=4)  # 8 batches
    assert source.batch_sizes == [4] * 7 + [2]
    assert LocalExecutor().candidates_at_once(source) == 1
    assert RayExecutor(num_workers=2).candidates_at_once(source) == 1  # one candidate's shards fill 2 slots
    assert RayExecutor(num_workers=32).candidates_at_once(source) == 4
    assert RayExecutor(num_workers=128).candidates_at_once(source) == 7  # at most a bisection tree of depth 3
    assert RayExecutor(num_workers=2, max_candidates=3).candidates_at_once(source) == 3  # as asked


def test_make_executor_parses_names_and_refuses_unknown_ones():
    assert make_executor(None) is None and make_executor("local") is None
    ray_default = make_executor("ray")
    assert isinstance(ray_default, RayExecutor) and ray_default.address is None
    assert make_executor("ray:10.0.0.1:6379").address == "10.0.0.1:6379"
    with pytest.raises(Exception, match="'spark' is not 'local', 'ray' or 'ray:ADDRESS'"):
        make_executor("spark")


def test_ray_not_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ExecutorError, match=r"needs Ray: pip install 'onnxopt\[ray\]'"):
        RayExecutor().connect()


def test_unreachable_address_fails_fast_with_one_line():
    pytest.importorskip("ray")
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ExecutorError, match=rf"ray:127.0.0.1:{port}: unreachable"):
        RayExecutor(f"127.0.0.1:{port}").connect()


@pytest.fixture(scope="module")
def ray_head():
    ray = pytest.importorskip("ray")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": root}},  # workers import tests.test_executor's shard wrapper
    )
    yield ray
    ray.shutdown()


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_ray_statistics_equal_the_single_process_run(ray_head):
    model, source = _model_and_source()
    want = stats.collect_stats(model, source, REQUEST)
    seen = []
    executor = RayExecutor(batches_per_task=3)  # 8 batches (the last of 2 samples) in shards of 3, 3, 2
    got = stats.collect_stats(model, source, REQUEST, executor=executor, progress=lambda d, t: seen.append(d))
    _assert_tables_equal(got, want)
    assert seen == sorted(seen) and seen[-1] == 30


def _die_once_then(sessions, batches, args, *cached):
    """A shard function whose first call anywhere kills its worker process (as an OOM kill would)."""
    marker, fn, init_args = args
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return fn(sessions, batches, init_args, *cached)
    os._exit(1)


class _DyingOnce(RayExecutor):
    """A Ray executor whose first task's worker dies."""

    def __init__(self, marker: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.marker = marker

    def map_many(self, jobs, source, *, progress=None):
        import dataclasses

        dying = [dataclasses.replace(j, fn=_die_once_then, init_args=(self.marker, j.fn, j.init_args)) for j in jobs]
        return super().map_many(dying, source, progress=progress)


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_ray_task_of_a_dead_worker_is_retried_without_double_counting(ray_head, tmp_path):
    model, source = _model_and_source()
    want = stats.collect_stats(model, source, REQUEST)
    marker = tmp_path / "died"
    got = stats.collect_stats(
        model, source, REQUEST, executor=_DyingOnce(str(marker), batches_per_task=2, max_retries=2)
    )
    assert marker.exists()  # a worker did die
    _assert_tables_equal(got, want)


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_ray_calibration_error_in_a_task_is_raised_as_itself(ray_head):
    model = ir.from_proto(builders.mlp(sizes=(8, 16, 4)))
    source = data.as_source({"x": np.ones((7, 8), np.float32)}, model, batch_size=2)
    # channels on the batch axis: the last batch (1 sample) has fewer "channels" than the first, inside one task
    request = stats.StatsRequest(values=frozenset({"h1"}), axes=frozenset({("h1", 0)}))
    with pytest.raises(CalibrationError, match="value 'h1': 1 channels in one batch, 2 before"):
        stats.collect_stats(model, source, request, executor=RayExecutor(batches_per_task=4))


def _cli(capsys, *argv):
    from onnxopt import cli

    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def workdir(tmp_path):
    model = builders.save(builders.conv_net(seed=0), tmp_path / "net.onnx")
    x = np.random.default_rng(0).standard_normal((40, 3, 10, 10)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return tmp_path, model


def test_cli_unknown_executor_is_exit_2(workdir, capsys):
    d, model = workdir
    code, _, err = _cli(capsys, "run", model, "--passes", "prune", "--data", d / "calib.npz", "-o", d / "o.onnx",
                        "--executor", "spark")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "'spark' is not 'local', 'ray' or 'ray:ADDRESS'" in err
    assert not (d / "o.onnx").exists()


def test_cli_unreachable_ray_address_is_one_line_exit_2_and_writes_nothing(workdir, capsys):
    pytest.importorskip("ray")
    d, model = workdir
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = _cli(capsys, "run", model, "--passes", "prune", "--data", d / "calib.npz", "-o", d / "o.onnx",
                        "--allow-small-eval", "--executor", f"ray:127.0.0.1:{port}")  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert f"ray:127.0.0.1:{port}: unreachable" in err
    assert not (d / "o.onnx").exists()


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_cli_prune_on_ray_writes_the_same_model_as_local(ray_head, workdir, capsys):
    import onnx

    d, model = workdir
    common = ["run", model, "--passes", "prune", "--prune-ratio", "0.25", "--prune-align", "1", "--min-cosine", "0.5",
              "--data", d / "calib.npz", "--allow-small-eval", "-q"]  # fmt: skip
    assert _cli(capsys, *common, "-o", d / "local.onnx")[0] == 0
    assert _cli(capsys, *common, "-o", d / "ray.onnx", "--executor", "ray")[0] == 0
    local, ray = onnx.load(d / "local.onnx"), onnx.load(d / "ray.onnx")
    shapes = {t.name: list(t.dims) for t in local.graph.initializer}
    assert shapes == {t.name: list(t.dims) for t in ray.graph.initializer}  # the same channels kept
    assert shapes["w1"][0] == 6 and shapes["w2"][1] == 6  # conv1 lost 2 of its 8 channels, chosen by statistics
    for a, b in zip(local.graph.initializer, ray.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


# --- validation sharded: the folds of consecutive shards merge into the report of one pass ---------------------


class _InProcessShards:
    """A sharded executor without Ray: each job's shard function runs here on shards of ``size`` batches, with
    fresh sessions and copied arguments, as Ray tasks would (the merging logic without a Ray head)."""

    name = "shards"

    def __init__(self, size: int) -> None:
        self.size, self.jobs_run = size, 0

    def map_batches(self, model, source, fn, init_args, *, optimize=False, progress=None):
        return self.map_many([Job(model, fn, init_args, optimize)], source, progress=progress)[0]

    def map_many(self, jobs, source, *, progress=None):
        import copy

        batches = list(source)
        results = []
        for job in jobs:
            self.jobs_run += 1
            opened = job.open()
            states = []
            for start in range(0, len(batches), self.size):
                shard = batches[start : start + self.size]
                args = copy.deepcopy(job.init_args)
                if job.cache is None:
                    states.append(job.fn(opened, iter(shard), args))
                    continue
                key = (start, start + len(shard))
                state, keep = job.fn(opened, iter(shard), args, job.cache.values.get(key))
                if keep is not None:
                    job.cache.offer(key, keep, sum(a.nbytes for out in keep for a in out.values()))
                states.append(state)
            results.append(states)
        return results


def _perturbed(model: ir.Model, scale: float, seed: int = 0) -> ir.Model:
    """A copy of ``model`` whose weights carry relative noise of ``scale``: a lossy candidate."""
    rng = np.random.default_rng(seed)
    candidate = model.clone()
    for value in candidate.graph.initializers.values():
        array = value.const_value.numpy()
        noise = rng.standard_normal(array.shape).astype(array.dtype) * scale * float(np.abs(array).max() or 1)
        value.const_value = ir.tensor(array + noise, name=value.name)
    return candidate


def _labelled_source(model, samples=30, batch_size=4, seed=3, pairs=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 3, 10, 10)).astype(np.float32)
    labels = rng.random(samples // 2) if pairs else rng.integers(0, 5, samples)
    return data.as_source({"x": x, "labels": labels}, model, batch_size=batch_size, pair_labels=pairs)


def _user_metric(outputs, labels, inputs):
    """A user metric over the whole set: the mean of the top class's score, weighted by the first input pixel."""
    y = next(iter(outputs.values()))
    return float(np.mean(y.max(axis=1) * (1 + 0.1 * inputs["x"][:, 0, 0, 0])))


def _assert_reports_equal(got, want, rtol=1e-6):
    """Two validation reports agree: verdicts, failures and counts exactly, every figure within ``rtol``."""
    g, w = got.to_json(), want.to_json()
    assert (g["ok"], g["samples"], g["failures"]) == (w["ok"], w["samples"], w["failures"])
    assert g["outputs"].keys() == w["outputs"].keys()

    def close(a, b, where):
        if isinstance(b, dict):
            assert a.keys() == b.keys(), where
            for key in b:
                close(a[key], b[key], f"{where}.{key}")
        elif isinstance(b, list | tuple):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                close(x, y, f"{where}[{i}]")
        elif isinstance(b, float):
            assert a == pytest.approx(b, rel=rtol, abs=1e-12), where
        else:
            assert a == b, where

    close(g, w, "report")


METRICS = [None, "top1", "top5", "spearman", "psnr", _user_metric]


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: getattr(m, "__name__", str(m)))
def test_sharded_validation_report_equals_one_pass(metric):
    model = ir.from_proto(builders.conv_net(seed=2, with_bn=False))
    candidate = _perturbed(model, 0.05)
    pairs = metric == "spearman"
    source = _labelled_source(model, pairs=pairs)  # 8 batches, the last of 2 samples
    budget = validate.Budget(max_accuracy_drop=1.0, min_cosine=0.9) if metric in (None, "top1") else (
        validate.Budget(metric_limit=10.0) if metric == "psnr" else validate.Budget(min_cosine=0.99))  # fmt: skip
    want = validate.validate(model, candidate, source, budget, metric=metric)
    executor = _InProcessShards(size=3)
    got = validate.validate(model, candidate, source, budget, metric=metric, executor=executor)
    _assert_reports_equal(got, want, rtol=0)  # the same per-batch numbers, merged in batch order: identical
    assert executor.jobs_run == 1 and got.samples == 30
    if metric is None:  # an accuracy budget on labelled class scores is top1's, with its bootstrap interval
        assert got.metric.name == "top1" and got.metric.interval is not None and got.accuracy is not None
    assert got.outputs["y"].cosine < 1.0  # the noise shows: a real comparison, not a model against itself


def test_sharded_validation_keeps_the_originals_outputs_once_and_scores_candidates_together():
    model = ir.from_proto(builders.conv_net(seed=2, with_bn=False))
    source = _labelled_source(model)
    candidates = [_perturbed(model, s) for s in (0.003, 0.01, 0.2)]  # the same noise, scaled
    budget = validate.Budget(min_cosine=0.995)
    reference = validate.Reference(model)
    executor = _InProcessShards(size=3)
    got = validate.validate_many(reference, candidates, source, budget, executor=executor)
    assert len(reference.shards.values) == 3  # the original's outputs of each shard, kept
    kept = dict(reference.shards.values)
    again = validate.validate(reference, candidates[1], source, budget, executor=executor)
    assert reference.shards.values == kept  # read, not computed again
    for candidate, report in zip(candidates, got, strict=True):
        _assert_reports_equal(report, validate.validate(model, candidate, source, budget), rtol=0)
    _assert_reports_equal(again, got[1], rtol=0)
    assert [r.ok for r in got] == [True, True, False]


def test_sharded_validation_of_a_model_onnxruntime_cannot_load_is_a_failure_as_locally(tmp_path):
    model = ir.from_proto(builders.conv_net(seed=2, with_bn=False))
    broken = model.clone()
    next(n for n in broken.graph if n.name == "conv1").domain = "no.such.domain"
    source = _labelled_source(model)
    budget = validate.Budget(min_cosine=0.99)
    want = validate.validate(model, broken, source, budget, check=False)
    got = validate.validate(model, broken, source, budget, check=False, executor=_InProcessShards(size=3))
    import re

    def anywhere(failures):  # the temporary folder a session loads from differs
        return [re.sub(r"/\S+/model\.onnx", "model.onnx", f) for f in failures]

    assert not got.ok and anywhere(got.failures) == anywhere(want.failures) and len(got.failures) == 1
    assert got.failures[0].startswith("onnxruntime cannot load the optimized model: ")
    assert "no.such.domain" in got.failures[0]


# --- streaming: a folder of .npz feeds is read a batch at a time, by whoever folds it ------------------------------


def _npz_folder(tmp_path, model, files=24, seed=5, labels=True):
    rng = np.random.default_rng(seed)
    folder = tmp_path / "feeds"
    folder.mkdir()
    for index in range(files):
        arrays = {"x": rng.standard_normal((1, 3, 10, 10)).astype(np.float32)}
        if labels:
            arrays["labels"] = np.array([index % 5])
        np.savez(folder / f"{index:04d}.npz", **arrays)
    return folder


class _CountingLoader:
    """``data.load_npz`` that counts the files read and the arrays read and still alive (freed: not held)."""

    def __init__(self, monkeypatch) -> None:
        import weakref

        self.reads, self.alive, self.peak = 0, 0, 0
        real = data.load_npz

        def load(path, what):
            arrays = real(path, what)
            self.reads += 1
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(arrays["x"], self._freed)
            return arrays

        monkeypatch.setattr(data, "load_npz", load)

    def _freed(self) -> None:
        self.alive -= 1


def test_npz_folder_source_holds_a_bounded_number_of_batches(tmp_path, monkeypatch):
    model = ir.from_proto(builders.conv_net(seed=2, with_bn=False))
    folder = _npz_folder(tmp_path, model)
    loader = _CountingLoader(monkeypatch)
    source = data.as_source(folder, model)
    assert loader.reads == 0 and source.samples == 24  # only the files' zip directories were read up front
    table = stats.collect_stats(model, source, REQUEST)
    assert table.samples == 24 and loader.reads == 24 and loader.peak <= 2
    candidate = _perturbed(model, 0.01)
    report = validate.validate(model, candidate, source, validate.Budget(max_accuracy_drop=5.0))
    assert report.samples == 24 and report.accuracy is not None  # labels read from the files, batch by batch
    assert loader.reads == 48 and loader.peak <= 2 and loader.alive == 0


def test_npz_folder_shards_are_read_by_their_tasks(tmp_path, monkeypatch):
    """A sharded run hands each shard the files' paths: the driver reads none of them."""
    import pickle

    from onnxopt.executor import _shards

    model = ir.from_proto(builders.conv_net(seed=2, with_bn=False))
    source = data.as_source(_npz_folder(tmp_path, model), model)
    whole = np.concatenate([b.feeds["x"] for b in source])
    loader = _CountingLoader(monkeypatch)
    shards = list(_shards(source, 5, 0))
    assert [key for key, _, _ in shards] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]
    assert [samples for _, samples, _ in shards] == [5, 5, 5, 5, 4]
    shipped = [pickle.loads(pickle.dumps(shard)) for _, _, shard in shards]  # what a task receives: paths
    assert loader.reads == 0 and all(len(pickle.dumps(shard)) < 4000 for _, _, shard in shards)
    got = [batch.feeds["x"] for shard in shipped for batch in shard]
    assert loader.reads == 24  # by the shards, where they are iterated
    np.testing.assert_array_equal(np.concatenate(got), whole)


# --- validation, searches and streamed folders on Ray ---------------------------------------------------------------


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
@pytest.mark.parametrize("metric", [None, "spearman", _user_metric], ids=["accuracy", "spearman", "user"])
def test_ray_validation_report_equals_local(ray_head, metric):
    model = ir.from_proto(builders.conv_net(seed=2, with_bn=False))
    candidates = [_perturbed(model, 0.003), _perturbed(model, 0.2)]
    source = _labelled_source(model, pairs=metric == "spearman")
    budget = validate.Budget(min_cosine=0.999, max_accuracy_drop=1.0 if metric is None else None)
    want = [validate.validate(model, c, source, budget, metric=metric) for c in candidates]
    reference = validate.Reference(model)
    executor = RayExecutor(batches_per_task=3)  # 8 batches in shards of 3, 3, 2
    got = validate.validate_many(reference, candidates, source, budget, metric=metric, executor=executor)
    assert len(reference.shards.values) == 3  # the original's outputs, kept in the object store
    again = validate.validate(reference, candidates[1], source, budget, metric=metric, executor=executor)
    for g, w in zip([*got, again], [*want, want[1]], strict=True):
        _assert_reports_equal(g, w)
    assert [r.ok for r in got] == [True, False]


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_ray_validation_task_of_a_dead_worker_is_retried_without_losing_or_double_counting(ray_head, tmp_path):
    model = ir.from_proto(builders.conv_net(seed=2, with_bn=False))
    candidate = _perturbed(model, 0.01)
    source = _labelled_source(model)
    budget = validate.Budget(max_accuracy_drop=1.0, min_cosine=0.99)
    want = validate.validate(model, candidate, source, budget)
    marker = tmp_path / "died"
    seen = []
    executor = _DyingOnce(str(marker), batches_per_task=2, max_retries=2)
    got = validate.validate(model, candidate, source, budget, executor=executor, progress=lambda d, t: seen.append(d))
    assert marker.exists()  # a worker did die
    _assert_reports_equal(got, want)
    assert got.samples == 30 and seen[-1] == 30  # every sample once


def _prune_search(executor):
    from onnxopt import registry
    from onnxopt.manager import PassManager

    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    manager = PassManager([registry.make_pass("prune")], data={"x": x}, budget=validate.Budget(min_cosine=0.95),
                          holdout=0.5, executor=executor)  # fmt: skip
    return manager.run(ir.from_proto(builders.mlp(sizes=(16, 64, 48, 4), seed=1)))


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_ray_prune_search_chooses_the_same_ratios_as_local(ray_head):
    local = _prune_search(None)
    on_ray = _prune_search(RayExecutor(batches_per_task=1, max_candidates=3))  # bisection trees of 3 at once
    want = {r.name: r for r in local.passes}["prune"]
    got = {r.name: r for r in on_ray.passes}["prune"]
    # both layer groups pruned, at per-group ratios found by the search (phase 2): e.g. 64 -> 32 and 48 -> 16 (the
    # other changes say what refit did: the same on both sides too)
    channels = [c for c in want.changes if " channels " in c.what]
    assert [c.site for c in channels] == ["fc1", "fc2"] and all("ratio" in c.what for c in channels)
    assert [c.what for c in got.changes] == [c.what for c in want.changes]
    shapes = {n: v.shape for n, v in local.model.graph.initializers.items()}
    assert shapes == {n: v.shape for n, v in on_ray.model.graph.initializers.items()}
    _assert_reports_equal(on_ray.validation, local.validation)


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_ray_quant_search_chooses_the_same_recipe_as_local(ray_head, workdir, monkeypatch):
    from onnxopt.manager import PassManager

    # checks on Ray score every sample (no early stop there): the local run does too, so a failing recipe's reason
    # is the same text on both sides, not "(decided on n of N samples, exact)" on one of them only
    monkeypatch.setenv("ONNXOPT_EARLY_STOP", "off")
    from onnxopt.passes.quant import Int8QuantPass, QuantConfig

    d, _ = workdir
    config = QuantConfig(recipes="qdq-u8-pc,qdq-s8-pt,dyn-pc", rounds=3, force=True)

    def run(executor):
        manager = PassManager([Int8QuantPass(config)], data=d / "calib.npz", budget=validate.Budget(min_cosine=0.99),
                              holdout=0.5, executor=executor)  # fmt: skip
        return manager.run(ir.from_proto(builders.conv_net(seed=0)))

    local = run(None)  # the recipes' latencies are recorded: the Ray run reads the same figures
    on_ray = run(RayExecutor(batches_per_task=1, max_candidates=3))
    want = {r.name: r for r in local.passes}["quant"]
    got = {r.name: r for r in on_ray.passes}["quant"]
    assert [c.what for c in got.changes] == [c.what for c in want.changes]
    assert [s.reason for s in got.skipped] == [s.reason for s in want.skipped]
    timeless = lambda details: {k: v for k, v in details.items() if k != "search"}  # noqa: E731 (the checks' seconds)
    assert timeless(got.details) == timeless(want.details)
    _assert_reports_equal(on_ray.validation, local.validation)


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_ray_reads_a_folder_of_npz_feeds_in_its_tasks(ray_head, tmp_path, monkeypatch):
    model = ir.from_proto(builders.conv_net(seed=2, with_bn=False))
    source = data.as_source(_npz_folder(tmp_path, model), model)
    candidate = _perturbed(model, 0.01)
    budget = validate.Budget(max_accuracy_drop=5.0, min_cosine=0.99)
    want_stats = stats.collect_stats(model, source, REQUEST)
    want = validate.validate(model, candidate, source, budget)
    loader = _CountingLoader(monkeypatch)  # in this process only: the workers read with the real loader
    executor = RayExecutor(batches_per_task=5)
    _assert_tables_equal(stats.collect_stats(model, source, REQUEST, executor=executor), want_stats)
    _assert_reports_equal(validate.validate(model, candidate, source, budget, executor=executor), want)
    assert loader.reads == 0  # the driver read no feed: each task read its own files


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_ray_reads_a_folder_of_images_in_its_tasks(ray_head, tmp_path, monkeypatch):
    pil = pytest.importorskip("PIL.Image")
    from onnxopt import images

    rng = np.random.default_rng(4)
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for index in range(7):
            pixels = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
            pil.fromarray(pixels).save(tmp_path / "imgs" / label / f"{index}.png")
    model = ir.from_proto(builders.conv_net(seed=2, with_bn=False))
    source = data.as_source(images.ImageFolder(tmp_path / "imgs", images.parse_preprocess("none"), 3), model)
    assert source.batch_sizes == [3, 3, 3, 3, 2] and source.reader is not None
    candidate = _perturbed(model, 0.01)
    budget = validate.Budget(max_accuracy_drop=50.0, min_cosine=0.9)
    want_stats = stats.collect_stats(model, source, REQUEST)
    want = validate.validate(model, candidate, source, budget)
    reads = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda *a, **k: reads.append(1) or real(*a, **k))
    executor = RayExecutor(batches_per_task=2)
    _assert_tables_equal(stats.collect_stats(model, source, REQUEST, executor=executor), want_stats)
    _assert_reports_equal(validate.validate(model, candidate, source, budget, executor=executor), want)
    assert not reads and want.samples == 14 and want.accuracy is not None  # the workers decoded every image


def test_cli_validate_unknown_executor_is_exit_2(workdir, capsys):
    d, model = workdir
    code, _, err = _cli(capsys, "validate", model, model, "--data", d / "calib.npz", "--executor", "spark")
    assert code == 2 and err.count("\n") == 1 and "'spark' is not 'local', 'ray' or 'ray:ADDRESS'" in err


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_cli_validate_on_ray_prints_the_local_report(ray_head, workdir, capsys):
    import json

    d, model = workdir
    other = builders.save(builders.conv_net(seed=0, with_bn=False), d / "other.onnx")  # another model: failures
    common = ["validate", model, other, "--data", d / "calib.npz", "--min-cosine", "0.99", "--json"]
    local = _cli(capsys, *common)
    on_ray = _cli(capsys, *common, "--executor", "ray")
    assert local[0] == on_ray[0] == 1  # the same verdict: fails the budget
    got, want = json.loads(on_ray[1]), json.loads(local[1])
    assert got["samples"] == want["samples"] == 40 and got["failures"] == want["failures"]
    for name, diff in want["outputs"].items():
        for key, value in diff.items():
            assert got["outputs"][name][key] == pytest.approx(value, rel=1e-6), (name, key)
