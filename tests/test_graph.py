"""Loading, saving and constant helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import graph
from onnxopt.errors import ModelLoadError, ModelSaveError
from tests import builders


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        graph.load(tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        graph.load(tmp_path / "empty.onnx")
    (tmp_path / "text.onnx").write_text("hello, this is not a model\n" * 20)
    with pytest.raises(ModelLoadError):
        graph.load(tmp_path / "text.onnx")
    whole = builders.mlp().SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelLoadError):
        graph.load(tmp_path / "cut.onnx")
    with pytest.raises(ModelLoadError, match="directory"):
        graph.load(tmp_path)


def test_load_upgrades_old_opsets_and_rejects_new_ones_and_checker_failures(tmp_path):
    old = builders.conv_net(opset=6, with_bn=True, batch=2)  # BatchNormalization-6 has no onnxruntime kernel
    old.ir_version = 3  # IR 3 lists every weight as a graph input too
    old.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, i.dims) for i in old.graph.initializer)
    builders.save(old, tmp_path / "old.onnx")
    upgraded = graph.load(tmp_path / "old.onnx")
    assert graph.default_opset(upgraded) == graph.MIN_OPSET
    x = np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)
    expected = builders.run(builders.conv_net(opset=17, with_bn=True), {"x": x})["y"]
    np.testing.assert_allclose(builders.run(graph.to_proto(upgraded), {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
    new = builders.mlp()
    new.opset_import[0].version = 27
    onnx.save(new, tmp_path / "new.onnx")
    with pytest.raises(ModelLoadError, match="opset 27 is not supported"):
        graph.load(tmp_path / "new.onnx")
    broken = builders.mlp()
    broken.graph.node[0].input[1] = "does_not_exist"
    builders.save(broken, tmp_path / "broken.onnx")
    with pytest.raises(ModelLoadError, match="checker"):
        graph.load(tmp_path / "broken.onnx")


def test_weights_as_graph_inputs_and_constant_nodes_are_constants(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(2, np.float32), "cv")),
        helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1),
    ]
    proto = builders.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]), helper.make_tensor_value_info("w", 1, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "w")],
        ir_version=3,
        opset=8,
    )
    model = graph.load(builders.save(proto, tmp_path / "m.onnx"))
    assert [v.name for v in graph.data_inputs(model)] == ["x"]
    gemm = model.graph.node(1)
    np.testing.assert_array_equal(graph.const_array(gemm.inputs[1]), w)
    np.testing.assert_array_equal(graph.const_array(gemm.inputs[2]), np.ones(2, np.float32))
    assert graph.const_array(gemm.inputs[0]) is None


def test_save_is_atomic_and_clamps_ir_version(tmp_path):
    model = ir.from_proto(builders.mlp())
    model.ir_version = 14
    out = graph.save(model, tmp_path / "out.onnx")
    assert onnx.load(str(out)).ir_version == graph.MAX_IR_VERSION
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # no temporary left behind
    with pytest.raises(ModelSaveError, match="is a directory"):
        graph.save(model, tmp_path)
    with pytest.raises(ModelSaveError, match="does not exist"):
        graph.save(model, tmp_path / "no" / "such" / "dir.onnx")


def test_save_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    model = ir.from_proto(builders.mlp())

    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", explode)
    with pytest.raises(ModelSaveError, match="No space left"):
        graph.save(model, tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_large_weights_go_to_external_data(tmp_path, monkeypatch):
    """Above the threshold the weights are written to <name>.data; the model still loads and runs the same."""
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 100)
    proto = builders.mlp(sizes=(64, 64, 4))
    model = ir.from_proto(proto)
    out = graph.save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size >= 64 * 64 * 4
    reloaded = graph.load(out)
    from onnxopt.runtime import Session

    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    session = Session(reloaded)  # too big for one protobuf (the threshold): opened through a temporary file
    assert session.path is not None and session.path.name == "model.onnx"
    np.testing.assert_array_equal(session.run({"x": x})["y"], builders.run(proto, {"x": x})["y"])
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]


def test_a_session_of_a_model_opens_from_memory_with_the_weights_of_its_data_file(tmp_path):
    """A model whose initializers are in its .data file opens from memory (the weights copied into the bytes: no
    temporary file), computes what the file-backed session computes, and the model is left as it was."""
    from onnxopt.runtime import Session

    proto = builders.mlp(sizes=(64, 64, 4))
    out = graph.save(ir.from_proto(proto), tmp_path / "m.onnx", external_data=True)
    reloaded = graph.load(out)

    def on_file():
        return [n for n, v in reloaded.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)]

    external = on_file()
    assert external
    session = Session(reloaded)
    assert session.path is None and session.model is reloaded
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(session.run({"x": x})["y"], Session(out).run({"x": x})["y"])
    assert on_file() == external
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def test_add_initializer_keeps_the_array_shape_scalars_included():
    """A 0-d array is registered as a scalar (np.ascontiguousarray alone would make it 1-d), with a fresh name."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    placeholder = numpy_helper.from_array(np.array(1.0, np.float32), "s0")
    proto = builders.make_model([helper.make_node("Mul", ["x", "s0"], ["y"])], [x], [y], [placeholder])
    model = ir.from_proto(proto)
    scale = graph.add_initializer(model.graph, "s", np.array(3.0, np.float32))
    column = graph.add_initializer(model.graph, "s", np.arange(6, dtype=np.int64).reshape(2, 3).T)
    assert scale.name == "s" and column.name == "s_1"
    assert scale.shape == ir.Shape([]) and scale.const_value.numpy().shape == ()
    np.testing.assert_array_equal(column.const_value.numpy(), np.arange(6).reshape(2, 3).T)
    model.graph.node(0).replace_input_with(1, scale)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    got = builders.run(out, {"x": np.ones((2, 3), np.float32)})["y"]
    np.testing.assert_array_equal(got, np.full((2, 3), 3.0, np.float32))


