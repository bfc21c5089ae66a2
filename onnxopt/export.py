"""Deployment: ORT-format models for onnxruntime mobile, validated against the ONNX model.

    onnxopt export model.onnx -o model.ort [--input-shape x=1,3,224,224]
    onnxopt export model.onnx -o DIR

writes ``model.ort`` (optimization style ``Fixed``: the graph optimizations are baked in, the format a reduced
mobile build runs) and beside it ``model.required_operators.config`` (the operator list for
``--include_ops_by_config`` in a reduced onnxruntime build), using onnxruntime's own
``convert_onnx_models_to_ort`` tool; ``input_shapes`` (``--input-shape``) are fixed in the exported model, as
NNAPI and CoreML need. With a directory, ``DIR/<name>.ort`` and ``DIR/required_operators.config``.
The config names the source model, not the temporary copy converted. The ``.ort`` file is then loaded in
onnxruntime and compared with the ONNX model on sample inputs (``data``, else random inputs at
``input_shapes``): a mismatch over ``tolerance`` fails the export.

:func:`mobile_usability` runs onnxruntime's mobile usability checker (``onnxruntime.tools.mobile_helpers``) on
the model as onnxruntime optimizes it: how many nodes the NNAPI (Android) and CoreML (iOS; NeuralNetwork and
MLProgram) execution providers would take, in how many partitions, which ops they lack, and its verdict.
onnxruntime ships no such table for XNNPACK, so XNNPACK is not judged.
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

__all__ = ["Exported", "EpSupport", "export_ort", "mobile_usability"]


@dataclasses.dataclass(frozen=True)
class EpSupport:
    """What one mobile execution provider would take of a model (onnxruntime's usability checker)."""

    provider: str
    nodes: int
    supported: int
    partitions: int
    unsupported_ops: tuple[str, ...]
    dynamic_shape_nodes: int  # nodes refused only because an input shape is not fixed
    verdict: str  # the checker's YES / MAYBE / NO: worth trying the provider

    def describe(self) -> str:
        parts = f"{self.supported} of {self.nodes} nodes in {self.partitions} partition{'s' * (self.partitions != 1)}"
        if self.unsupported_ops:
            parts += f"; no {', '.join(self.unsupported_ops)}"
        if self.dynamic_shape_nodes:
            parts += f"; {self.dynamic_shape_nodes} refused for dynamic shapes (fix them with --input-shape)"
        return f"{self.provider}: {parts}; worth trying: {self.verdict}"


@dataclasses.dataclass(frozen=True)
class Exported:
    ort_path: Path
    config_path: Path
    max_abs: float
    samples: int
    usability: tuple[EpSupport, ...] = ()


def export_ort(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    data: data_mod.DataSource | None = None,
    tolerance: float = 1e-5,
    input_shapes: dict[str, list[int]] | None = None,
    usability: bool = True,
) -> Exported:
    """Convert ``model_path`` to ORT format at ``output`` (a ``.ort`` file, else a directory) and validate it
    against the ONNX model; with ``usability``, also run :func:`mobile_usability`."""
    import onnxruntime as ort

    model_path, output = Path(model_path), Path(output)
    model = graph_io.load(model_path)  # one-line errors for a bad model before onnxruntime's tool sees it
    if output.suffix.lower() == ".ort":
        out_dir, final_name = output.parent if str(output.parent) else Path("."), output.name
        config_name = f"{output.stem}.required_operators.config"
        if output.is_dir():
            raise OnnxoptError(f"{output}: is a directory; give a file name ending in .ort, or a directory")
    else:
        out_dir, final_name, config_name = output, f"{model_path.stem}.ort", "required_operators.config"
        if out_dir.exists() and not out_dir.is_dir():
            raise OnnxoptError(f"{out_dir}: exists and is not a directory")
    source = data or data_mod.random_source(model, seed=0, shapes=input_shapes)
    with tempfile.TemporaryDirectory(prefix="onnxopt-export-") as tmp:
        staged = Path(tmp) / "in" / f"{model_path.stem}.onnx"
        staged.parent.mkdir()
        graph_io.save(model, staged)
        if input_shapes:
            _fix_input_shapes(staged, input_shapes)
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
        support = tuple(mobile_usability(staged)) if usability else ()
        out_dir.mkdir(parents=True, exist_ok=True)
        config = out_dir / config_name
        final = out_dir / final_name
        # the tool names the temporary copy it converted; the config should name the model the user gave
        text = (converted / "required_operators.config").read_text()
        text = text.replace(str(ort_file), str(model_path.resolve()))
        (converted / "required_operators.config").write_text(text)
        for src, dst in ((converted / "required_operators.config", config), (ort_file, final)):
            partial = dst.with_name(f".{dst.name}.partial")
            shutil.copyfile(src, partial)
            os.replace(partial, dst)  # no half-written file under the final name
    return Exported(final, config, worst, samples, support)


def _fix_input_shapes(path: Path, input_shapes: dict[str, list[int]]) -> None:
    """Give the inputs named in ``input_shapes`` those fixed shapes, in the file at ``path`` (what NNAPI and CoreML
    need; onnxruntime's ``make_dynamic_shape_fixed`` does the same)."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    proto = onnx.load(str(path), load_external_data=False)
    names = {i.name for i in proto.graph.input}
    for name, shape in input_shapes.items():
        if name not in names:
            raise OnnxoptError(f"--input-shape {name}: the model has no input '{name}' (inputs: {', '.join(names)})")
        try:
            make_input_shape_fixed(proto.graph, name, list(shape))
        except ValueError as e:
            raise OnnxoptError(f"--input-shape {name}: {e}") from None
    fix_output_shapes(proto)
    onnx.save(proto, str(path))


def mobile_usability(model_path: str | os.PathLike) -> list[EpSupport]:
    """NNAPI, CoreML NeuralNetwork and CoreML MLProgram support for the model at ``model_path``, as onnxruntime's
    ``check_onnx_model_mobile_usability`` judges it (on the model optimized to onnxruntime's basic level, with
    fixed input sizes required, as those providers need)."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    checks = (
        ("NNAPI", lambda m: uc.check_nnapi_partitions(m, True)),
        (
            "CoreML NeuralNetwork",
            lambda m: uc.check_coreml_partitions(m, True, "coreml_supported_neuralnetwork_ops.md"),
        ),
        ("CoreML MLProgram", lambda m: uc.check_coreml_partitions(m, True, "coreml_supported_mlprogram_ops.md")),
    )
    with tempfile.TemporaryDirectory(prefix="onnxopt-usability-") as tmp:
        optimized = Path(tmp) / Path(model_path).name
        optimize_model(Path(model_path), optimized, use_external_initializers=True)
        model = ModelProtoWithShapeInfo(optimized.resolve()).model_with_shape_info
        results = []
        for name, check in checks:
            info = check(model)
            results.append(
                EpSupport(
                    name, info.num_nodes, info.num_supported_nodes, info.num_partitions,
                    tuple(sorted(info.unsupported_ops)), info.nodes_unsupported_due_to_dynamic_input,
                    info.suitability().name,
                )
            )  # fmt: skip
    return results
