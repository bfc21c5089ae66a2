"""onnxruntime sessions for ``ir.Model`` objects and model files, and latency measurement.

Sessions are always opened from a file path (a model with external data opened from bytes fails
"External data path validation failed"); an in-memory model is saved into a temporary directory that
lives as long as the session does. Comparisons and statistics use ``ORT_DISABLE_ALL`` so onnxruntime's
own fusions neither hide nor add differences; latency uses the full optimization level users get.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt.errors import UsageError

__all__ = [
    "Session",
    "work_threads",
    "THREADS_ENV",
    "check_runs",
    "Latency",
    "measure_latency",
    "node_times",
    "kernel_times",
    "TimingFeeds",
    "latency_feeds",
]

# onnxruntime's C++ log level for onnxopt's sessions: 3 errors only; the CLI sets 4 (fatal only) without
# --verbose, as a failed run is raised as an exception anyway and its coloured log line would be a second one
LOG_SEVERITY = 3

_UNKNOWN_OP = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")


THREADS_ENV = "ONNXOPT_THREADS"
_MAX_WORK_THREADS = 8


def work_threads() -> int:
    """onnxruntime's intra-op threads for onnxopt's own runs (statistics, budget checks, proxies, refits):
    ``$ONNXOPT_THREADS``, else the cores this process may use, at most 8. Latency is timed apart, on the threads
    asked for (1 unless told otherwise), like the deployed model; a Ray worker runs on one.

    The count changes no result on the models measured (MobileNetV2 float and int8, ResNet-56, MiniLM: bitwise
    the same outputs on 1 and 2 threads), or a last-bit rounding on some (Ultraface: 1.2e-7); one count gives the
    same outputs run after run. Two threads ran MobileNetV2's batch of 16 in 63 ms against 122 ms on one. Their
    idle threads sleep instead of spinning: a refit keeps two sessions open (the pruned and the original model's
    segments), and their spinning threads slowed a MobileNetV2 ``--prune-refit`` from 59 to 67.5 s on 2 cores.

    Raises:
        UsageError: ``$ONNXOPT_THREADS`` is not a positive integer.
    """
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        try:
            count = int(text)
        except ValueError:
            count = 0
        if count < 1:
            raise UsageError(f"${THREADS_ENV} must be a positive integer, got {text!r}")
        return count
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_WORK_THREADS))


@functools.cache
def _remove_stale_session_dirs(parent: str) -> None:
    """Once per process and temporary directory: remove the folders that sessions of runs that no longer run
    (SIGKILLed) left there; :func:`onnxopt.graph.make_temp_dir` does it only for a session opened through a file,
    and most open from memory."""
    graph_io.remove_stale_temp_dirs("onnxopt-session-", Path(parent))


class Session:
    """An onnxruntime ``InferenceSession`` plus the temporary file it was opened from (if any)."""

    def __init__(
        self,
        source: ir.Model | str | os.PathLike,
        *,
        optimize: bool = False,
        threads: int | None = None,
        profile: bool = False,
        arena: bool = True,
        save_optimized: bool = False,
    ):
        """``threads``: onnxruntime's intra-op threads (default :func:`work_threads`; latency passes its own).
        ``profile``: record onnxruntime's per-kernel profile (read with :meth:`end_profiling`). ``arena=False``:
        no memory arena (which keeps a run's peak memory for the next run), for sessions kept open beside others.
        ``save_optimized`` (with ``profile``): onnxruntime writes the graph it runs, whose node names the profile
        uses, to ``optimized_path`` (weights over 1 KiB in a ``.data`` file beside it)."""
        import onnxruntime as ort

        self._tmp_dir: Path | None = None
        _remove_stale_session_dirs(tempfile.gettempdir())
        # an ir.Model is handed over as bytes (a file's save, checks and temporary directory cost more than the
        # session of a small segment), through a file when the bytes would not load on their own
        # (graph_io.serialize) or when profiled (the profile is written beside the temporary model)
        self.model = source if isinstance(source, ir.Model) else None  # what a checker reads when path is None
        data = graph_io.serialize(source) if isinstance(source, ir.Model) and not profile else None
        in_memory = data is not None
        if (isinstance(source, ir.Model) and not in_memory) or profile:
            self._tmp_dir = graph_io.make_temp_dir("onnxopt-session-")
            weakref.finalize(self, shutil.rmtree, self._tmp_dir, True)
        path: Path | bytes
        if in_memory:
            path = data
        elif isinstance(source, ir.Model):
            path = graph_io.save(source, self._tmp_dir / "model.onnx")
        else:
            path = Path(source)
        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.intra_op_num_threads = work_threads() if threads is None else threads
        if threads is None:  # onnxopt's own runs: idle pool threads sleep instead of spinning (see work_threads)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = arena
        options.log_severity_level = LOG_SEVERITY
        self.optimized_path: Path | None = None
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(self._tmp_dir / "profile")
            if save_optimized:
                self.optimized_path = self._tmp_dir / "optimized.onnx"
                options.optimized_model_filepath = str(self.optimized_path)
                options.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", "optimized.onnx.data"
                )
                options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                 "1024")  # fmt: skip
        self.path = None if in_memory else path  # the model file (None: opened from memory)
        model = path if in_memory else str(path)
        self.inner = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.inner.get_inputs()]
        self.output_names = [o.name for o in self.inner.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch; returns ``{output name: array}``."""
        names = list(outputs) if outputs is not None else self.output_names
        results = self.inner.run(names, {k: feeds[k] for k in self.input_names})
        return dict(zip(names, results, strict=True))


def node_times(
    source: ir.Model | str | os.PathLike, feeds: Mapping[str, np.ndarray], *, runs: int = 10, threads: int = 1
) -> dict[str, tuple[str, float]]:
    """Each kernel's op type and median time (microseconds) over ``runs`` runs of ``feeds``, from onnxruntime's
    profiler, with all optimizations (the model users deploy) and ``threads`` intra-op threads; keyed by the name
    of the node in onnxruntime's optimized graph (a fused or re-laid-out node has a name onnxruntime makes: see
    :func:`onnxopt.passes._prune_latency.layer_times` for the way back to the input's nodes). One warm-up run is
    left out."""
    session = Session(source, optimize=True, threads=threads, profile=True)
    return kernel_times(session, feeds, runs=runs)


def kernel_times(session: Session, feeds: Mapping[str, np.ndarray], *, runs: int) -> dict[str, tuple[str, float]]:
    """Run a profiling ``session`` (``profile=True``) ``runs`` times after a warm-up run on ``feeds`` and read its
    profile: kernel name -> (op type, median microseconds); :func:`node_times` says more."""
    import json

    for _ in range(runs + 1):
        session.run(feeds)
    events = json.loads(Path(session.inner.end_profiling()).read_text())
    suffix = "_kernel_time"
    durations: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith(suffix):
            name = event["name"][: -len(suffix)]
            durations.setdefault(name, []).append(float(event["dur"]))
            ops[name] = event.get("args", {}).get("op_name", "")
    return {name: (ops[name], statistics.median(times[1:] or times)) for name, times in durations.items()}


def check_runs(path: str | os.PathLike) -> None:
    """Raise :class:`~onnxopt.errors.ModelLoadError` when onnxruntime cannot open the model file at ``path``.

    The message is one line and names the op onnxruntime does not know or has no kernel for.
    """
    from onnxopt.errors import ModelLoadError, first_line

    try:
        Session(path)
    except Exception as e:
        text = first_line(e, limit=1000)
        unknown, no_kernel = _UNKNOWN_OP.search(text), _NO_KERNEL.search(text)
        if unknown:
            reason = f"op {unknown.group(1) or 'ai.onnx'}::{unknown.group(2)} is not one onnxruntime knows"
        elif no_kernel:
            op, version, name = no_kernel.groups()
            reason = f"onnxruntime has no kernel for {op} (opset {version}) at node '{name}'"
        else:
            reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)[:300]
        raise ModelLoadError(f"{path}: onnxruntime cannot run this model: {reason}") from e


