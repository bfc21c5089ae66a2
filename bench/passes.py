"""onnxopt's passes alone and combined on the MNIST models: MACs, size, latency and full-test-set accuracy.

    python bench/passes.py --mnist ../shared/data/mnist [--shared ../shared] [--budget 0.5] [--out FILE]

Same method as bench/prune_vs_onnxsim.py: statistics and calibration on 1,000 training images, the accuracy
budget (percentage points) enforced on a validation split of 2,000 other training images, and the result
reported on the full 10,000-image MNIST test set. Latency: onnxruntime, 1 intra-op thread, batch as the model
takes it (1 when dynamic), median of interleaved rounds against the original.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit  # noqa: E402
from prune_vs_onnxsim import MODELS, ROOT, accuracy  # noqa: E402

PIPELINES = {
    "prune": ["prune"],
    "prune+refit": ["prune"],
    "split": ["split"],
    "svd": ["svd"],
    "quant": ["quant"],
    "share": ["share"],
    "prune+svd+quant": ["prune", "svd", "quant"],
}


def run(path, names, calib, val, budget, refit=False):
    from onnxopt import graph, registry
    from onnxopt.manager import PassManager
    from onnxopt.validate import Budget

    passes = []
    for name in names:
        options = {"refit": True} if refit and name == "prune" else {}
        if name == "quant":
            options = {"objective": "size"}
        passes.append(registry.make_pass(name, **options))
    report = PassManager(passes, data=calib, eval_data=val, budget=Budget(max_accuracy_drop=budget)).run(path)
    out = Path(tempfile.mkdtemp()) / "out.onnx"
    graph.save(report.model, out)
    return out, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", required=True)
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated keys of PIPELINES")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    sys.path.insert(0, str(ROOT / "models"))
    from _common import load_mnist

    from onnxopt import cost, data, graph
    from onnxopt.runtime import measure_latency

    train_x, train_y, test_x, test_y = load_mnist(args.mnist)
    wanted = [p for p in args.pipelines.split(",") if p]
    lines = [
        f"Measured {datetime.date.today()}: `python bench/passes.py --mnist DIR --budget {args.budget}` "
        "(accuracy on the full MNIST test set; budget checked on a validation split of training images)",
        "",
        "| model | pipeline | MACs ratio | params ratio | size ratio | latency ratio | test acc % before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (rel, prep, root) in MODELS.items():
        if args.only and name not in args.only.split(","):
            continue
        path = (ROOT / "models" / rel) if root == "models" else Path(args.shared) / rel
        if not path.exists():
            continue
        input_name = onnx.load(str(path)).graph.input[0].name
        calib = {input_name: prep(train_x[:1000]).astype(np.float32), "labels": train_y[:1000]}
        val = {input_name: prep(train_x[50000:52000]).astype(np.float32), "labels": train_y[50000:52000]}
        test = (prep(test_x).astype(np.float32), test_y)
        base_acc = accuracy(path, *test)
        base = cost.estimate(graph.load(path))
        feeds = next(iter(data.random_source(graph.load(path), seed=0))).feeds
        for key in wanted:
            print(f"{name} {key} ...", file=sys.stderr, flush=True)
            try:
                out, report = run(path, PIPELINES[key], calib, val, args.budget, refit=key == "prune+refit")
            except Exception as e:  # a failure is a result
                lines.append(f"| {name} | {key} | failed: {' '.join(str(e).split())[:80]} | | | | |")
                continue
            after = cost.estimate(graph.load(out))
            before_us, after_us = measure_latency([path, out], feeds, rounds=15)
            lines.append(
                f"| {name} | {key} | {after.macs / base.macs:.3f} | {after.params / base.params:.3f} | "
                f"{out.stat().st_size / path.stat().st_size:.3f} | {after_us.median_us / before_us.median_us:.2f} | "
                f"{base_acc:.2f} -> {accuracy(out, *test):.2f} |"
            )
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
