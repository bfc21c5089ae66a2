"""Where per-batch work runs: in this process (``local``, the default) or sharded over Ray workers (``ray``).

An :class:`Executor` maps a shard function over a data source's batches and returns one partial state per shard,
in batch order; the caller merges the states (the reducers of :mod:`onnxopt.stats` have ``merge``). The shard
function has the signature ``fn(session, batches, init_args) -> state``: it folds ``batches`` into fresh state
built from ``init_args`` with an onnxruntime ``session`` of the model, and never touches shared state, so a task
that is retried after its worker died cannot count a batch twice.

- :class:`LocalExecutor`: one session, one shard holding every batch: today's single-process loop.
- :class:`RayExecutor`: the model file (and its external data, if any) is put once in Ray's object store; the
  batches are cut into contiguous index ranges of ``batches_per_task`` batches, each a Ray task (``max_retries``:
  a task whose worker dies is run again) that opens its own one-thread session, cached per worker process.
  At most ``max_in_flight`` tasks are submitted at a time, so the data is streamed, never held whole. States come
  back in shard order, so merging them is deterministic.

Ray is imported only when a :class:`RayExecutor` first runs; ``local`` never needs it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt.data import Batch, DataSource
from onnxopt.errors import OnnxoptError, UsageError, first_line
from onnxopt.runtime import Session

__all__ = ["Executor", "ExecutorError", "LocalExecutor", "RayExecutor", "ShardFn", "make_executor"]

logger = logging.getLogger(__name__)

ShardFn = Callable[[Session, Iterable[Batch], Any], Any]
Progress = Callable[[int, int | None], None]

CONNECT_TIMEOUT_S = 5.0  # a Ray address that does not accept a TCP connection within this is unreachable


class ExecutorError(OnnxoptError):
    """The executor cannot run the work (Ray missing, an unreachable cluster, a task that failed every retry)."""


class Executor(Protocol):
    """Runs a shard function over the batches of a data source."""

    name: str

    def map_batches(
        self,
        model: ir.Model | str | os.PathLike,
        source: DataSource,
        fn: ShardFn,
        init_args: Any,
        *,
        optimize: bool = False,
        progress: Progress | None = None,
    ) -> list[Any]:
        """The states ``fn`` returns for consecutive shards of ``source``'s batches, in batch order."""
        ...


class LocalExecutor:
    """Every batch in this process, through one session: a single shard."""

    name = "local"

    def map_batches(
        self,
        model: ir.Model | str | os.PathLike,
        source: DataSource,
        fn: ShardFn,
        init_args: Any,
        *,
        optimize: bool = False,
        progress: Progress | None = None,
    ) -> list[Any]:
        session = Session(model, optimize=optimize)
        # a copy, as a Ray task gets one: the caller merges the returned state into its own
        return [fn(session, _counted(source, progress), copy.deepcopy(init_args))]


class RayExecutor:
    """Shards batches over Ray workers; see the module docstring.

    Args:
        address: a running cluster's address (``host:port``, ``auto`` or ``ray://host:port``); ``None`` starts
            a local Ray instance (or joins the one ``ray.init()`` already started in this process).
        num_workers: CPUs of a locally started instance, and the default number of tasks in flight
            (``None``: Ray's count of this machine's CPUs).
        max_in_flight: tasks submitted and not yet finished at any time (default: ``num_workers``, else the
            cluster's CPU count).
        batches_per_task: consecutive batches folded by one task (``None``: about two tasks per task in flight
            when the source knows its sample count, else 4).
        max_retries: how often a task whose worker died is run again before the run fails.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_workers: int | None = None,
        max_in_flight: int | None = None,
        batches_per_task: int | None = None,
        max_retries: int = 3,
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise UsageError(f"--executor ray: num_workers must be at least 1, not {num_workers}")
        self.address = address
        self.num_workers = num_workers
        self.max_in_flight = max_in_flight
        self.batches_per_task = None if batches_per_task is None else max(1, batches_per_task)
        self.max_retries = max_retries
        self._started = False

    def connect(self) -> Any:
        """Import Ray and join (or start) the cluster; returns the ``ray`` module.

        Raises:
            ExecutorError: Ray is not installed, or the address is unreachable.
        """
        try:
            import ray
        except ImportError as e:
            raise ExecutorError("--executor ray needs Ray: pip install 'onnxopt[ray]'") from e
        if self.address not in (None, "auto"):
            _probe(self.address)
        if ray.is_initialized():
            return ray
        quiet = logging.getLogger("ray")  # Ray's start-up warnings (token auth) only with onnxopt's --verbose
        level = quiet.level
        if not logger.isEnabledFor(logging.INFO):
            quiet.setLevel(logging.ERROR)
        try:
            if self.address is None:
                ray.init(
                    num_cpus=self.num_workers,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        except Exception as e:
            where = self.address or "a local Ray instance"
            raise ExecutorError(f"--executor ray: cannot connect to {where}: {first_line(e)}") from e
        finally:
            quiet.setLevel(level)
        self._started = True
        return ray

    def close(self) -> None:
        """Shut down the Ray instance this executor started (not one it joined)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def map_batches(
        self,
        model: ir.Model | str | os.PathLike,
        source: DataSource,
        fn: ShardFn,
        init_args: Any,
        *,
        optimize: bool = False,
        progress: Progress | None = None,
    ) -> list[Any]:
        ray = self.connect()
        payload = _model_payload(model)
        key = hashlib.sha256(b"".join(payload[name] for name in sorted(payload))).hexdigest()
        payload_ref = ray.put(payload)  # once: every task reads the same object
        task = ray.remote(num_cpus=1, max_retries=self.max_retries)(_run_shard)
        in_flight_limit = self.max_in_flight or self.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (shard index, samples)
        results: dict[int, Any] = {}
        done_samples = 0
        for index, shard in enumerate(_shards(source, self.batches_per_task, 2 * in_flight_limit)):
            while len(pending) >= in_flight_limit:
                done_samples = self._collect(ray, pending, results, done_samples, source, progress)
            ref = task.remote(payload_ref, key, optimize, fn, init_args, shard)
            pending[ref] = (index, sum(batch.size for batch in shard))
        while pending:
            done_samples = self._collect(ray, pending, results, done_samples, source, progress)
        logger.info("ray: %d shards, at most %d in flight", len(results), in_flight_limit)
        return [results[i] for i in range(len(results))]

    def _collect(self, ray, pending, results, done_samples, source, progress) -> int:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            index, samples = pending.pop(ref)
            try:
                results[index] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, OnnxoptError):
                    raise cause from None
                raise ExecutorError(f"ray task for shard {index} failed: {first_line(cause or e)}") from e
            except ray.exceptions.RayError as e:
                raise ExecutorError(
                    f"ray task for shard {index} failed after {self.max_retries} retries: {first_line(e)}"
                ) from e
            done_samples += samples
            if progress is not None:
                progress(done_samples, source.samples)
        return done_samples