def test_shape_text_writes_dims_with_a_mark_for_the_unknown_ones():
    assert graph.shape_text([1, 3, 224, 224]) == "1x3x224x224"
    assert graph.shape_text([None, 3, None]) == "?x3x?"
    assert graph.shape_text([None, 64], "N") == "Nx64"
    assert graph.shape_text(()) == ""  # a scalar: callers write their own word for it
    assert graph.shape_text(ir.Shape(["batch", 8])) == "batchx8"  # a symbolic dim keeps its name


def test_save_as_written_drops_intermediate_annotations_only_when_the_source_has_none(tmp_path):
    """What is timed is what the run writes (graph.save_as_written, file_as_written): a source without
    intermediate shape annotations gives files without them; one with them keeps them. The initializers' own
    entries, which onnx_ir writes in every file, are not annotations of intermediate values."""
    bare = builders.conv_net(seed=1)
    annotated = onnx.shape_inference.infer_shapes(bare)
    bare_path = Path(builders.save(bare, tmp_path / "bare.onnx"))
    annotated_path = Path(builders.save(annotated, tmp_path / "annotated.onnx"))
    assert not graph.has_value_info(bare_path) and graph.has_value_info(annotated_path)
    model = graph.load(annotated_path)
    before = ir.to_proto(model).SerializeToString()
    written = graph.save_as_written(model, tmp_path / "w1.onnx", bare_path)
    assert not graph.has_value_info(written)
    assert ir.to_proto(model).SerializeToString() == before  # the model in hand keeps its annotations
    assert graph.has_value_info(graph.save_as_written(model, tmp_path / "w2.onnx", annotated_path))
    # a file: itself when the source keeps annotations or it has none, else a copy without them
    assert graph.file_as_written(annotated_path, annotated_path, tmp_path / "c1.onnx") == annotated_path
    assert graph.file_as_written(bare_path, bare_path, tmp_path / "c2.onnx") == bare_path
    copy = graph.file_as_written(annotated_path, bare_path, tmp_path / "c3.onnx")
    assert copy == tmp_path / "c3.onnx" and not graph.has_value_info(copy)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)}
    np.testing.assert_array_equal(builders.run(onnx.load(copy), feeds)["y"], builders.run(annotated, feeds)["y"])
