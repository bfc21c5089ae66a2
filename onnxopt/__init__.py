"""onnxopt: make trained ONNX models small and fast for phones and edge devices.

The public API is imported lazily so that ``import onnxopt`` (and the CLI's start-up) stays light:

    from onnxopt import PassManager, Budget, load, save
    report = PassManager(["simplify"], data="calib.npz").run("model.onnx")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PassManager": "onnxopt.manager",
    "RunReport": "onnxopt.manager",
    "Budget": "onnxopt.validate",
    "validate": "onnxopt.validate",
    "ValidationReport": "onnxopt.validate",
    "load": "onnxopt.graph",
    "save": "onnxopt.graph",
    "estimate": "onnxopt.cost",
    "collect_stats": "onnxopt.stats",
    "StatsRequest": "onnxopt.stats",
    "OptPass": "onnxopt.pass_base",
    "OptResult": "onnxopt.pass_base",
    "PassConfig": "onnxopt.pass_base",
    "get_pass": "onnxopt.registry",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxopt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