@dataclasses.dataclass(frozen=True)
class Latency:
    """Latency of one model in microseconds over interleaved rounds."""

    median_us: float
    min_us: float
    max_us: float
    rounds: int


def measure_latency(
    models: Sequence[ir.Model | str | os.PathLike],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int = 1,
    rounds: int = 15,
    runs_per_round: int = 0,
    warmup: int = 3,
    settled: Callable[[list[list[float]]], bool] | None = None,
) -> list[Latency]:
    """Median latency of each model, measured in interleaved rounds so their ratios hold on a noisy machine.

    Each round runs every model ``runs_per_round`` times (chosen so one round of the first model takes
    about 20 ms when 0), in an order rotated by one each round, and records the mean; the median over rounds
    is reported, with the fastest and slowest round as its spread. ``settled``: called with every model's round
    times after each round; the timing stops early when it returns true (the question it is timed for is decided
    whatever the remaining rounds would give; :func:`onnxopt.latency.slower`).
    """
    sessions = [Session(m, optimize=True, threads=threads) for m in models]
    for session in sessions:
        for _ in range(warmup):
            session.run(feeds)
    if runs_per_round <= 0:
        start = time.perf_counter()
        sessions[0].run(feeds)
        once = max(time.perf_counter() - start, 1e-6)
        runs_per_round = int(min(max(0.02 / once, 1), 200))
    samples: list[list[float]] = [[] for _ in sessions]
    for round_ in range(rounds):
        # the order rotates each round, so no model always runs right after the same one (cache, turbo state)
        for index in (np.arange(len(sessions)) + round_) % len(sessions):
            session = sessions[index]
            start = time.perf_counter()
            for _ in range(runs_per_round):
                session.run(feeds)
            samples[index].append((time.perf_counter() - start) / runs_per_round * 1e6)
        if settled is not None and round_ + 1 < rounds and settled(samples):
            break
    return [Latency(statistics.median(s), min(s), max(s), len(s)) for s in samples]


