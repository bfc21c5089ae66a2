"""Issue 17's combined acceptance on paraphrase-MiniLM-L3-v2: prune + distill + fuse + dynamic int8 against onnxruntime.

    python bench/minilm_combined.py --data-dir /work/lead [--work /work/cache/minilm_combined] [--rounds 30]
        [--out bench/results/minilm_combined.md] [--pruned PRUNED.onnx --pruned-note "how it was made"]

Rows (every model scored and timed in this one run):

- ``fp32``: the original encoder;
- ``ort dynamic``: onnxruntime's ``quantize_dynamic`` (defaults) on it; ``ort bert fusion+dynamic``: onnxruntime's
  transformer optimizer (bert, opt_level 0) then ``quantize_dynamic``; both are bench/real.py's own tool functions
  (bench/_real_tools.py), called here, not copied;
- ``onnxopt prune,distill``: ``onnxopt run --passes prune,distill --prune-ratio 0.4 --prune-refit --distill-epochs 10``
  on ``calib_spread.npz`` (512 sts-train sentences), judged on ``dev.npz`` (400 sts-dev pairs), as
  bench/results/prune_minilm.md; reused from ``--work`` when present (14 min here); ``--pruned`` gives a pruned
  (and distilled) model made otherwise instead, e.g. with a larger distillation set (``--pruned-note`` says how);
- ``onnxopt prune,distill,fuse,quant``: that model continued through ``fuse`` then ``quant --quant-mode dynamic`` with
  the Python API, the budget checks and validation against the *original* model (``PassManager.run(...,
  original=...)``, what one ``onnxopt run --passes prune,distill,fuse,quant`` does), ``--max-metric-drop 1.0``
  Spearman on dev.npz; the fuse pass keeps its fusion only where it is faster here;
- ``... fuse forced``: the same with ``--fuse-force`` (fusion kept untimed), to show what the fusion does to the int8
  model when the pass declines it (it judges the float model);
- ``ort bert fusion+dynamic on prune,distill``: onnxruntime's path on the pruned model, for reference.

Metric: Spearman ×100 (average ranks) of the cosine of the mean-pooled token embeddings against the gold scores on
``test.npz`` (1,379 sts-test pairs), bench/real.py's scorer; the drop's 95% interval is a paired bootstrap over
pairs (1,000 resamples). Latency: all models interleaved in one onnxruntime timing per batch (full optimizations,
1 thread, onnxopt.runtime.measure_latency), batch 1 and 16 of real sts-test sentences zero-padded to 64 tokens as
bench/real.py; median and the fastest/slowest round.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
PRUNE_FLAGS = ["--prune-ratio", "0.4", "--prune-refit", "--distill-epochs", "10"]
METRIC_FLAGS = ["--metric", "spearman", "--metric-output", "461"]
TARGET_RATIO, TARGET_DROP = 0.35, 1.0


@dataclasses.dataclass
class Row:
    label: str
    path: Path | None
    note: str = ""
    seconds: float | None = None
    spearman: float | None = None
    drop_interval: tuple[float, float] | None = None
    latency: dict[int, tuple[float, float, float]] = dataclasses.field(default_factory=dict)  # median, min, max


def onnxopt_prune_distill(model: Path, data: Path, work: Path) -> Row:
    out = work / "prune_distill.onnx"
    command = [
        sys.executable,
        "-m",
        "onnxopt",
        "run",
        str(model),
        "--passes",
        "prune,distill",
        *PRUNE_FLAGS,
        "--data",
        str(data / "calib_spread.npz"),
        "--eval",
        str(data / "dev.npz"),
        *METRIC_FLAGS,
        "--max-metric-drop",
        "100",
        "-o",
        str(out),
    ]
    note = "reused from " + str(work) if out.exists() else ""
    seconds = None
    if not out.exists():
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
    return Row("onnxopt prune,distill", out, note or "onnxopt " + " ".join(command[2:]), seconds)


def onnxopt_fuse_quant(original: Path, pruned: Path, data: Path, work: Path, force_fuse: bool) -> Row:
    """``fuse`` then ``quant --quant-mode dynamic`` on the pruned model, judged against the original (Python API)."""
    from onnxopt import graph as graph_io
    from onnxopt import registry
    from onnxopt.manager import PassManager
    from onnxopt.validate import Budget

    # remeasure: the passes time afresh in this run instead of taking an earlier run's latency record
    fuse = registry.make_pass("fuse", force=force_fuse, remeasure=True)
    passes = [fuse, registry.make_pass("quant", mode="dynamic", remeasure=True)]
    manager = PassManager(
        passes,
        data=str(data / "calib_spread.npz"),
        eval_data=str(data / "dev.npz"),
        budget=Budget(max_metric_drop=TARGET_DROP),
        metric="spearman",
        metric_output="461",
    )
    start = time.perf_counter()
    report = manager.run(pruned, original=original)
    seconds = time.perf_counter() - start
    label = "onnxopt prune,distill,fuse,quant" + (" (fuse forced)" if force_fuse else "")
    out = work / ("pdfq_forced.onnx" if force_fuse else "pdfq.onnx")
    graph_io.save(report.model, out)
    notes = []
    for record in report.passes:
        if record.name in ("fuse", "quant"):
            what = record.changes[0].what if record.modified else record.skipped[0].reason if record.skipped else ""
            notes.append(f"{record.name}: {'kept' if record.modified else 'declined'}: {what}")
    if report.validation is not None and report.validation.metric is not None:
        metric = report.validation.metric
        notes.append(f"dev Spearman drop against the original {metric.drop:+.2f}")
    return Row(label, out, " | ".join(notes), seconds)


def peer(label: str, tool: str, model: Path, work: Path) -> Row:
    import _real_tools

    folder = work / label.replace(" ", "_").replace("+", "_").replace(",", "_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    out, note = _real_tools.TOOLS[tool][0](types.SimpleNamespace(path=model, kind="text"), folder)
    return Row(label, Path(out), note, time.perf_counter() - start)


def latency_feeds(test: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """bench/real.py's feeds: the first 16 sts-test sentences, zero-padded (mask 0) or cut to 64 tokens."""
    width = 64
    ids, mask = np.zeros((16, width), np.int64), np.zeros((16, width), np.int64)
    n = min(width, test["input_ids"].shape[1])
    ids[:, :n], mask[:, :n] = test["input_ids"][:16, :n], test["attention_mask"][:16, :n]
    return {b: {"input_ids": ids[:b], "attention_mask": mask[:b]} for b in (1, 16)}


