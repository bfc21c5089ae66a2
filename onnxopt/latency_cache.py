"""A persistent record of latency measurements, so that a choice made by timing is the same every time.

Timing on a shared CPU is noisy: two recipes a few percent apart can swap places between runs, and a pass that picks
the faster one would then write different models for the same command. Like a tuning cache (onnxruntime's TensorRT
timing cache, cuDNN's autotuner), the first run measures and records; a later run of the same candidates — the same
model bytes, the same input shapes, the same CPU and onnxruntime — reuses the record instead of timing again, so the
same command gives the same choice. A pass option (``--quant-remeasure``) times afresh and replaces the record.

The record lives in ``$ONNXOPT_CACHE_DIR`` (else ``$XDG_CACHE_HOME/onnxopt``, else ``~/.cache/onnxopt``) as
``latency.json``, written atomically; an unreadable record is ignored (measured again), never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cache_file", "key", "lookup", "store"]

logger = logging.getLogger(__name__)

_MAX_ENTRIES = 2000


def cache_file() -> Path:
    """Where the record is kept."""
    root = os.environ.get("ONNXOPT_CACHE_DIR")
    if root:
        return Path(root) / "latency.json"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnxopt" / "latency.json"


def key(paths: Sequence[str | os.PathLike], feeds: Mapping[str, np.ndarray], **settings: Any) -> str:
    """A digest of everything a measurement depends on: the models' bytes, the feeds' shapes and dtypes, the
    timing settings, the CPU and the onnxruntime version."""
    import onnxruntime

    digest = hashlib.sha256()
    for path in paths:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    for name in sorted(feeds):
        array = np.asarray(feeds[name])
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(f"{_cpu()}|{onnxruntime.__version__}".encode())
    return digest.hexdigest()


def lookup(digest: str) -> Any | None:
    """The value recorded under ``digest``, or ``None``."""
    return _read().get(digest)


def store(digest: str, value: Any) -> None:
    """Record ``value`` under ``digest`` (atomically; a failure to write only logs)."""
    path = cache_file()
    table = _read()
    table[digest] = value
    if len(table) > _MAX_ENTRIES:  # oldest first: dicts keep insertion order
        table = dict(list(table.items())[-_MAX_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".latency.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(table, f)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("latency record not written (%s): %s", path, e)


def _read() -> dict[str, Any]:
    try:
        table = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
