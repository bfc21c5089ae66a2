"""Where per-batch work runs: in this process (``local``, the default) or sharded over Ray workers (``ray``).

An :class:`Executor` maps a shard function over a data source's batches and returns one partial state per shard,
in batch order; the caller merges the states (the reducers of :mod:`onnxopt.stats` have ``merge``, validation's
fold in :mod:`onnxopt.validate` concatenates per-sample rows). The shard function has the signature
``fn(session, batches, init_args) -> state`` (``sessions``, a tuple, when the job has several models): it folds
``batches`` into fresh state built from ``init_args`` with onnxruntime sessions of the models, and never touches
shared state, so a task that is retried after its worker died cannot count a batch twice.

A :class:`Job` may carry a :class:`ShardCache`: values computed once per shard and kept between runs (validation
keeps the original model's outputs there, so the original runs once per batch however many candidates are
scored). Its shard function is then ``fn(sessions, batches, init_args, cached) -> (state, keep)``: ``cached`` is
the shard's kept value (``None`` the first time), ``keep`` the value to keep (dropped when the cache is full).

- :class:`LocalExecutor`: one session per model, one shard holding every batch: today's single-process loop.
- :class:`RayExecutor`: each model file (and its external data, if any) is put once in Ray's object store; the
  batches are cut into contiguous index ranges of ``batches_per_task`` batches, each a Ray task (``max_retries``:
  a task whose worker dies is run again) that opens its own one-thread sessions, cached per worker process.
  At most ``max_in_flight`` tasks are submitted at a time, so the data is streamed, never held whole. A source
  that reads its batches from files (a folder of ``.npz`` feeds or of images: ``DataSource.reader``) is not read
  by the driver at all: a task gets the paths of its shard and reads them itself. Several jobs over the same
  source (:meth:`RayExecutor.map_many`: the candidates of a search) share each shard's data and the in-flight
  bound. States come back in shard order, so merging them is deterministic. A cached value stays in the object
  store (the driver holds only its reference).

Ray is imported only when a :class:`RayExecutor` first runs; ``local`` never needs it.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from onnxopt import graph as graph_io
from onnxopt.data import Batch, DataSource
from onnxopt.errors import OnnxoptError, UsageError, first_line
from onnxopt.runtime import Session

__all__ = [
    "Executor",
    "ExecutorError",
    "Job",
    "LocalExecutor",
    "RayExecutor",
    "SessionOpenError",
    "ShardCache",
    "ShardFn",
    "make_executor",
]

logger = logging.getLogger(__name__)

ShardFn = Callable[..., Any]
Progress = Callable[[int, int | None], None]
ModelLike = ir.Model | str | os.PathLike

CONNECT_TIMEOUT_S = 5.0  # a Ray address that does not accept a TCP connection within this is unreachable
MAX_CANDIDATES = 7  # candidates a search scores at once on Ray at most (a bisection tree of depth 3)


class ExecutorError(OnnxoptError):
    """The executor cannot run the work (Ray missing, an unreachable cluster, a task that failed every retry)."""


class SessionOpenError(OnnxoptError):
    """onnxruntime cannot open model ``index`` of a job (validation reports it for the optimized model)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index

    def __reduce__(self):  # through Ray: rebuilt from both arguments
        return SessionOpenError, (self.index, str(self))


class ShardCache:
    """Values kept per shard between runs, up to ``room`` bytes (see the module docstring)."""

    def __init__(self, room: int = 256 << 20) -> None:
        self.room = room
        self.values: dict[Any, Any] = {}  # shard key -> value (local) or object reference (Ray)

    def offer(self, key: Any, value: Any, size: int) -> None:
        if key not in self.values and size <= self.room:
            self.values[key] = value
            self.room -= size


@dataclasses.dataclass
class Job:
    """One model run over a source's batches: ``fn`` folds each shard (see the module docstring)."""

    models: ModelLike | Sequence[ModelLike]
    fn: ShardFn
    init_args: Any
    optimize: bool = False
    cache: ShardCache | None = None

    @property
    def single(self) -> bool:
        return isinstance(self.models, ir.Model | str | os.PathLike)

    @property
    def model_list(self) -> list[ModelLike]:
        return [self.models] if self.single else list(self.models)

    def open(self) -> Session | tuple[Session, ...]:
        """Sessions of the job's models in this process: what its shard function receives."""
        return open_sessions((lambda m=m: Session(m, optimize=self.optimize) for m in self.model_list), self.single)