def score(rows: list[Row], test: dict[str, np.ndarray], seed: int = 0, resamples: int = 1000) -> None:
    """sts-test Spearman of every row, and the paired bootstrap 95% interval of its drop from the first row's."""
    from _real_tasks import _embeddings

    from onnxopt.metrics import spearman_rho
    from onnxopt.runtime import Session

    gold = test["labels"].astype(np.float64)
    inputs = {k: test[k] for k in ("input_ids", "attention_mask")}
    cosines = []
    for row in rows:
        emb = _embeddings(Session(row.path, optimize=True), inputs).astype(np.float64)
        a, b = emb[0::2], emb[1::2]
        cosines.append((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12))
        row.spearman = 100.0 * spearman_rho(cosines[-1], gold)
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, len(gold), len(gold)) for _ in range(resamples)]
    base = np.array([spearman_rho(cosines[0][p], gold[p]) for p in picks])
    for row, cos in zip(rows[1:], cosines[1:], strict=True):
        drops = 100.0 * (base - np.array([spearman_rho(cos[p], gold[p]) for p in picks]))
        row.drop_interval = (float(np.percentile(drops, 2.5)), float(np.percentile(drops, 97.5)))


def time_all(rows: list[Row], feeds: dict[int, dict[str, np.ndarray]], rounds: int) -> None:
    from onnxopt.runtime import measure_latency

    for batch, batch_feeds in feeds.items():
        print(f"latency of {len(rows)} models at batch {batch}, {rounds} rounds ...", file=sys.stderr)
        for row, lat in zip(rows, measure_latency([r.path for r in rows], batch_feeds, rounds=rounds), strict=True):
            row.latency[batch] = (lat.median_us, lat.min_us, lat.max_us)