def make_executor(spec: str | Executor | None) -> Executor | None:
    """``None``/``"local"`` -> ``None`` (the caller's single-process loop); ``"ray"`` / ``"ray:ADDRESS"`` -> Ray.

    Raises:
        UsageError: an unknown executor name.
    """
    if spec is None or isinstance(spec, LocalExecutor):
        return None
    if not isinstance(spec, str):
        return spec
    if spec == "local":
        return None
    if spec == "ray":
        return RayExecutor()
    if spec.startswith("ray:") and spec[4:]:
        return RayExecutor(spec[4:])
    raise UsageError(f"--executor: '{spec}' is not 'local', 'ray' or 'ray:ADDRESS'")


def _probe(address: str) -> None:
    """Raise :class:`ExecutorError` unless ``host:port`` accepts a TCP connection within the timeout."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ExecutorError(f"--executor ray:{address}: the address is not HOST:PORT")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ExecutorError(
            f"--executor ray:{address}: unreachable ({e.strerror or type(e).__name__}); is a Ray head running there?"
        ) from e


def _model_payload(model: ir.Model | str | os.PathLike) -> dict[str, bytes]:
    """The model file and its external data files as ``{file name: bytes}``."""
    tmp_dir = graph_io.make_temp_dir("onnxopt-ray-")
    try:
        if isinstance(model, ir.Model):
            path = graph_io.save(model, tmp_dir / "model.onnx")
        else:
            path = Path(model)
        files = [path, *graph_io.external_data_files(path)]
        return {("model.onnx" if f == path else str(f.relative_to(path.parent))): f.read_bytes() for f in files}
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _shards(source: DataSource, size: int | None, parts: int) -> Iterator[list[Batch]]:
    """Consecutive batches in shards of ``size``; ``None``: sized from the first batch for about ``parts`` shards."""
    shard: list[Batch] = []
    for batch in source:
        if size is None:
            size = 4 if not source.samples else max(1, math.ceil(source.samples / batch.size / parts))
        shard.append(batch)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


def _counted(source: DataSource, progress: Progress | None) -> Iterator[Batch]:
    done = 0
    for batch in source:
        yield batch
        done += batch.size
        if progress is not None:
            progress(done, source.samples)


# per worker process: the sessions opened from payloads already seen, newest last
_SESSIONS: dict[tuple[str, bool], tuple[Session, Path]] = {}
_SESSION_CACHE = 2


def _run_shard(payload: dict[str, bytes], key: str, optimize: bool, fn: ShardFn, init_args: Any, batches) -> Any:
    """The body of a Ray task: a cached session of the payload's model, then ``fn`` over the shard."""
    entry = _SESSIONS.pop((key, optimize), None)
    if entry is None:
        directory = graph_io.make_temp_dir("onnxopt-ray-worker-")  # a dead worker's directory goes next time
        for name, data in payload.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        entry = (Session(directory / "model.onnx", optimize=optimize, threads=1), directory)
        while len(_SESSIONS) >= _SESSION_CACHE:
            _, old = _SESSIONS.pop(next(iter(_SESSIONS)))  # the oldest
            shutil.rmtree(old, ignore_errors=True)
    _SESSIONS[(key, optimize)] = entry
    return fn(entry[0], batches, init_args)
