"""compact: short names and no shape annotations; outputs, graph inputs and outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt import cli
from tests import builders


def test_compact_is_exact_keeps_the_interface_and_shrinks_the_file(tmp_path, capsys):
    proto = onnx.shape_inference.infer_shapes(builders.conv_net(channels=(3, 8, 16), size=10, seed=3))
    assert proto.graph.value_info  # the input carries shape annotations to drop
    path = builders.save(proto, tmp_path / "in.onnx")
    out_path = tmp_path / "out.onnx"
    code = cli.main(["run", path, "--passes", "compact", "--no-simplify", "-o", str(out_path)])
    assert code == 0, capsys.readouterr().out
    out = onnx.load(out_path)
    onnx.checker.check_model(out, full_check=True)
    assert not out.graph.value_info
    assert [i.name for i in out.graph.input] == [i.name for i in proto.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in proto.graph.node]
    interface = {i.name for i in proto.graph.input} | {o.name for o in proto.graph.output}
    internal = [v for n in out.graph.node for v in n.output if v not in interface]
    assert internal and all(len(v) <= 2 for v in internal)
    assert out.ByteSize() < proto.ByteSize()
    x = np.random.default_rng(0).standard_normal((4, 3, 10, 10)).astype(np.float32)
    name = proto.graph.output[0].name
    np.testing.assert_array_equal(builders.run(out, {"x": x})[name], builders.run(proto, {"x": x})[name])
