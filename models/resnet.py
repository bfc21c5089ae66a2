"""Build the ImageNet ResNet-34 and ResNet-50 of He et al. 2015 (the thesis's Table 2.3) as ONNX, random weights.

    python models/resnet.py --arch resnet50 -o /tmp/resnet50.onnx

The layouts follow the paper's Table 1 (= the thesis's Table 2.3): conv1 7×7/2 with 64 channels, 3×3/2 max
pool, then four stages of [3, 4, 6, 3] blocks with 64, 128, 256, 512 base channels, global average pool,
1000-d fc and softmax. ResNet-34 stacks basic blocks (two 3×3 convs); ResNet-50 stacks bottlenecks
(1×1 → 3×3 → 1×1 with 4× expansion) and, as in the paper's original model, downsamples with stride 2 in
the first 1×1 convolution of a stage (torchvision's "v1.5", and the onnx wheel's light_resnet50, put the
stride on the 3×3 instead: 4.09 instead of 3.86 GMACs). Shortcuts that change shape are 1×1 projections
(option B). Every conv is followed by BatchNormalization. Weights are He-initialized from a fixed seed:
the models serve the cost model (3.6 and 3.8 GMACs in the table) and large-model scale tests, not accuracy.
Nothing is committed: the ResNet-50 file is about 100 MB.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STAGES = {"resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3])}
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 rejects


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, relu: bool, prefix: str) -> str:
        std = np.sqrt(2.0 / (cin * k * k))
        w = self._init(f"{prefix}.weight", self.rng.standard_normal((cout, cin, k, k)) * std)
        conv_out = f"{prefix}.conv"
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv", [x, w], [conv_out], name=f"{prefix}/Conv", kernel_shape=[k, k], strides=[stride, stride],
                pads=[pad] * 4,
            )
        )  # fmt: skip
        scale = self._init(f"{prefix}.bn.scale", 0.5 + 0.1 * self.rng.random(cout))
        bias = self._init(f"{prefix}.bn.bias", 0.1 * self.rng.standard_normal(cout))
        mean = self._init(f"{prefix}.bn.mean", 0.1 * self.rng.standard_normal(cout))
        var = self._init(f"{prefix}.bn.var", 1.0 + 0.1 * self.rng.random(cout))
        bn_out = f"{prefix}.bn"
        self.nodes.append(
            helper.make_node("BatchNormalization", [conv_out, scale, bias, mean, var], [bn_out], name=f"{prefix}/BN")
        )
        if not relu:
            return bn_out
        out = f"{prefix}.relu"
        self.nodes.append(helper.make_node("Relu", [bn_out], [out], name=f"{prefix}/Relu"))
        return out

    def add_relu(self, a: str, b: str, prefix: str) -> str:
        self.nodes.append(helper.make_node("Add", [a, b], [f"{prefix}.add"], name=f"{prefix}/Add"))
        self.nodes.append(helper.make_node("Relu", [f"{prefix}.add"], [f"{prefix}.out"], name=f"{prefix}/Relu"))
        return f"{prefix}.out"


def build(arch: str = "resnet50", *, seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """The ResNet as an ONNX model (opset 13, input ``input`` [batch, 3, 224, 224], output ``prob``)."""
    if arch not in STAGES:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(STAGES)}")
    kind, counts = STAGES[arch]
    b = _Builder(seed)
    x = b.conv_bn("input", 3, 64, 7, 2, True, "conv1")
    b.nodes.append(
        helper.make_node("MaxPool", [x], ["pool1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    )
    x, cin = "pool1", 64
    for stage, (blocks, width) in enumerate(zip(counts, [64, 128, 256, 512], strict=True), start=2):
        for block in range(blocks):
            prefix = f"conv{stage}_{block + 1}"
            stride = 2 if block == 0 and stage > 2 else 1
            if kind == "basic":
                cout = width
                y = b.conv_bn(x, cin, width, 3, stride, True, f"{prefix}.a")
                y = b.conv_bn(y, width, width, 3, 1, False, f"{prefix}.b")
            else:
                cout = 4 * width
                y = b.conv_bn(x, cin, width, 1, stride, True, f"{prefix}.a")
                y = b.conv_bn(y, width, width, 3, 1, True, f"{prefix}.b")
                y = b.conv_bn(y, width, cout, 1, 1, False, f"{prefix}.c")
            shortcut = x
            if stride != 1 or cin != cout:
                shortcut = b.conv_bn(x, cin, cout, 1, stride, False, f"{prefix}.proj")
            x, cin = b.add_relu(y, shortcut, prefix), cout
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    b.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    fc_w = b._init("fc.weight", b.rng.standard_normal((1000, cin)) * np.sqrt(1.0 / cin))
    fc_b = b._init("fc.bias", np.zeros(1000))
    b.nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["logits"], name="fc", transB=1))
    b.nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1))
    graph = helper.make_graph(
        b.nodes,
        arch,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 224, 224])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [batch, 1000])],
        b.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=IR_VERSION, producer_name="onnxopt/models"
    )
    model.doc_string = f"{arch} as in He et al. 2015 Table 1, random weights (seed {seed})"
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(STAGES), default="resnet50")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = build(args.arch, seed=args.seed)
    onnx.checker.check_model(model)
    onnx.save(model, args.output)
    print(f"wrote {args.output} ({model.ByteSize() / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
