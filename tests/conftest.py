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
