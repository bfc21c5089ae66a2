"""Recipe files for ``onnxopt run MODEL --config recipe.toml`` (standard-library ``tomllib``), CLI only.

A recipe holds what a run does, so that it can be kept beside the model and repeated::

    passes = ["prune", "quant"]        # or "prune,quant"
    data = "calib.npz"                 # paths relative to the recipe's folder
    eval = "eval.npz"
    metric = "top1"
    batch_size = 32
    input_shape = { x = [1, 3, 224, 224] }

    [budget]
    max_accuracy_drop = 0.5

    [options.prune]                    # --prune-criterion ratio --prune-refit
    criterion = "ratio"
    refit = true

A flag given on the command line wins over the recipe. The JSON report (``--report``) records the *effective*
recipe under ``"recipe"``: every pass of the pipeline with all its options (defaults included), the budget the
run was judged by, the data as absolute paths, the seed. :func:`to_toml` writes it back as a recipe file, so
``--config`` on it repeats the run exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxopt.errors import UsageError

__all__ = ["load", "apply", "effective", "to_toml", "KEYS", "BUDGET_KEYS"]

# top-level key -> the `run` argument it sets (input_shape, budget and options are handled apart)
KEYS = {
    "passes": "passes",
    "data": "data",
    "eval": "eval",
    "preprocess": "preprocess",
    "metric": "metric",
    "metric_output": "metric_output",
    "batch_size": "batch_size",
    "seed": "seed",
    "no_simplify": "no_simplify",
    "input_shape": "input_shape",
    "budget": None,
    "options": None,
}
# [budget] key -> the `run` argument (the Budget field of the same name, but confidence)
BUDGET_KEYS = {
    "max_accuracy_drop": "max_accuracy_drop",
    "max_mse_increase": "max_mse_increase",
    "min_cosine": "min_cosine",
    "max_rel_l2": "max_rel_l2",
    "max_abs": "max_abs",
    "max_mismatch": "max_mismatch",
    "max_metric_drop": "max_metric_drop",
    "metric_limit": "metric_limit",
    "confidence": "budget_confidence",
}
_PATHS = ("data", "eval")


def load(path: str | Path) -> dict[str, Any]:
    """The recipe at ``path``; a one-line :class:`UsageError` for a missing, unreadable or unknown-keyed file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            recipe = tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--config {path}: is a directory; give a .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not a text file") from None
    unknown = sorted(set(recipe) - set(KEYS))
    if unknown:
        raise UsageError(f"--config {path}: unknown key {unknown[0]!r}; known: {', '.join(KEYS)}")
    unknown = sorted(set(_table(recipe, "budget", path)) - set(BUDGET_KEYS))
    if unknown:
        raise UsageError(f"--config {path}: unknown [budget] key {unknown[0]!r}; known: {', '.join(BUDGET_KEYS)}")
    return recipe


def apply(args: argparse.Namespace, recipe: Mapping[str, Any], defaults: Mapping[str, Any], path: Path) -> None:
    """Fill ``args`` from ``recipe`` (read from ``path``) where the command line left an argument at its default.

    ``defaults`` are the parser's defaults. Relative data paths are taken from the recipe's folder. Pass options
    are checked against the pass's config fields, which have the names of the ``--<pass>-<option>`` flags.
    """
    where, base = f"--config {path}", Path(path).parent
    for key, dest in KEYS.items():
        if dest is None or key not in recipe:
            continue
        value = recipe[key]
        if key == "passes" and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif key in _PATHS:
            value = str(base / Path(str(value)).expanduser())
        elif key == "input_shape":
            value = [
                f"{name}={','.join(str(int(d)) for d in dims)}" for name, dims in _table(recipe, key, path).items()
            ]
        _set(args, dest, value, defaults, where, key)
    for key, value in _table(recipe, "budget", path).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"{where}: budget.{key} = {value!r}: expected a number")
        _set(args, BUDGET_KEYS[key], float(value), defaults, where, f"budget.{key}")
    for pass_name, options in _table(recipe, "options", path).items():
        fields = _fields(pass_name, where)
        if not isinstance(options, Mapping):
            raise UsageError(f"{where}: [options.{pass_name}] must be a table of option = value")
        for name, value in options.items():
            if name not in fields:
                raise UsageError(
                    f"{where}: pass '{pass_name}' has no option {name!r}; it has {', '.join(sorted(fields)) or 'none'}"
                )
            _set(args, f"pass__{pass_name}__{name}", _typed(value, fields[name], where, pass_name, name), defaults,
                 where, f"options.{pass_name}.{name}")  # fmt: skip