def open_sessions(openers, single: bool) -> Session | tuple[Session, ...]:
    """Open a job's sessions in order with ``openers`` (callables): the session of a single-model job, else the tuple.

    Raises:
        SessionOpenError: the index of the model onnxruntime could not load, and why.
    """
    sessions = []
    for index, open_ in enumerate(openers):
        try:
            sessions.append(open_())
        except Exception as e:
            raise SessionOpenError(index, first_line(e)) from e
    return sessions[0] if single else tuple(sessions)


class Executor(Protocol):
    """Runs shard functions over the batches of a data source."""

    name: str

    def candidates_at_once(self, source: DataSource | None) -> int:
        """How many independent candidates a search should score at once on ``source`` (1: one after the other)."""
        ...

    def map_batches(
        self,
        model: ModelLike | Sequence[ModelLike],
        source: DataSource,
        fn: ShardFn,
        init_args: Any,
        *,
        optimize: bool = False,
        progress: Progress | None = None,
    ) -> list[Any]:
        """The states ``fn`` returns for consecutive shards of ``source``'s batches, in batch order."""
        ...

    def map_many(self, jobs: Sequence[Job], source: DataSource, *, progress: Progress | None = None) -> list[list[Any]]:
        """Per job, its shards' states in batch order (``progress``: the first job's samples)."""
        ...


