"""Structured pruning side by side on MNIST models: onnxopt `prune` vs onnxsim 0.8.1's structured pruning.

    python bench/prune_vs_onnxsim.py --mnist ../shared/data/mnist [--shared ../shared] [--budget 0.5] [--out FILE]

Method, the same for every tool (bench/_protocol.py): calibration on MNIST training images 0-999; the accuracy
budget (percentage points) is enforced on test images 0-4,999 (the models were trained on most of the
training set, so no training image is a fair judge); the result is reported on the held-out test images
5,000-9,999, with the full test set beside it for reference. onnxopt searches its own strength against the
budget; for onnxsim (L2 and calibrated Wanda structured pruning) the largest sparsity of 0.1, 0.2, ... 0.9
that keeps the budget on the budget split is taken. Printed: MACs ratio and accuracy for each, as a markdown
table. bench/run.py runs the same comparison with latency, size and quantization peers.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import PROTOCOL, ROOT, accuracy, cases, load, macs  # noqa: E402
from _report import emit  # noqa: E402
from run import _onnxsim_prune  # noqa: E402


def run_onnxopt(case, budget, extra) -> Path:
    from onnxopt import graph
    from onnxopt.manager import PassManager
    from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
    from onnxopt.validate import Budget

    report = PassManager(
        [ChannelPrunePass(PruneConfig(**extra))],
        data=case.calib,
        eval_data=case.budget_data,
        budget=Budget(max_accuracy_drop=budget),
    ).run(case.path)
    out = Path(tempfile.mkdtemp()) / "onnxopt.onnx"
    graph.save(report.model, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", required=True, help="directory with the MNIST IDX files")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--budget", type=float, default=0.5, help="accuracy drop allowed, percentage points")
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--refit", action="store_true", help="also run onnxopt with --prune-refit")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rows = []
    for case in cases(load(args.mnist), args.shared, args.only):
        print(f"{case.name} ...", file=sys.stderr, flush=True)
        base_macs = macs(case.path)
        row = {"model": case.name, "macs": base_macs, "acc": accuracy(case.path, *case.heldout)}
        outs = {"onnxopt": (run_onnxopt(case, args.budget, {}), "")}
        if args.refit:
            outs["onnxopt refit"] = (run_onnxopt(case, args.budget, {"refit": True}), "")
        for label, wanda in (("onnxsim L2", False), ("onnxsim Wanda", True)):
            outs[label] = _onnxsim_prune(wanda, args.budget)(case, Path(tempfile.mkdtemp()))
        for label, (out, note) in outs.items():
            row[label] = (macs(out) / base_macs, accuracy(out, *case.heldout), accuracy(out, *case.test), note)
        rows.append(row)
    labels = [k for k in rows[0] if k not in ("model", "macs", "acc")] if rows else []
    lines = [
        f"Measured {datetime.date.today()}: `python bench/prune_vs_onnxsim.py --mnist DIR --budget {args.budget}`"
        f"{' --refit' if args.refit else ''}",
        "",
        f"Protocol: {PROTOCOL}. Cells: MACs ratio / held-out accuracy % (full-test accuracy %).",
        "",
        "| model | MACs | held-out acc % | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for row in rows:
        cells = [row["model"], f"{row['macs']:,}", f"{row['acc']:.2f}"]
        for label in labels:
            ratio, acc, test, note = row[label]
            cells.append(f"{ratio:.3f} / {acc:.2f} ({test:.2f})" + (f", {note}" if note else ""))
        lines.append("| " + " | ".join(cells) + " |")
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
