"""Every third-party model in ../shared/models: loads, inspects, round-trips unchanged, simplifies exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt import cli
from onnxopt.passes.simplify import SimplifyConfig
from tests import builders
from tests.conftest import shared_models

MODELS = shared_models() or [pytest.param(None, marks=pytest.mark.skip(reason="../shared is absent"))]


def _ids(path):
    return path.stem if path is not None else "absent"


def _reference(path):
    ref = np.load(str(path).replace(".onnx", ".ref.npz"))
    feeds = {k.removeprefix("input__"): ref[k] for k in ref.files if k.startswith("input__")}
    outputs = {k.removeprefix("output__"): ref[k] for k in ref.files if k.startswith("output__")}
    return feeds, outputs


def _run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _run_report(capsys, tmp_path, path, passes, *extra):
    """``onnxopt run`` with a report; asserts exit 0 and an exact-budget, passing validation."""
    out_path, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, out, err = _run_cli(capsys, "run", path, "--passes", passes, "-o", out_path, "--report", report_path, *extra)
    assert code == 0, out + err
    report = json.loads(report_path.read_text())
    assert report["validation"]["ok"] and report["validation"]["budget"] == {"max_abs": 1e-5}
    return report


def _round_trip(tmp_path, path, data=None):
    """Load, no pass, exact validation, save: the Python API (`onnxopt run` without passes is 'nothing to do')."""
    from onnxopt import graph
    from onnxopt.manager import PassManager

    result = PassManager([], data=data).run(path)
    graph.save(result.model, tmp_path / "out.onnx")
    report = result.to_json()
    assert report["validation"]["ok"] and report["validation"]["budget"] == {"max_abs": 1e-5}
    return report


@pytest.mark.shared
@pytest.mark.parametrize("path", MODELS, ids=_ids)
def test_round_trip_and_inspect(path, tmp_path, capsys):
    report = _round_trip(tmp_path, path, str(path).replace(".onnx", ".ref.npz"))
    assert all(o["max_abs"] == 0 for o in report["validation"]["outputs"].values())
    feeds, expected = _reference(path)
    got = builders.run(onnx.load(tmp_path / "out.onnx"), feeds)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], builders.run(onnx.load(path), feeds)[name])
        np.testing.assert_allclose(got[name], array, rtol=1e-4, atol=1e-4)  # the stored reference output
    shape_args = [f"--input-shape={name}={','.join(map(str, a.shape))}" for name, a in feeds.items()]
    code, out, err = _run_cli(capsys, "inspect", path, *shape_args)
    assert code == 0 and "total:" in out and "note:" not in out, out + err


@pytest.mark.shared
@pytest.mark.parametrize("path", MODELS, ids=_ids)
def test_simplify_is_exact(path, tmp_path, capsys):
    _run_report(capsys, tmp_path, path, "simplify", "--data", str(path).replace(".onnx", ".ref.npz"))


LIGHT = sorted((Path(onnx.__file__).parent / "backend/test/data/light").glob("light_*.onnx"))


@pytest.mark.parametrize("path", LIGHT, ids=lambda p: p.stem)
def test_onnx_wheel_light_models_round_trip_and_simplify_exactly(path, tmp_path, capsys):
    _round_trip(tmp_path, path)
    _run_report(capsys, tmp_path, path, "simplify")
    # ConstantOfShape placeholder weights became initializers (but those over the fold limit, vgg19's fc6)
    optimized = onnx.load(tmp_path / "out.onnx")
    inits = {i.name for i in optimized.graph.initializer}
    left = [n for n in optimized.graph.node if n.op_type == "ConstantOfShape"]
    limit = SimplifyConfig().fold_limit
    assert all(np.prod(numpy_helper.to_array(_init(optimized, n.input[0]))) > limit for n in left)
    for node in optimized.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] not in inits:
            assert node.input[1] in {out for n in left for out in n.output}


def _init(model, name):
    return next(i for i in model.graph.initializer if i.name == name)
