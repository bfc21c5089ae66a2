"""Iterative pruning with fine-tuning through the Python API: prune, fine-tune, prune again, until the budget breaks.

    python bench/prune_finetune.py --mnist ../shared/data/mnist --model mobile_cnn [--cycles 8] [--epochs 1]
    python bench/prune_finetune.py --mnist ../shared/data/mnist --model mnist_autoencoder

The ``prune`` issue's iterative cycle (the thesis prunes, then retrains). Each cycle:

1. ``prune`` (criterion ``ratio``, searched) removes what the *step* budget allows on the budget split; the step is
   measured from the original model (``--step`` pp of accuracy, or relative MSE), so what fine-tuning won back
   can be spent again;
2. :func:`onnxopt.finetune.finetune` trains the pruned model's remaining weights on the 60,000 training images
   (``--epochs`` epochs, Adam, ``--lr``) on the labels, or with ``--distill`` on the original model's logits
   (knowledge distillation), the graph unchanged;
3. the result is validated against the *original* model on the budget split with the final budget; it is accepted
   when it holds; a cycle that misses it is retried with half the step (down to 1/16 of it), and the loop
   stops when that misses too, when prune removes nothing, or after ``--cycles`` cycles.

Data, as in ``bench/_protocol.py``: calibration on training images 0-999, budgets on test images 0-4,999, results
on the held-out test images 5,000-9,999 (and the full test set for reference). Because fine-tuning adds training
epochs, the control row fine-tunes the *unpruned* model for the same total epochs: the gain that is only more
training shows there. Prints a markdown table; ``--out DIR`` writes it, ``--save PATH`` the last accepted model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _protocol  # noqa: E402

from onnxopt import cost, graph, registry  # noqa: E402
from onnxopt.data import as_source  # noqa: E402
from onnxopt.finetune import finetune  # noqa: E402
from onnxopt.finetune import logits as finetune_logits  # noqa: E402
from onnxopt.manager import PassManager  # noqa: E402
from onnxopt.runtime import Session  # noqa: E402
from onnxopt.validate import Budget, validate  # noqa: E402

ROOT = _protocol.ROOT
# name -> (model path, data, task, final budget, step budget, prune options)
SETUPS = {
    "mobile_cnn": ("mobile_cnn/mobile_cnn.onnx", "nchw", "classify", Budget(max_accuracy_drop=0.5),
                   Budget(max_accuracy_drop=1.5), {"align": 4}),
    "mnist_cnn": ("mnist_cnn/mnist_cnn.onnx", "nchw", "classify", Budget(max_accuracy_drop=0.5),
                  Budget(max_accuracy_drop=1.5), {"align": 4}),
    "mnist_autoencoder": ("mnist_autoencoder/mnist_autoencoder.onnx", "nchw", "reconstruct",
                          Budget(max_mse_increase=0.01), Budget(max_mse_increase=0.3), {"align": 1}),
    "breast_cancer_mlp": ("breast_cancer_mlp/breast_cancer_mlp.onnx", "tabular", "classify",
                          Budget(max_accuracy_drop=0.1), Budget(max_accuracy_drop=3.0), {"align": 8}),
}  # fmt: skip


def breast_cancer_splits():
    """models/apoz_mlp.py's splits of scikit-learn's breast cancer set: fit (386), validation (69), test (114) rows,
    raw features (the model folds the standardization into its first layer)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.15, stratify=train_y, random_state=0)
    return (fit_x, fit_y), (val_x, val_y), (test_x, test_y)


def channels(model) -> list[int]:
    """Output channels of each Conv/ConvTranspose/Gemm/MatMul weight, in graph order."""
    counts = []
    for node in model.graph:
        w = graph.const_array(node.inputs[1]) if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") else None
        if w is not None:
            counts.append(int(w.shape[1] * (node.attributes.get_int("group", 1)) if node.op_type == "ConvTranspose"
                              else w.shape[0] if node.op_type == "Conv" else w.shape[-1]))  # fmt: skip
    return counts


