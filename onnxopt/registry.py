"""The pass registry: one explicit table from CLI names to pass classes, plus third-party entry points.

Built-in passes are listed below as ``"module:Class"`` so that ``import onnxopt`` stays light; a pass
module is imported the first time its pass is asked for. Other packages add passes through the
``onnxopt.passes`` entry-point group (``name = "package.module:PassClass"``); a third-party name that
collides with a built-in one is ignored with a warning.
"""

from __future__ import annotations

import importlib
import logging
from importlib import metadata

from onnxopt.errors import UnknownPassError, UsageError
from onnxopt.pass_base import OptPass

__all__ = ["BUILTIN_PASSES", "ENTRY_POINT_GROUP", "available", "get_pass", "make_pass"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnxopt.passes"

BUILTIN_PASSES: dict[str, str] = {
    "simplify": "onnxopt.passes.simplify:SimplifyPass",
    "prune": "onnxopt.passes.prune:ChannelPrunePass",
    "svd": "onnxopt.passes.svd:GemmSvdPass",
    "split": "onnxopt.passes.split:ConvSplitPass",
    "quant": "onnxopt.passes.quant:Int8QuantPass",
    "share": "onnxopt.passes.share:WeightSharePass",
    "compact": "onnxopt.passes.compact:CompactPass",
    "distill": "onnxopt.passes.distill:DistillPass",
    "fuse": "onnxopt.passes.fuse:FusePass",
    "depth": "onnxopt.passes.depth:DepthPass",
}


def available() -> dict[str, str]:
    """All pass names with their ``module:Class`` targets, built-ins first."""
    table = dict(BUILTIN_PASSES)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in table:
            if table[entry.name] != entry.value:
                logger.warning("entry point pass '%s' (%s) hides nothing: name taken", entry.name, entry.value)
            continue
        table[entry.name] = entry.value
    return table


def get_pass(name: str) -> type[OptPass]:
    """The pass class registered as ``name``.

    Raises:
        UnknownPassError: ``name`` is not registered, or its target cannot be imported.
    """
    table = available()
    target = table.get(name)
    if target is None:
        raise UnknownPassError(f"unknown pass '{name}'; choose from {', '.join(sorted(table)) or 'none'}")
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise UnknownPassError(f"pass '{name}': cannot import {target} ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, OptPass)):
        raise UnknownPassError(f"pass '{name}': {target} is not an OptPass subclass")
    return cls


def make_pass(name: str, **options: object) -> OptPass:
    """Build the pass ``name`` with config fields from ``options``."""
    cls = get_pass(name)
    try:
        config = cls.config_class(**options) if options else None
    except (TypeError, ValueError) as e:  # a bad option value is bad usage (exit 2), not a failing pass
        raise UsageError(f"pass '{name}': {e}") from e
    return cls(config)
