"""Shared fixtures: where ../shared is (tests that need it skip when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("ONNXOPT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def shared_models() -> list[Path]:
    return sorted((SHARED / "models").glob("*/*.onnx"))


@pytest.fixture()
def shared_dir() -> Path:
    if not (SHARED / "models").is_dir():
        pytest.skip("../shared is absent")
    return SHARED


@pytest.fixture(autouse=True)
def _fresh_latency_record(tmp_path_factory, monkeypatch):
    """Each test starts with an empty latency record (onnxopt/latency_cache.py), so a stubbed timer is always used
    and no test writes to the user's cache."""
    monkeypatch.setenv("ONNXOPT_CACHE_DIR", str(tmp_path_factory.mktemp("onnxopt-cache")))


@pytest.fixture(autouse=True)
def _prune_latency_guard_stood_in(request, monkeypatch):
    """prune's latency guard (passes/_prune_guard.py) times the pruned model against its input and keeps the input
    when it is clearly slower. On the tests' tiny models both run in microseconds, and a loaded machine can make
    either look slower, so a search's outcome would depend on the load. The guard is therefore stood in by "not
    slower" everywhere except in tests marked ``prune_latency_guard``, which stub the timer themselves."""
    if request.node.get_closest_marker("prune_latency_guard") is not None:
        return
    from onnxopt.passes import prune, split

    monkeypatch.setattr(prune, "slower", lambda *args, **kwargs: (None, {"stood_in": True}))
    monkeypatch.setattr(split, "slower", lambda *args, **kwargs: (None, {"stood_in": True}))  # the same for split
