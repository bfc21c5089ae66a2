"""What dropping one residual block costs a CNN's top-1, without retraining (depth pruning, measured, not a pass).

    python bench/block_drop.py MODEL.onnx --calib CALIB.npz --eval EVAL.npz [--out FILE]

For every residual ``Add`` of MODEL (both inputs computed by the graph), the branch (the input computed later) is
replaced by a constant: zeros (the block removed) or the branch's per-channel mean over the first 64 CALIB samples
(the block removed and its average output kept, as ``prune --prune-refit`` keeps a removed channel's mean). Each
variant's top-1 on EVAL (``input`` and ``labels`` arrays) is compared with the original's; onnxruntime, all
optimizations. Prints a markdown table and writes it to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    calib = np.load(args.calib)["input"][:64]
    evaluation = np.load(args.eval)
    images, labels = evaluation["input"], evaluation["labels"]

    def session(model: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def top1(model: onnx.ModelProto) -> float:
        s = session(model)
        name = s.get_inputs()[0].name
        scores = np.concatenate([s.run(None, {name: images[i : i + 50]})[0] for i in range(0, len(images), 50)])
        return 100.0 * float((scores.argmax(1) == labels).mean())

    original = onnx.load(args.model)
    made_at = {out: i for i, node in enumerate(original.graph.node) for out in node.output}
    adds = [n for n in original.graph.node if n.op_type == "Add" and all(i in made_at for i in n.input)]
    branches = [max(a.input, key=lambda t: made_at[t]) for a in adds]
    probe = onnx.load(args.model)
    for branch in branches:
        probe.graph.output.append(helper.make_tensor_value_info(branch, onnx.TensorProto.FLOAT, None))
    s = session(probe)
    name = s.get_inputs()[0].name
    outs = [s.run(branches, {name: calib[i : i + 16]}) for i in range(0, len(calib), 16)]
    means = [np.concatenate([o[k] for o in outs]).mean(axis=(0, 2, 3)) for k in range(len(branches))]
    base = top1(original)
    lines = [
        f"`python bench/block_drop.py {args.model.name} --calib {args.calib.name} --eval {args.eval.name}`, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: top-1 {base:.2f}% on {len(labels)} images; "
        "the change in top-1 (pp) with one residual branch replaced by a constant.",
        "",
        "| residual Add | zeros | per-channel mean |",
        "|---|---|---|",
    ]
    for k, add in enumerate(adds):
        cells = []
        for constant in (np.zeros_like(means[k]), means[k]):
            model = onnx.load(args.model)
            node = next(n for n in model.graph.node if n.name == add.name)
            tensor = f"block_drop_{k}"
            model.graph.initializer.append(
                numpy_helper.from_array(constant.reshape(1, -1, 1, 1).astype(np.float32), tensor)
            )
            node.input[list(node.input).index(branches[k])] = tensor
            cells.append(f"{top1(model) - base:+.2f}")
        lines.append(f"| {add.name} | {' | '.join(cells)} |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
