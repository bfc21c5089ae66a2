"""Structured pruning side by side on MNIST models: onnxopt `prune` vs onnxsim 0.8.1's structured pruning.

    python bench/prune_vs_onnxsim.py --mnist ../shared/data/mnist [--shared ../shared] [--budget 0.5] [--out FILE]

Method, the same for every tool: calibration on 1,000 MNIST training images; the accuracy budget (percentage
points) is enforced on a validation split of 2,000 *training* images (50,000-51,999) that neither the
calibration nor the test set contains; the result is reported on the full 10,000-image test set. onnxopt
searches its own strength against the budget; for onnxsim (L2 and calibrated Wanda structured pruning) the
largest sparsity of 0.1, 0.2, ... 0.9 that keeps the budget on the validation split is taken.
Printed: MACs ratio and test accuracy before/after for each, as a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from _report import emit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))


def _flat(x):
    return x.reshape(len(x), 784)


def _nchw(x):
    return x.reshape(len(x), 1, 28, 28)


# name -> (path relative to its root, preprocessing of images in [0, 1], root: "models" or "shared")
MODELS = {
    "tiny_mlp": ("tiny_mlp/tiny_mlp.onnx", _flat, "models"),
    "mnist_mlp": ("mnist_mlp/mnist_mlp.onnx", _flat, "models"),
    "mnist_cnn": ("mnist_cnn/mnist_cnn.onnx", _nchw, "models"),
    "mobile_cnn": ("mobile_cnn/mobile_cnn.onnx", _nchw, "models"),
    "lenet5": ("models/mnist/mnist_lenet5_ccoltong.onnx", lambda x: (_nchw(x) - 0.1307) / 0.3081, "shared"),
    "lenet5_bn": ("models/mnist/mnist_lenet5_bn_ccoltong.onnx", _nchw, "shared"),
    "mlp6": ("models/mnist/mnist_mlp6_ccoltong.onnx", lambda x: (_nchw(x) - 0.1307) / 0.3081, "shared"),
    "mnist8": ("models/mnist/mnist8_cntk_cnn.onnx", lambda x: _nchw(x) * 255.0, "shared"),
}


def accuracy(path, x, y) -> float:
    from onnxopt.runtime import Session

    session = Session(path)
    name = session.input_names[0]
    fixed = session.inner.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else 500
    usable = len(x) - len(x) % step
    correct = 0
    for start in range(0, usable, step):
        out = session.run({name: x[start : start + step].astype(np.float32)})[session.output_names[0]]
        correct += int((out.reshape(len(out), -1).argmax(1) == y[start : start + step]).sum())
    return 100.0 * correct / usable


def macs(path) -> int:
    from onnxopt import cost, graph

    return cost.estimate(graph.load(path)).macs


def run_onnxopt(path, calib, val, budget, extra) -> Path:
    from onnxopt import graph
    from onnxopt.manager import PassManager
    from onnxopt.passes.prune import ChannelPrunePass, PruneConfig
    from onnxopt.validate import Budget

    report = PassManager(
        [ChannelPrunePass(PruneConfig(**extra))], data=calib, eval_data=val, budget=Budget(max_accuracy_drop=budget)
    ).run(path)
    out = Path(tempfile.mkdtemp()) / "onnxopt.onnx"
    graph.save(report.model, out)
    return out


def run_onnxsim(path, calib_x, val, budget, wanda: bool) -> tuple[Path | None, float]:
    import onnxsim

    name = onnx.load(str(path)).graph.input[0].name
    base = accuracy(path, *val)
    best, best_sparsity = None, 0.0
    for sparsity in np.arange(0.1, 0.95, 0.1):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                if wanda:
                    batch = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value or 32
                    samples = [{name: calib_x[i : i + batch].astype(np.float32)} for i in range(0, 256, batch)]
                    pruned = onnxsim.apply_structured_wanda_pruning(str(path), samples, sparsity=float(sparsity))
                else:
                    pruned = onnxsim.apply_structured_pruning(str(path), sparsity=float(sparsity))
        except Exception as e:  # a peer failing is a result
            logging.info("onnxsim failed at %.1f: %s", sparsity, e)
            break
        out = Path(tempfile.mkdtemp()) / f"onnxsim_{sparsity:.1f}.onnx"
        onnx.save(pruned, str(out))
        if base - accuracy(out, *val) <= budget + 1e-9:
            best, best_sparsity = out, float(sparsity)
    return best, best_sparsity


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
    from _common import load_mnist

    train_x, train_y, test_x, test_y = load_mnist(args.mnist)
    rows = []
    for name, (rel, prep, root) in MODELS.items():
        if args.only and name not in args.only.split(","):
            continue
        path = (ROOT / "models" / rel) if root == "models" else Path(args.shared) / rel
        if not path.exists():
            print(f"{name}: {path} missing, skipped", file=sys.stderr)
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        input_name = onnx.load(str(path)).graph.input[0].name
        calib_x = prep(train_x[:1000]).astype(np.float32)
        calib = {input_name: calib_x, "labels": train_y[:1000]}
        val = {input_name: prep(train_x[50000:52000]).astype(np.float32), "labels": train_y[50000:52000]}
        test = (prep(test_x).astype(np.float32), test_y)
        base_acc, base_macs = accuracy(path, *test), macs(path)
        row = {"model": name, "macs": base_macs, "acc": base_acc}
        variants = {"onnxopt": {}}
        if args.refit:
            variants["onnxopt refit"] = {"refit": True}
        for label, extra in variants.items():
            out = run_onnxopt(path, calib, val, args.budget, extra)
            row[label] = (macs(out) / base_macs, accuracy(out, *test), "")
        val_pair = (val[input_name], val["labels"])
        for label, wanda in (("onnxsim L2", False), ("onnxsim Wanda", True)):
            out, sparsity = run_onnxsim(path, calib_x, val_pair, args.budget, wanda)
            row[label] = (
                (macs(out) / base_macs, accuracy(out, *test), f"s={sparsity:.1f}") if out else (1.0, base_acc, "none")
            )
        rows.append(row)
    labels = [k for k in rows[0] if k not in ("model", "macs", "acc")] if rows else []
    lines = [
        f"Measured {datetime.date.today()}: `python bench/prune_vs_onnxsim.py --mnist DIR --budget {args.budget}`"
        f"{' --refit' if args.refit else ''}",
        "(accuracy on the full MNIST test set; the budget is checked on a validation split of training images)",
        "",
        "| model | MACs | test acc % | " + " | ".join(f"{label} MACs ratio / acc %" for label in labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for row in rows:
        cells = [row["model"], f"{row['macs']:,}", f"{row['acc']:.2f}"]
        for label in labels:
            ratio, acc, note = row[label]
            cells.append(f"{ratio:.3f} / {acc:.2f}" + (f" ({note})" if note else ""))
        lines.append("| " + " | ".join(cells) + " |")
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
