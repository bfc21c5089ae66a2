"""share: exact for weights with at most 2^b distinct values, UINT4/UINT8 index storage, budget search."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, numpy_helper

from onnxopt.manager import PassManager
from onnxopt.passes.share import ShareConfig, WeightSharePass, kmeans_1d
from onnxopt.validate import Budget
from tests import builders


def _with_levels(proto, levels, seed=0):
    """Replace every weight by values drawn from ``levels`` distinct numbers (then sharing is exact)."""
    rng = np.random.default_rng(seed)
    palette = rng.standard_normal(levels).astype(np.float32) * 0.3
    for init in proto.graph.initializer:
        if init.name.startswith("w"):
            array = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(palette[rng.integers(0, levels, array.shape)], init.name))
    return proto


def _share(proto, **config):
    model = ir.from_proto(proto)
    result = WeightSharePass(ShareConfig(**config))(model)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def test_kmeans_recovers_a_palette_exactly():
    palette = np.array([-1.5, -0.2, 0.1, 0.9])
    values = palette[np.random.default_rng(1).integers(0, 4, 500)]
    codebook, index = kmeans_1d(values, 4)
    np.testing.assert_allclose(codebook[index], values, atol=1e-12)


@pytest.mark.parametrize(("bits", "storage", "opset"), [(4, TensorProto.UINT4, 21), (8, TensorProto.UINT8, 17)])
def test_few_distinct_values_are_shared_exactly(bits, storage, opset):
    proto = _with_levels(builders.conv_net(channels=(3, 16, 16), seed=2, with_bn=False), levels=2**bits)
    result, out = _share(proto, bits=bits, min_size=100)
    assert result.modified and out.opset_import[0].version == opset
    inits = {i.name: i for i in out.graph.initializer}
    gathers = [n for n in out.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 2  # the two conv weights (the 80-value fc weight is below min_size)
    for gather in gathers:
        cast = next(n for n in out.graph.node if n.output[0] == gather.input[1])
        assert cast.op_type == "Cast" and inits[cast.input[0]].data_type == storage
    x = np.random.default_rng(3).standard_normal((4, 3, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(
        builders.run(out, {"x": x})["y"], builders.run(proto, {"x": x})["y"], rtol=1e-5, atol=1e-5
    )


def test_search_keeps_the_smallest_bits_within_the_budget(tmp_path):
    proto = builders.conv_net(channels=(3, 16, 32), seed=4, opset=17)
    path = builders.save(proto, tmp_path / "m.onnx")
    x = np.random.default_rng(5).standard_normal((32, 3, 10, 10)).astype(np.float32)
    loose = PassManager([WeightSharePass(ShareConfig(min_size=64))], data={"x": x}, budget=Budget(min_cosine=0.99),
                        simplify=False).run(path)  # fmt: skip
    tight = PassManager([WeightSharePass(ShareConfig(min_size=64))], data={"x": x}, budget=Budget(min_cosine=0.9995),
                        simplify=False).run(path)  # fmt: skip
    bits = [int(c.what.split("(")[1].split("-bit")[0]) for c in loose.passes[0].changes]
    tight_bits = [int(c.what.split("(")[1].split("-bit")[0]) for c in tight.passes[0].changes]
    assert loose.ok and tight.ok and max(bits) < max(tight_bits)
    assert loose.after.bytes < 0.4 * loose.before.bytes  # 5-bit indices are stored as uint8; tiny model


def test_bad_bits_and_no_budget():
    with pytest.raises(ValueError, match="bits"):
        ShareConfig(bits=9)
    with pytest.raises(ir.passes.PreconditionError, match="--share-bits"):
        _share(builders.conv_net(channels=(3, 16, 16)), min_size=64)