class LocalExecutor:
    """Every batch in this process, through one session per model: a single shard, jobs one after the other."""

    name = "local"

    def candidates_at_once(self, source: DataSource | None) -> int:
        return 1

    def map_batches(
        self,
        model: ModelLike | Sequence[ModelLike],
        source: DataSource,
        fn: ShardFn,
        init_args: Any,
        *,
        optimize: bool = False,
        progress: Progress | None = None,
    ) -> list[Any]:
        return self.map_many([Job(model, fn, init_args, optimize)], source, progress=progress)[0]

    def map_many(self, jobs: Sequence[Job], source: DataSource, *, progress: Progress | None = None) -> list[list[Any]]:
        results = []
        for number, job in enumerate(jobs):
            opened = job.open()
            batches = _counted(source, progress if number == 0 else None)
            # a copy, as a Ray task gets one: the caller merges the returned state into its own
            if job.cache is None:
                results.append([job.fn(opened, batches, copy.deepcopy(job.init_args))])
                continue
            state, keep = job.fn(opened, batches, copy.deepcopy(job.init_args), job.cache.values.get("all"))
            if keep is not None:
                job.cache.offer("all", keep, _nbytes(keep))
            results.append([state])
        return results


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
        max_candidates: independent candidates a search scores at once (``None``: as many as the task slots
            leave room for, see :meth:`candidates_at_once`); their shards' tasks share the in-flight bound.
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
        max_candidates: int | None = None,
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise UsageError(f"--executor ray: num_workers must be at least 1, not {num_workers}")
        self.address = address
        self.num_workers = num_workers
        self.max_in_flight = max_in_flight
        self.batches_per_task = None if batches_per_task is None else max(1, batches_per_task)
        self.max_retries = max_retries
        self.max_candidates = max_candidates
        self._started = False
        self._models: collections.OrderedDict[str, tuple[str, Any]] = collections.OrderedDict()  # -> (key, ref)

    def candidates_at_once(self, source: DataSource | None) -> int:
        """How many independent candidates a search should score at once on ``source``: ``max_candidates`` when
        given, else as many as keep every task slot busy with one batch each (``slots // batches``, at most
        :data:`MAX_CANDIDATES`): one candidate's shards already fill the slots of a set of many batches, and
        candidates scored ahead that the search then does not ask for are wasted work."""
        if self.max_candidates is not None:
            return max(1, self.max_candidates)
        batches = None if source is None or source.batch_sizes is None else len(source.batch_sizes)
        if not batches:
            return 1
        slots = self.max_in_flight or self.num_workers
        if slots is None:
            import ray

            slots = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
        return max(1, min(MAX_CANDIDATES, slots // batches))

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
        model: ModelLike | Sequence[ModelLike],
        source: DataSource,
        fn: ShardFn,
        init_args: Any,
        *,
        optimize: bool = False,
        progress: Progress | None = None,
    ) -> list[Any]:
        return self.map_many([Job(model, fn, init_args, optimize)], source, progress=progress)[0]

    def map_many(self, jobs: Sequence[Job], source: DataSource, *, progress: Progress | None = None) -> list[list[Any]]:
        ray = self.connect()
        task = ray.remote(num_cpus=1, max_retries=self.max_retries)(_run_shard)
        cached_task = task.options(num_returns=3)
        handles = [[self._put(ray, model) for model in job.model_list] for job in jobs]
        limit = self.max_in_flight or self.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # state ref -> (job, shard, samples, cache, shard key to keep, kept ref, size ref)
        pending: dict[Any, tuple] = {}
        results: list[dict[int, Any]] = [{} for _ in jobs]
        done = [0]
        wanted: set[tuple[int, Any]] = set()  # (cache, shard key) whose value a task is computing to keep
        shards = 0
        for index, (key, samples, shard) in enumerate(_shards(source, self.batches_per_task, 2 * limit)):
            shard_ref = ray.put(shard) if len(jobs) > 1 else shard  # the shard's data once for all jobs
            for number, job in enumerate(jobs):
                while len(pending) >= limit:
                    self._collect(ray, pending, results, done, source, progress)
                keys = [h[0] for h in handles[number]]
                refs = [h[1] for h in handles[number]]
                args = (job.fn, job.init_args, shard_ref, job.optimize, job.single, keys)
                if job.cache is None:
                    ref = task.remote(*args, _NO_CACHE, None, *refs)
                    pending[ref] = (number, index, samples, None, None, None, None)
                    continue
                cached = job.cache.values.get(key)
                want = cached is None and (id(job.cache), key) not in wanted and job.cache.room > 0
                wanted.add((id(job.cache), key))  # the first job to compute a shard's value keeps it; not the others
                mode = _KEEP if want else _CACHE
                state_ref, kept_ref, size_ref = cached_task.remote(*args, mode, cached, *refs)
                pending[state_ref] = (number, index, samples, job.cache, key if want else None, kept_ref, size_ref)
            shards = index + 1
        while pending:
            self._collect(ray, pending, results, done, source, progress)
        logger.info("ray: %d job(s) x %d shards, at most %d tasks in flight", len(jobs), shards, limit)
        return [[job_results[i] for i in range(shards)] for job_results in results]

    def _put(self, ray, model: ModelLike) -> tuple[str, Any]:
        """The model's payload in the object store, once: a model put before (the same bytes, or the same file
        unchanged: the original of every budget check) is neither read nor put again."""
        stamp = _file_stamp(model)
        if stamp is not None and stamp in self._models:
            key, ref = self._models.pop(stamp)
            self._models[stamp] = (key, ref)
            return key, ref
        payload = _model_payload(model)
        key = hashlib.sha256(b"".join(name.encode() + payload[name] for name in sorted(payload))).hexdigest()
        _, ref = self._models.pop(key, (key, None))
        if ref is None:
            ref = ray.put(payload)
            while len(self._models) >= _MODELS_KEPT:
                self._models.popitem(last=False)  # the least recently used
        self._models[stamp or key] = (key, ref)
        return key, ref

    def _collect(self, ray, pending, results, done, source, progress) -> None:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            number, index, samples, cache, cache_key, kept_ref, size_ref = pending.pop(ref)
            try:
                results[number][index] = ray.get(ref)
                size = ray.get(size_ref) if cache_key is not None else None
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, OnnxoptError):
                    raise cause from None
                raise ExecutorError(f"ray task for shard {index} failed: {first_line(cause or e)}") from e
            except ray.exceptions.RayError as e:
                raise ExecutorError(
                    f"ray task for shard {index} failed after {self.max_retries} retries: {first_line(e)}"
                ) from e
            if cache_key is not None and size:
                cache.offer(cache_key, kept_ref, size)  # the value stays in the object store
            if number == 0:
                done[0] += samples
                if progress is not None:
                    progress(done[0], source.samples)


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


