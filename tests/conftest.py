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