def table(rows: list[Row]) -> list[str]:
    base = rows[0]
    lines = [
        "| model | sts-test Spearman | drop [95% interval] | latency b1 × fp32 (ms, rounds min-max) | "
        "latency b16 × fp32 (ms, rounds min-max) | size MB | tool s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        drop = "" if row is base else f"{base.spearman - row.spearman:+.2f}"
        if row.drop_interval is not None:
            drop += f" [{row.drop_interval[0]:.2f}, {row.drop_interval[1]:.2f}]"
        cells = []
        for batch in (1, 16):
            median, low, high = row.latency[batch]
            ratio = median / base.latency[batch][0]
            cells.append(f"{ratio:.3f} ({median / 1000:.2f}, {low / 1000:.2f}-{high / 1000:.2f})")
        size = row.path.stat().st_size / 1e6
        seconds = "" if row.seconds is None else f"{row.seconds:.0f}"
        lines.append(
            f"| {row.label} | {row.spearman:.2f} | {drop} | {cells[0]} | {cells[1]} | {size:.1f} | {seconds} |"
        )
    return lines


def verdict(rows: list[Row]) -> list[str]:
    base = rows[0]
    ours = next(r for r in rows if r.label == "onnxopt prune,distill,fuse,quant")
    peer_row = next(r for r in rows if r.label == "ort bert fusion+dynamic")
    lines = []
    drop = base.spearman - ours.spearman
    for batch in (1, 16):
        ratio = ours.latency[batch][0] / base.latency[batch][0]
        versus = ours.latency[batch][0] / peer_row.latency[batch][0]
        met = ratio <= TARGET_RATIO and drop <= TARGET_DROP
        lines.append(
            f"- batch {batch}: onnxopt {ratio:.3f}× fp32 at a {drop:.2f} drop — target ≤ {TARGET_RATIO}× at ≤ "
            f"{TARGET_DROP} drop {'met' if met else f'missed by {ratio - TARGET_RATIO:+.3f}×'}; "
            f"{versus:.2f}× the latency of ort bert fusion+dynamic "
            f"({peer_row.spearman:.2f}, drop {base.spearman - peer_row.spearman:.2f})"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="default: downloaded into --cache as bench/real.py does")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "onnxopt-bench", help="downloads")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/lead"), help="calib_spread/dev/test.npz")
    parser.add_argument("--work", type=Path, default=Path("/work/cache/minilm_combined"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here (also printed)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 200 sts-test pairs, 3 rounds")
    parser.add_argument("--pruned", type=Path, default=None, help="a pruned model to use instead of building one")
    parser.add_argument("--pruned-note", default="", help="how --pruned was made (for the notes)")
    args = parser.parse_args(argv)
    if args.model is None:
        from _real_tasks import fetch_minilm

        args.model = fetch_minilm(args.cache)
    args.work.mkdir(parents=True, exist_ok=True)
    test = dict(np.load(args.data_dir / "test.npz"))
    if args.quick:
        test = {"labels": test["labels"][:200], **{k: test[k][:400] for k in ("input_ids", "attention_mask")}}
        args.rounds = 3
    load = os.getloadavg()
    if args.pruned is not None:
        pruned = Row("onnxopt prune,distill", args.pruned, args.pruned_note or f"given: {args.pruned}")
    else:
        pruned = onnxopt_prune_distill(args.model, args.data_dir, args.work)
    rows = [
        Row("fp32", args.model),
        peer("ort dynamic", "ort dynamic", args.model, args.work),
        peer("ort bert fusion+dynamic", "ort bert fusion+dynamic", args.model, args.work),
        pruned,
    ]
    rows.append(onnxopt_fuse_quant(args.model, pruned.path, args.data_dir, args.work, force_fuse=False))
    if "fuse: kept" not in rows[-1].note:
        rows.append(onnxopt_fuse_quant(args.model, pruned.path, args.data_dir, args.work, force_fuse=True))
    rows.append(peer("ort bert fusion+dynamic on prune,distill", "ort bert fusion+dynamic", pruned.path, args.work))
    score(rows, test)
    time_all(rows, latency_feeds(test), args.rounds)
    end_load = os.getloadavg()
    lines = [
        f"Command: `python bench/minilm_combined.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Load average (1/5/15 min): {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} at the start, "
        f"{end_load[0]:.2f}/{end_load[1]:.2f}/{end_load[2]:.2f} at the end; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; sts-test pairs: {len(test['labels'])}",
        "",
        *table(rows),
        "",
        *verdict(rows),
        "",
        "Notes:",
        *[f"- {r.label}: {r.note}" for r in rows if r.note],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
