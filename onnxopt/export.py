"""Deployment: ORT-format models for onnxruntime mobile, validated against the ONNX model.

    onnxopt export model.onnx --format ort -o DIR

writes ``DIR/<name>.ort`` (optimization style ``Fixed``: the graph optimizations are baked in, the format a
reduced mobile build runs) and ``DIR/required_operators.config`` (the operator list for
``--include_ops_by_config`` in a reduced onnxruntime build), using onnxruntime's own
``convert_onnx_models_to_ort`` tool. The ``.ort`` file is then loaded in onnxruntime and compared with the
ONNX model on sample inputs: a mismatch over ``tolerance`` fails the export.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from onnxopt import data as data_mod
from onnxopt import graph as graph_io
from onnxopt.errors import OnnxoptError

__all__ = ["Exported", "export_ort"]


@dataclasses.dataclass(frozen=True)
class Exported:
    ort_path: Path
    config_path: Path
    max_abs: float
    samples: int


def export_ort(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    data: data_mod.DataSource | None = None,
    tolerance: float = 1e-5,
) -> Exported:
    """Convert ``model_path`` to ORT format in ``out_dir`` and validate it against the ONNX model."""
    import onnxruntime as ort

    model_path, out_dir = Path(model_path), Path(out_dir)
    model = graph_io.load(model_path)  # one-line errors for a bad model before onnxruntime's tool sees it
    if out_dir.exists() and not out_dir.is_dir():
        raise OnnxoptError(f"{out_dir}: exists and is not a directory")
    source = data or data_mod.random_source(model, seed=0)
    with tempfile.TemporaryDirectory(prefix="onnxopt-export-") as tmp:
        staged = Path(tmp) / "in" / f"{model_path.stem}.onnx"
        staged.parent.mkdir()
        graph_io.save(model, staged)
        converted = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(staged.parent),
               "--output_dir", str(converted), "--optimization_style", "Fixed"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ort_file = converted / f"{model_path.stem}.ort"
        if proc.returncode != 0 or not ort_file.exists():
            lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-1:] or ["?"]
            raise OnnxoptError(f"{model_path}: onnxruntime's ORT-format conversion failed: {lines[0][:300]}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        reference = ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
        mobile = ort.InferenceSession(str(ort_file), options, providers=["CPUExecutionProvider"])
        worst, samples = 0.0, 0
        for batch in source:
            expected = reference.run(None, batch.feeds)
            got = mobile.run(None, batch.feeds)
            for a, b in zip(expected, got, strict=True):
                if a.size:
                    scale = max(1.0, float(np.abs(a).max()))
                    worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()) / scale)
            samples += batch.size
        if not worst <= tolerance:
            raise OnnxoptError(f"the ORT-format model differs from the ONNX model by {worst:.3g} (> {tolerance:g})")
        out_dir.mkdir(parents=True, exist_ok=True)
        config = out_dir / "required_operators.config"
        final = out_dir / ort_file.name
        for src, dst in ((converted / "required_operators.config", config), (ort_file, final)):
            partial = dst.with_name(f".{dst.name}.partial")
            shutil.copyfile(src, partial)
            os.replace(partial, dst)  # no half-written file under the final name
    return Exported(final, config, worst, samples)
