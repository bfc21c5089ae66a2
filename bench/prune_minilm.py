"""Issue 17's pruning acceptance on paraphrase-MiniLM-L3-v2: heads and FFN neurons at their own ratios, then distill.

    python bench/prune_minilm.py --data-dir D --heads 0.34 --ffn 0.4375 -o pruned.onnx \
        [--distill-data D/calib4k.npz --distill-epochs 3 --distill-hidden] [--no-refit]

``D`` holds ``calib_spread.npz`` (prune statistics and refit), ``dev.npz`` (the distill pass's held-out judge and
the run's validation) and ``test.npz`` (all 1,379 sts-test pairs, only for the reported figure), made with
``models/stsb_data.py`` (bench/results/prune_minilm.md says how).

1. ``simplify, prune, simplify`` as ``onnxopt run --passes prune --prune-refit`` does, except that the attention
   heads and the FFN neurons of each layer get their own ratio (``--heads``, ``--ffn``: one value, or one per
   layer): ``prune --prune-ratio`` applies one ratio to both, and its search sets such per-group ratios only
   through the budget. The ratios are set here through the pass's per-group ratios (a subclass; the CLI has no
   flag for them). Removed per layer: ``floor(ratio × count)`` heads, and as many FFN neurons rounded to keep a
   multiple of 8.
2. optionally ``distill`` against the original on ``--distill-data`` (e.g. a few thousand sts-train sentences; the
   prune statistics stay on calib_spread): the Python API's ``PassManager.run(pruned, original=...)``, as one
   ``onnxopt run --passes prune,distill`` would with a single data file.
3. MACs (onnxopt's count at 1 × 23 and 1 × 46 tokens) and ``onnxopt validate ORIGINAL OUT --data test.npz --metric
   spearman --metric-output 461 --max-metric-drop 1`` (the drop and its 95% interval).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ratios(text: str) -> list[float]:
    values = [float(x) for x in text.split(",")]
    return values * 3 if len(values) == 1 else values


def prune(model: Path, data_dir: Path, heads: list[float], ffn: list[float], refit: bool):
    """The model pruned with per-layer head and FFN ratios (and refit), validated on dev.npz."""
    from onnxopt import registry
    from onnxopt.manager import PassManager
    from onnxopt.passes import prune as prune_mod
    from onnxopt.validate import Budget

    class KindRatioPrune(prune_mod.ChannelPrunePass):
        def _choose_setting(self, model, *rest):  # (model, [analysis,] scored): the signature varies
            scored = rest[-1]
            analysis = self._analyze(model)
            owner = analysis._slot_owner()
            head_spaces = {id(space.value) for space in analysis.head_inputs}
            kinds: dict[int, set[bool]] = {}
            for item in scored.values():
                heads_here = any(id(owner[slot].value) in head_spaces for slot in item.unit.slots)
                kinds.setdefault(item.unit.group, set()).add(heads_here)
            sizes = {g: sum(1 for i in scored.values() if i.unit.group == g) for g in kinds}
            head_groups = sorted(g for g, k in kinds.items() if True in k)
            ffn_groups = sorted(g for g, k in kinds.items() if True not in k and sizes[g] > 1)
            if len(head_groups) != len(heads) or len(ffn_groups) != len(ffn):
                raise SystemExit(f"{len(head_groups)} head groups and {len(ffn_groups)} FFN groups, ratios for "
                                 f"{len(heads)} and {len(ffn)}")  # fmt: skip
            return 0.0, dict(zip(head_groups, heads, strict=True)) | dict(zip(ffn_groups, ffn, strict=True))

    config = prune_mod.PruneConfig(criterion="ratio", ratio=0.0, refit=refit)
    passes = [registry.make_pass("simplify"), KindRatioPrune(config), registry.make_pass("simplify")]
    manager = PassManager(
        passes,
        data=str(data_dir / "calib_spread.npz"),
        eval_data=str(data_dir / "dev.npz"),
        budget=Budget(max_metric_drop=100),
        metric="spearman",
        metric_output="461",
    )
    report = manager.run(model)
    record = next(r for r in report.passes if r.name == "prune")
    return report.model, [f"{c.site}: {c.what}" for c in record.changes]


def distill(pruned, original: Path, data: Path, dev: Path, epochs: int, lr: float, hidden: bool):
    from onnxopt import registry
    from onnxopt.manager import PassManager
    from onnxopt.validate import Budget

    step = registry.make_pass("distill", epochs=epochs, lr=lr, hidden=hidden)
    manager = PassManager(
        [step], data=str(data), eval_data=str(dev), budget=Budget(max_metric_drop=100), metric="spearman",
        metric_output="461",
    )  # fmt: skip
    report = manager.run(pruned, original=str(original))
    record = next(r for r in report.passes if r.name == "distill")
    return report.model, record.changes[0].what if record.modified else f"declined: {record.skipped[0].reason}"


def macs(path: Path, tokens: int) -> int:
    from onnxopt import cost, graph

    shape = (1, tokens)
    return cost.estimate(graph.load(path), input_shapes={"input_ids": shape, "attention_mask": shape}).macs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="default: downloaded into --cache as bench/real.py does")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "onnxopt-bench", help="downloads")
    parser.add_argument("--data-dir", type=Path, required=True, help="calib_spread.npz, dev.npz, test.npz")
    parser.add_argument("--heads", required=True, help="head ratio: one, or one per layer (comma list)")
    parser.add_argument("--ffn", required=True, help="FFN neuron ratio: one, or one per layer (comma list)")
    parser.add_argument("--no-refit", action="store_true")
    parser.add_argument("--pruned", type=Path, help="start from this pruned model instead of pruning")
    parser.add_argument("--distill-data", type=Path, help="distill on this data file (default: no distill)")
    parser.add_argument("--distill-epochs", type=int, default=3)
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--distill-hidden", action="store_true")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.model is None:
        sys.path.insert(0, str(ROOT / "bench"))
        from _real_tasks import fetch_minilm

        args.model = fetch_minilm(args.cache)
    from onnxopt import graph

    load, start = os.getloadavg(), time.perf_counter()
    if args.pruned is not None:
        model = graph.load(args.pruned)
    else:
        model, changes = prune(args.model, args.data_dir, _ratios(args.heads), _ratios(args.ffn), not args.no_refit)
        print("\n".join(changes))
        print(f"prune: {time.perf_counter() - start:.0f} s")
    if args.distill_data is not None:
        began = time.perf_counter()
        model, what = distill(model, args.model, args.distill_data, args.data_dir / "dev.npz", args.distill_epochs,
                              args.distill_lr, args.distill_hidden)  # fmt: skip
        print(f"distill: {what} ({time.perf_counter() - began:.0f} s)")
    graph.save(model, args.out)
    for tokens in (23, 46):
        print(f"MACs at 1x{tokens}: {macs(args.out, tokens) / macs(args.model, tokens):.4f} of the original")
    command = [sys.executable, "-m", "onnxopt", "validate", str(args.model), str(args.out), "--data",
               str(args.data_dir / "test.npz"), "--metric", "spearman", "--metric-output", "461",
               "--max-metric-drop", "1"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    print(next((line.strip() for line in done.stdout.splitlines() if "metric spearman" in line), done.stdout))
    print(f"wall {time.perf_counter() - start:.0f} s; load average {load[0]:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
