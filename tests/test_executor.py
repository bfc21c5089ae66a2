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

from onnxopt import data, stats
from onnxopt.errors import CalibrationError
from onnxopt.executor import ExecutorError, LocalExecutor, RayExecutor, make_executor
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


def _die_once_then(session, batches, args):
    """A shard function whose first call anywhere kills its worker process (as an OOM kill would)."""
    marker, fn, init_args = args
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return fn(session, batches, init_args)
    os._exit(1)


class _DyingOnce:
    """A Ray executor whose first task's worker dies."""

    def __init__(self, inner: RayExecutor, marker: str) -> None:
        self.inner, self.marker, self.name = inner, marker, "ray"

    def map_batches(self, model, source, fn, init_args, **kwargs):
        return self.inner.map_batches(model, source, _die_once_then, (self.marker, fn, init_args), **kwargs)


@pytest.mark.slow  # a Ray head takes ~15 s to start on a loaded 2-core machine
def test_ray_task_of_a_dead_worker_is_retried_without_double_counting(ray_head, tmp_path):
    model, source = _model_and_source()
    want = stats.collect_stats(model, source, REQUEST)
    marker = tmp_path / "died"
    got = stats.collect_stats(
        model, source, REQUEST, executor=_DyingOnce(RayExecutor(batches_per_task=2, max_retries=2), str(marker))
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
    common = ["run", model, "--passes", "prune", "--prune-ratio", "0.25", "--min-cosine", "0.5",
              "--data", d / "calib.npz", "--allow-small-eval", "-q"]  # fmt: skip
    assert _cli(capsys, *common, "-o", d / "local.onnx")[0] == 0
    assert _cli(capsys, *common, "-o", d / "ray.onnx", "--executor", "ray")[0] == 0
    local, ray = onnx.load(d / "local.onnx"), onnx.load(d / "ray.onnx")
    shapes = {t.name: list(t.dims) for t in local.graph.initializer}
    assert shapes == {t.name: list(t.dims) for t in ray.graph.initializer}  # the same channels kept
    assert shapes["w1"][0] == 6 and shapes["w2"][1] == 6  # conv1 lost 2 of its 8 channels, chosen by statistics
    for a, b in zip(local.graph.initializer, ray.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