@dataclasses.dataclass(frozen=True)
class TimingFeeds:
    """The inputs latency is timed on, and where they come from (``"first batch of eval.npz"``)."""

    feeds: dict[str, np.ndarray]
    source: str

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {name: list(np.shape(array)) for name, array in self.feeds.items()}


def latency_feeds(
    model: ir.Model,
    data=None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    what: str = "data",
) -> TimingFeeds:
    """The feeds to time ``model`` on: the first batch of ``data`` as the user gave it, else random inputs.

    With data, the batch keeps the data's own shapes (its batch size, sequence length, image size), so a model
    with dynamic spatial dims is timed at the size it will see. Without, seeded random inputs of
    ``input_shapes``, a dynamic batch axis 1.

    Args:
        model: the model whose data inputs the feeds must match.
        data: anything :func:`onnxopt.data.as_source` accepts (an ``.npz`` path, arrays, a DataSource...).
        input_shapes: concrete shapes for dynamic inputs when there is no data.
        batch_size: batch size for a dynamic batch axis when cutting ``data``.
        seed: seed of the random inputs.
        what: what ``data`` is, for messages (``"evaluation data"``).

    Raises:
        DataError: the data does not fit the model, holds no sample, or no concrete shape is known.
    """
    from onnxopt import data as data_mod
    from onnxopt.errors import DataError

    if data is None:
        source = data_mod.random_source(model, seed=seed, shapes=input_shapes)
        what = "random inputs" + (" of --input-shape" if input_shapes else "")
    else:
        source = data_mod.as_source(data, model, batch_size=batch_size, what=what, labels=False)  # inputs only
        what = f"first batch of {source.description}"
    batch = next(iter(source), None)
    if batch is None:
        raise DataError(f"{source.description}: no sample to time latency on")
    return TimingFeeds(dict(batch.feeds), what)