def metric(model, x, y, task) -> float:
    """Accuracy (%) or reconstruction MSE under onnxruntime with full optimizations (as deployed)."""
    with graph.temporary_model_file(model) as path:
        if task == "classify":
            return _protocol.accuracy(path, x, y)
        session = Session(path, optimize=True)
        name, out = session.input_names[0], session.output_names[0]
        errors = [float(((session.run({name: x[i : i + 500]})[out] - x[i : i + 500]) ** 2).mean())
                  for i in range(0, len(x), 500)]  # fmt: skip
        return float(np.mean(errors))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", help="directory with the MNIST idx files (the MNIST models)")
    parser.add_argument("--model", required=True, choices=sorted(SETUPS))
    parser.add_argument("--cycles", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per cycle")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--step", type=float, help="step budget: accuracy drop (pp) or relative MSE increase")
    parser.add_argument("--refit", action="store_true", help="prune with --prune-refit (least-squares re-fit)")
    parser.add_argument("--out", help="directory for the table (prune_finetune_MODEL.md)")
    parser.add_argument("--save", help="where to write the last accepted model (.onnx)")
    parser.add_argument(
        "--distill",
        action="store_true",
        help="classifiers: fine-tune on the original's logits (knowledge distillation), not the labels",
    )
    parser.add_argument(
        "--stop-at-macs",
        type=float,
        default=0.0,
        help="stop once an accepted cycle has at most this fraction of the original MACs",
    )
    parser.add_argument(
        "--control-only",
        type=int,
        metavar="EPOCHS",
        help="only the control row: the unpruned model fine-tuned for EPOCHS epochs",
    )
    args = parser.parse_args(argv)

    rel, _, task, final_budget, step_budget, options = SETUPS[args.model]
    if args.step is not None:
        field = "max_accuracy_drop" if task == "classify" else "max_mse_increase"
        step_budget = Budget(**{field: args.step})
    original = graph.load(ROOT / "models" / rel)
    name = graph.data_inputs(original)[0].name
    if args.model == "breast_cancer_mlp":
        # fine-tune and calibrate on the fit rows, budget on the validation rows, report on the test rows
        (x_train, train_y), (val_x, val_y), (test_x, test_y) = breast_cancer_splits()
        targets, loss = train_y, "cross_entropy"
        calib = {name: x_train, "labels": train_y}
        budget_data = {name: val_x, "labels": val_y}
        held = full = (test_x, test_y)
        where = "on the 69 validation rows; held-out = full test = the 114 test rows"
    else:
        if not args.mnist:
            parser.error(f"--mnist is needed for {args.model}")
        train_x, train_y, test_x, test_y = _protocol.load(args.mnist)
        x_train, x_test = _protocol._nchw(train_x).astype(np.float32), _protocol._nchw(test_x).astype(np.float32)
        if task == "classify":
            targets, loss = train_y, "cross_entropy"
            calib = {name: x_train[_protocol.CALIB], "labels": train_y[_protocol.CALIB]}
            budget_data = {name: x_test[_protocol.BUDGET], "labels": test_y[_protocol.BUDGET]}
        else:
            targets, loss = x_train, "mse"
            calib = {name: x_train[_protocol.CALIB], "labels": np.array(name)}
            budget_data = {name: x_test[_protocol.BUDGET], "labels": np.array(name)}
        held = (x_test[_protocol.HELDOUT], test_y[_protocol.HELDOUT])
        full = (x_test, test_y)
        where = "on test images 0-4,999; held-out = test images 5,000-9,999"
    if args.distill and task == "classify":  # the unpruned model teaches: its logits on the training inputs
        targets, loss = finetune_logits(original, {name: x_train}), "distill"
    unit = "accuracy %" if task == "classify" else "MSE"
    base_macs = cost.estimate(original).macs

    rows = []

    def record(label, model, seconds):
        rows.append(
            f"| {label} | {channels(model)} | {cost.estimate(model).macs / base_macs:.3f} | "
            f"{metric(model, *held, task):.6g} | {metric(model, *full, task):.6g} | {seconds:.0f} |"
        )
        print(rows[-1], flush=True)

    record("original", original, 0)
    current, epochs_spent, start = original, 0, time.time()
    cycles = args.cycles
    if args.control_only is not None:
        cycles, epochs_spent = 0, args.control_only
    # The step budget is relative to the *original* (what the current model gained by fine-tuning may be spent
    # again): accuracy drop = step + (current - original); MSE increase = (1 + step) * original / current - 1.
    field = "max_accuracy_drop" if task == "classify" else "max_mse_increase"
    first_step = getattr(step_budget, field)
    cycle, step, gained = 0, first_step, None
    while cycle < cycles:
        cycle += 1
        t0 = time.time()
        before = cost.estimate(current).macs
        if gained is None:
            allowed = step
        elif task == "classify":
            allowed = max(step + gained["after"] - gained["before"], step / 4)
        else:
            allowed = max((1 + step) * gained["before"] / gained["after"] - 1, step / 4)
        prune = registry.make_pass("prune", criterion="ratio", refit=args.refit, **options)
        report = PassManager([prune], data=calib, eval_data=budget_data, budget=Budget(**{field: allowed})).run(
            graph.clone(current)
        )
        pruned = report.model
        if cost.estimate(pruned).macs >= before:
            print(f"cycle {cycle}: prune removed nothing within the step budget; stop", flush=True)
            break
        tuned = finetune(pruned, {name: x_train}, targets, loss=loss, epochs=args.epochs, lr=args.lr, seed=cycle).model
        verdict = validate(original, tuned, as_source(budget_data, original, batch_size=500), final_budget)
        if not verdict.ok:
            print(f"cycle {cycle}: {channels(tuned)} misses the final budget ({'; '.join(verdict.failures)})")
            if step / 2 < first_step / 16:
                print("stop", flush=True)
                break
            step /= 2
            print(f"retry with half the step ({step:g})", flush=True)
            continue
        current, epochs_spent = tuned, epochs_spent + args.epochs
        gained = verdict.accuracy if task == "classify" else verdict.task_mse
        record(f"cycle {cycle}: prune + {args.epochs} epoch(s)", current, time.time() - t0)
        if cost.estimate(current).macs <= args.stop_at_macs * base_macs:
            print(f"cycle {cycle}: at most {args.stop_at_macs:g} of the MACs; stop", flush=True)
            break
    if epochs_spent:  # control: the same extra training without pruning
        t0 = time.time()
        control = finetune(original, {name: x_train}, targets, loss=loss, epochs=epochs_spent, lr=args.lr).model
        record(f"control: unpruned + {epochs_spent} epoch(s)", control, time.time() - t0)
    header = (
        f"{args.model}: iterative prune + fine-tune, `python bench/prune_finetune.py"
        f"{' --mnist DIR' if args.mnist else ''} --model {args.model} "
        f"--cycles {args.cycles} --epochs {args.epochs} --lr {args.lr:g}"
        f"{'' if args.step is None else f' --step {args.step:g}'}{' --refit' if args.refit else ''}"
        f"{' --distill' if args.distill else ''}{f' --stop-at-macs {args.stop_at_macs:g}' if args.stop_at_macs else ''}"
        f"{f' --control-only {args.control_only}' if args.control_only is not None else ''}`, "
        f"{time.strftime('%Y-%m-%d')}; final budget "
        f"{final_budget.describe()} vs the original {where}; first step budget {step_budget.describe()}; "
        f"{time.time() - start:.0f} s.\n\n"
        f"| model | channels | MACs ratio | held-out {unit} | full test {unit} | s |\n|---|---|---|---|---|---|\n"
    )
    table = header + "\n".join(rows) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"prune_finetune_{args.model}.md").write_text(table)
    if args.save:
        graph.save(current, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
