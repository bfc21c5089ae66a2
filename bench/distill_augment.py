"""Does `distill` recover a pruned image model on held-out images, with and without augmentation?

For each model: prune it past its budget (a fixed uniform ratio, or the budget search at a loose drop), then run the
`distill` pass on the pruned model with the original as the teacher, once per variant (augmentation on or off,
learning rate), from the same pruned model. Augmentation on is the pass's default: the views, then the images as
given when the views do not lower the held-out loss (the loss column then shows both). Reported: the pass's own
held-out distillation loss (on onnxopt's `--eval` data, which decides whether the trained weights are kept), and
top-1 on the budget split and on the held-out split of bench/real.py's protocol (`_real_tasks`), which no step saw.

    python bench/distill_augment.py --shared ../shared --out bench/results/distill_augment.md
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_tasks  # noqa: E402

from onnxopt import PassManager, registry  # noqa: E402
from onnxopt import data as data_mod  # noqa: E402
from onnxopt.pass_base import PassContext  # noqa: E402
from onnxopt.validate import Budget  # noqa: E402

# (task, how it is pruned: pass options and the budget of its search, distill epochs)
SETUPS = {
    "resnet20": ({"criterion": "ratio", "ratio": 0.25, "refit": True, "latency_guard": False}, 100.0, 20),
    "mobilenet_v2": ({"refit": True}, 3.0, 10),
}
VARIANTS = [(False, 1e-5), (True, 1e-5), (False, 1e-4), (True, 1e-4)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, required=True)
    parser.add_argument("--only", default=",".join(SETUPS))
    parser.add_argument("--variants", default="all", help="'all' or e.g. 'on:1e-5,off:1e-5'")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distill_augment"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants = VARIANTS if args.variants == "all" else [
        (v.split(":")[0] == "on", float(v.split(":")[1])) for v in args.variants.split(",")]  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    title = f"# `distill` on pruned image models, with and without augmentation ({time.strftime('%Y-%m-%d %H:%M')})"
    lines = [title, "", f"Command: `python bench/distill_augment.py {' '.join(sys.argv[1:])}`", ""]
    for name in args.only.split(","):
        lines += run_task(args.shared, name, variants, args.work)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def run_task(shared: Path, name: str, variants, work: Path) -> list[str]:
    task = (_real_tasks.cifar if name.startswith("resnet") else _real_tasks.imagenet)(shared, name, False)
    prune_options, drop, epochs = SETUPS[name]
    budget = Budget(max_metric_drop=drop)
    started = time.time()
    pruned = PassManager([registry.make_pass("prune", **prune_options)], data=task.calib, eval_data=task.budget_data,
                         budget=budget, metric="top1").run(str(task.model)).model  # fmt: skip
    prune_s = time.time() - started
    path = work / f"{name}.pruned.onnx"
    from onnxopt import graph as graph_io

    graph_io.save(pruned, path)
    x, y = task.report["input"], task.report["labels"]
    held = task.heldout
    split = np.setdiff1d(np.arange(len(y)), held)
    score = lambda m: (_real_tasks._top1(m, x[split], y[split]), _real_tasks._top1(m, x[held], y[held]))  # noqa: E731
    base, start = score(task.model), score(path)
    rows = [f"## {name}", "", task.protocol, "",
            f"Pruned with `prune` {prune_options} (search budget {drop} pp on the budget split), {prune_s:.0f} s: "
            f"top-1 drop {base[0] - start[0]:+.2f} pp on the budget split, {base[1] - start[1]:+.2f} pp held out. "
            f"Then `distill` for {epochs} epochs on the {len(next(iter(task.calib.values())))} calibration images.",
            "", "| augment | lr | held-out distillation loss (the pass's --eval) | kept | top-1 drop, budget split "
            "| top-1 drop, held out | wall |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for augment, lr in variants:
        model = graph_io.load(path)
        data = data_mod.as_source(task.calib, model, what="calibration data")
        evaluation = data_mod.as_source(task.budget_data, model, what="evaluation data")
        step = registry.make_pass("distill", epochs=epochs, lr=lr, augment=augment)
        step.context = PassContext(budget=budget, data=data, eval_data=evaluation, original=Path(task.model))
        started = time.time()
        result = step(model)
        seconds = time.time() - started
        what = result.changes[0].what if result.changes else result.skipped[0].reason
        loss = what
        if "distillation loss" in what:  # "B -> A on N held-out samples; ...[; then -> A2 on ...; the images as given]"
            before, *after = re.findall(r"(?:loss |-> )([0-9.eE+-]+)", what)
            loss = f"{before} -> {after[0]}" + (f" (views), {after[1]} (as given)" if len(after) > 1 else "")
        out = work / f"{name}.distilled.{'aug' if augment else 'plain'}.{lr:g}.onnx"
        graph_io.save(result.model, out)
        got = score(out)
        rows.append(f"| {'on' if augment else 'off'} | {lr:g} | {loss} | {'yes' if result.modified else 'no'} | "
                    f"{base[0] - got[0]:+.2f} | {base[1] - got[1]:+.2f} | {seconds:.0f} s |")  # fmt: skip
        print(rows[-1], flush=True)
    return rows + [""]


if __name__ == "__main__":
    sys.exit(main())