def effective(args: argparse.Namespace, passes: list, budget) -> dict[str, Any]:
    """The recipe that repeats this run: the pipeline's passes with all their options, the budget it was judged
    by (the default one when none was given), the data as absolute paths, the metric, the seed."""
    options: dict[str, dict[str, Any]] = {}
    for pass_ in passes:
        # an option left unset (None: prune's refit auto) is the pass's default, which TOML has no value for
        values = {key: value for key, value in dataclasses.asdict(pass_.config).items() if value is not None}
        options.setdefault(pass_.name, values)
    recipe: dict[str, Any] = {"passes": [p.name for p in passes], "no_simplify": True}  # the list is the pipeline
    for key in _PATHS:
        value = getattr(args, key)
        if value is not None:
            recipe[key] = str(Path(value).resolve())
    for key in ("preprocess", "metric", "metric_output"):
        if getattr(args, key, None) is not None:
            recipe[key] = getattr(args, key)
    if args.batch_size is not None:  # None: the default batch (16; for image folders, by the images' size)
        recipe["batch_size"] = args.batch_size
    recipe["seed"] = args.seed
    if args.input_shape:
        from onnxopt.data import parse_shape_overrides

        recipe["input_shape"] = parse_shape_overrides(args.input_shape)
    if budget is not None:
        values = {f.name: getattr(budget, f.name) for f in dataclasses.fields(budget)}
        recipe["budget"] = {key: values[key] for key in BUDGET_KEYS if values.get(key) is not None}
    recipe["options"] = {name: values for name, values in options.items() if values}
    return recipe


def to_toml(recipe: Mapping[str, Any]) -> str:
    """A recipe (as :func:`effective` makes it) as TOML text for ``--config``."""
    lines, tables = [], []
    for key, value in recipe.items():
        if isinstance(value, Mapping) and key in ("budget", "options"):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        if key == "options":
            for name, options in table.items():
                lines += ["", f"[options.{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in options.items()]
        else:
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            "inf" if value == math.inf else "-inf" if value == -math.inf else "nan" if value != value else repr(value)
        )
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _table(recipe: Mapping[str, Any], key: str, where) -> Mapping[str, Any]:
    value = recipe.get(key, {})
    if not isinstance(value, Mapping):
        raise UsageError(f"--config {where}: {key!r} must be a table")
    return value


def _fields(pass_name: str, where: str) -> dict[str, Any]:
    from onnxopt import registry

    try:
        cls = registry.get_pass(pass_name)
    except Exception as e:
        raise UsageError(f"{where}: [options.{pass_name}]: {e}") from None
    return {f.name: f.default for f in dataclasses.fields(cls.config_class)}


def _typed(value: Any, default: Any, where: str, pass_name: str, name: str) -> Any:
    """``value`` as the option's type (the type of its default); an int is accepted for a float option."""
    if default is dataclasses.MISSING or default is None:
        return value
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(
            f"{where}: options.{pass_name}.{name} = {value!r}: expected {kind.__name__} (like its default {default!r})"
        )
    return value


def _set(args: argparse.Namespace, dest: str, value: Any, defaults: Mapping[str, Any], where: str, key: str) -> None:
    if dest not in defaults:
        raise UsageError(f"{where}: {key} does not apply to this command")
    if getattr(args, dest) == defaults[dest]:  # not given on the command line: the recipe decides
        setattr(args, dest, value)
