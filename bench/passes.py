"""onnxopt's passes alone and combined on the MNIST models: MACs, size, latency and held-out accuracy.

    python bench/passes.py --mnist ../shared/data/mnist [--shared ../shared] [--budget 0.5] [--out FILE]

Protocol (bench/_protocol.py, the same as bench/prune_vs_onnxsim.py and bench/run.py): statistics and
calibration on MNIST training images 0-999, the accuracy budget (percentage points) enforced on test images
0-4,999, the result reported on the held-out test images 5,000-9,999 (full test set beside it for reference).
``quant`` runs with ``objective="size"`` here, so it keeps int8 even where int8 is slower (by default it keeps
float there; bench/run.py shows both). Latency: onnxruntime, 1 intra-op thread, batch as the model takes it
(1 when dynamic), median of interleaved rounds against the original.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import PROTOCOL, ROOT, accuracy, cases, load  # noqa: E402
from _report import emit  # noqa: E402

SIZE = {"objective": "size"}
# label -> [(pass name, options)]
PIPELINES = {
    "prune": [("prune", {})],
    "prune+refit": [("prune", {"refit": True})],
    "split": [("split", {})],
    "svd": [("svd", {})],
    "quant": [("quant", SIZE)],
    "quant+compact": [("quant", SIZE), ("compact", {})],
    "share": [("share", {})],
    "prune+svd+quant": [("prune", {}), ("svd", {}), ("quant", SIZE)],
}


def run(path, steps, calib, val, budget):
    """onnxopt's PassManager on ``path`` with ``steps`` [(pass, options)]; returns (output path, report)."""
    from onnxopt import graph, registry
    from onnxopt.manager import PassManager
    from onnxopt.validate import Budget

    passes = [registry.make_pass(name, **options) for name, options in steps]
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
    parser.add_argument("--rounds", type=int, default=21, help="interleaved latency rounds")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from onnxopt import cost, graph
    from onnxopt.runtime import measure_latency

    wanted = [p for p in args.pipelines.split(",") if p]
    lines = [
        f"Measured {datetime.date.today()}: `python bench/passes.py --mnist DIR --budget {args.budget}`",
        "",
        f"Protocol: {PROTOCOL}. `quant` keeps int8 even where it is slower (objective size).",
        "",
        "| model | pipeline | MACs ratio | params ratio | size ratio | latency ratio | held-out acc % before -> after "
        "| full-test acc % before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases(load(args.mnist), args.shared, args.only):
        path = case.path
        base_heldout, base_test = accuracy(path, *case.heldout), accuracy(path, *case.test)
        base = cost.estimate(graph.load(path))
        feeds = {case.input_name: case.heldout[0][: case.batch or 1]}
        for key in wanted:
            print(f"{case.name} {key} ...", file=sys.stderr, flush=True)
            try:
                out, report = run(path, PIPELINES[key], case.calib, case.budget_data, args.budget)
            except Exception as e:  # a failure is a result
                lines.append(f"| {case.name} | {key} | failed: {' '.join(str(e).split())[:80]} | | | | | |")
                continue
            after = cost.estimate(graph.load(out))
            before_us, after_us = measure_latency([path, out], feeds, rounds=args.rounds)
            lines.append(
                f"| {case.name} | {key} | {after.macs / base.macs:.3f} | {after.params / base.params:.3f} | "
                f"{out.stat().st_size / path.stat().st_size:.3f} | {after_us.median_us / before_us.median_us:.2f} | "
                f"{base_heldout:.2f} -> {accuracy(out, *case.heldout):.2f} | "
                f"{base_test:.2f} -> {accuracy(out, *case.test):.2f} |"
            )
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
