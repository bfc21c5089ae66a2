"""The corpus: every ../shared model and the onnx wheel's light models through each pass alone and the pipeline.

No crash, the result passes ``onnx.checker`` (full check) and the validation verdict is recorded (and holds:
every lossy pass searches within the budget on the same data it is validated on). A representative subset runs
by default (one model per family: opset 8, fixed batch, BatchNorm kept, residual Slice+Pad shortcuts, weights as
graph inputs, weights as Constant nodes, two outputs, pixel shuffle, one light model); ``ONNXOPT_CORPUS=full``
runs every model (about an hour on 2 cores: ``bench/corpus.py`` writes the same survey as a table).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from onnxopt import data, graph
from onnxopt.manager import PassManager
from onnxopt.validate import Budget
from tests.conftest import shared_models

LIGHT = sorted((Path(onnx.__file__).parent / "backend/test/data/light").glob("light_*.onnx"))
SUBSET = {"mnist8_cntk_cnn", "mnist_lenet5_bn_ccoltong", "cifar10_resnet20_akamaster_bn", "ultraface_version-slim-320",
          "ch_ppocr_mobile_v2.0_cls_infer", "mtcnn_pnet_facenet_pytorch", "super_resolution_core_224",
          "light_squeezenet"}  # fmt: skip
MODELS = [p for p in shared_models() + LIGHT if os.environ.get("ONNXOPT_CORPUS") == "full" or p.stem in SUBSET]
RUNS = ["simplify", "prune", "split", "svd", "share", "quant", "prune,split,svd,quant"]


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("spec", RUNS)
@pytest.mark.parametrize("path", MODELS or [None], ids=lambda p: p.stem if p is not None else "absent")
def test_corpus_model_through_each_pass(path, spec, tmp_path, shared_dir):
    if path is None:
        pytest.skip("no corpus model found")
    ref = path.with_name(path.name.replace(".onnx", ".ref.npz"))
    source = ref if ref.exists() else data.random_source(graph.load(path), samples=4, seed=0)
    names = spec.split(",")
    budget = None if names == ["simplify"] else Budget(min_cosine=0.99)
    report = PassManager(names, data=source, budget=budget).run(path)
    out = tmp_path / "out.onnx"
    graph.save(report.model, out)
    onnx.checker.check_model(str(out), full_check=True)
    assert report.validation is not None and report.validation.samples > 0
    assert report.ok, report.validation.failures
    for record in report.passes:  # every pass says what it did or why not
        assert record.modified == bool(record.changes) or record.name == "simplify", record