def _file_stamp(model: ModelLike) -> str | None:
    """A model file's identity while unchanged (path, size, modification time); ``None`` for an in-memory model."""
    if isinstance(model, ir.Model):
        return None
    path = Path(model).resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


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


def _shards(source: DataSource, size: int | None, parts: int) -> Iterator[tuple[tuple[int, int], int, Any]]:
    """``((first batch, end batch), samples, shard)`` for consecutive shards of ``size`` batches (``None``: sized
    for about ``parts`` shards). A source that reads its batches from files gives each shard as a
    :class:`_FileShard` (read by the task); any other is read here and shipped as a list of batches."""
    sizes = source.batch_sizes
    if source.reader is not None and sizes is not None:
        size = size or max(1, math.ceil(len(sizes) / parts))
        for start in range(0, len(sizes), size):
            stop = min(start + size, len(sizes))
            yield (start, stop), sum(sizes[start:stop]), _FileShard(source.reader, start, stop)
        return
    shard: list[Batch] = []
    start = 0
    for batch in source:
        if size is None:
            size = 4 if not source.samples else max(1, math.ceil(source.samples / batch.size / parts))
        shard.append(batch)
        if len(shard) == size:
            yield (start, start + len(shard)), sum(b.size for b in shard), shard
            start += len(shard)
            shard = []
    if shard:
        yield (start, start + len(shard)), sum(b.size for b in shard), shard


@dataclasses.dataclass(frozen=True)
class _FileShard:
    """Batches ``start .. stop-1`` of a source that reads them from files, read lazily where it is iterated."""

    reader: Callable[[int, int], Iterable[Batch]]
    start: int
    stop: int

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.reader(self.start, self.stop))


def _counted(source: DataSource, progress: Progress | None) -> Iterator[Batch]:
    done = 0
    for batch in source:
        yield batch
        done += batch.size
        if progress is not None:
            progress(done, source.samples)


def _nbytes(value: Any) -> int:
    """Bytes of the arrays in ``value`` (nested lists, tuples and dicts)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


_MODELS_KEPT = 4  # model payloads a driver keeps in the object store (the original and recent candidates)
# per worker process: the sessions opened from payloads already seen, newest last
_SESSIONS: dict[tuple[str, bool], tuple[Session, Path]] = {}
_SESSION_CACHE = 4


def _session(payload: dict[str, bytes], key: str, optimize: bool) -> Session:
    entry = _SESSIONS.pop((key, optimize), None)
    if entry is None:
        directory = graph_io.make_temp_dir("onnxopt-ray-worker-")  # a dead worker's directory goes next time
        for name, data in payload.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        try:
            entry = (Session(directory / "model.onnx", optimize=optimize, threads=1), directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        while len(_SESSIONS) >= _SESSION_CACHE:
            _, old = _SESSIONS.pop(next(iter(_SESSIONS)))  # the oldest
            shutil.rmtree(old, ignore_errors=True)
    _SESSIONS[(key, optimize)] = entry
    return entry[0]


_NO_CACHE, _CACHE, _KEEP = 0, 1, 2  # a task's cache mode: none; read ``cached``; also return the value to keep


def _run_shard(
    fn: ShardFn, init_args: Any, batches, optimize: bool, single: bool, keys: list[str], mode: int, cached, *payloads
):
    """The body of a Ray task: cached sessions of the payloads' models, then ``fn`` over the shard (with a cache:
    ``(state, the value to keep or None, its bytes)``)."""
    openers = (lambda p=p, k=k: _session(p, k, optimize) for p, k in zip(payloads, keys, strict=True))
    opened = open_sessions(openers, single)
    if mode == _NO_CACHE:
        return fn(opened, batches, init_args)
    state, keep = fn(opened, batches, init_args, cached)
    if mode != _KEEP:
        keep = None  # another task keeps this shard's value: nothing to send back
    return state, keep, _nbytes(keep)
