"""Every model of the corpus through each pass alone and the full pipeline: what changed, why not, the verdict.

    python bench/corpus.py [--shared ../shared] [--out bench/results/corpus.md] [--models SUBSTR,...]
                           [--runs simplify,prune,...] [--timeout 900]

The corpus is every ``../shared/models/*/*.onnx`` and the onnx wheel's ``light_*.onnx`` models. Shared models
are calibrated and validated on the one reference input of their ``.ref.npz`` (1-10 real samples); the light
models, whose weights are constant placeholders, on 4 seeded random inputs (``onnxopt.data.random_source``).
``simplify`` runs under the exact budget (max abs 1e-5); the lossy passes and the pipeline under an
agreement budget (``--min-cosine``, default 0.99), searching the strongest setting that keeps it; every result
must pass ``onnx.checker`` (full check). Each run is a fresh forked process with a time limit, so one slow or
crashing run is recorded and the rest go on.

Per model and run the table gives: the sites the named pass rewrote (from the report's ``changed``), the
skipped sites with their most common reasons, parameter and MAC ratios, the validation verdict with the worst
cosine over the outputs, and the wall time of the whole ``PassManager.run`` (statistics, search, validation).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import logging
import multiprocessing
import sys
import time
from pathlib import Path

from _report import emit

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("simplify", "prune", "split", "svd", "share", "quant")
PIPELINE = "prune,split,svd,quant"  # share is left out: it serves file size and would undo quant's int8 weights


def corpus(shared: Path) -> list[Path]:
    """Shared models first, then the onnx wheel's light models."""
    import onnx

    light = sorted((Path(onnx.__file__).parent / "backend/test/data/light").glob("light_*.onnx"))
    return sorted((shared / "models").glob("*/*.onnx")) + light


def run_one(path: Path, spec: str, min_cosine: float) -> dict:
    """One ``PassManager.run`` of ``spec`` (a pass or a comma-separated pipeline) on ``path``, as a table row."""
    import onnx

    from onnxopt import data, graph
    from onnxopt.manager import PassManager
    from onnxopt.validate import Budget

    ref = path.with_name(path.name.replace(".onnx", ".ref.npz"))
    source = ref if ref.exists() else data.random_source(graph.load(path), samples=4, seed=0)
    names = spec.split(",")
    budget = None if names == ["simplify"] else Budget(min_cosine=min_cosine)
    start = time.perf_counter()
    report = PassManager(names, data=source, budget=budget).run(path)
    seconds = time.perf_counter() - start
    with graph.temporary_model_file(report.model) as saved:  # what a user gets must pass the full checker
        onnx.checker.check_model(str(saved), full_check=True)
    records = [r for r in report.passes if r.name in names]  # the wrapping simplify runs are not counted
    changed = sum(len(r.changes) for r in records)
    skipped = [s.reason for r in records for s in r.skipped]
    validation = report.validation
    cosine = min((o.cosine for o in validation.outputs.values()), default=float("nan"))
    return {
        "changed": changed,
        "what": "; ".join(f"{r.name} {len(r.changes)}" for r in records) if len(records) > 1 else "",
        "skipped": len(skipped),
        "reasons": collections.Counter(_short(reason) for reason in skipped).most_common(2),
        "params": report.after.params / report.before.params if report.before.params else 1.0,
        "macs": report.after.macs / report.before.macs if report.before.macs else 1.0,
        "ok": validation.ok,
        "cosine": cosine,
        "failures": validation.failures[:1],
        "seconds": seconds,
    }


def _short(reason: str) -> str:
    text = " ".join(reason.split())
    return text if len(text) <= 70 else text[:67] + "..."


def _child(queue, path, spec, min_cosine) -> None:
    logging.disable(logging.CRITICAL)
    try:
        queue.put(run_one(path, spec, min_cosine))
    except BaseException as e:  # recorded in the table, not raised: the corpus is a survey
        queue.put({"error": f"{type(e).__name__}: {' '.join(str(e).split())[:150]}"})


def run_isolated(path: Path, spec: str, min_cosine: float, timeout: float) -> dict:
    """``run_one`` in a forked process: a crash or a run over ``timeout`` seconds becomes a row, not the end."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    start = time.perf_counter()
    process = context.Process(target=_child, args=(queue, path, spec, min_cosine))
    process.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:
        result = {"error": f"no result within {timeout:g} s (exit code {process.exitcode})"}
        process.kill()
    process.join()
    result.setdefault("seconds", time.perf_counter() - start)
    return result


def _row(model: str, spec: str, r: dict) -> str:
    name = "pipeline" if "," in spec else spec
    if "error" in r:
        return f"| {model} | {name} | **error**: {r['error']} | | | | {r['seconds']:.1f} |"
    what = f"{r['changed']} sites" + (f" ({r['what']})" if r["what"] else "")
    if r["skipped"]:
        reasons = ", ".join(f"{reason} ×{count}" for reason, count in r["reasons"])
        why = f"{r['skipped']}: {reasons}"
    else:
        why = "-" if r["changed"] else "no candidate site"
    verdict = f"ok, cos {r['cosine']:.4f}" if r["ok"] else f"FAILED: {r['failures'][0] if r['failures'] else '?'}"
    ratios = f"{r['params']:.3f} / {r['macs']:.3f}"
    return f"| {model} | {name} | {what} | {why} | {ratios} | {verdict} | {r['seconds']:.1f} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "corpus.md"))
    parser.add_argument("--models", help="comma-separated substrings of model names (default: all)")
    parser.add_argument("--runs", default=",".join(PASSES) + ",pipeline", help="passes, and 'pipeline'")
    parser.add_argument("--min-cosine", type=float, default=0.99)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = parser.parse_args(argv)
    models = corpus(Path(args.shared))
    if args.models:
        models = [m for m in models if any(part in m.stem for part in args.models.split(","))]
    specs = [PIPELINE if run == "pipeline" else run for run in args.runs.split(",")]
    lines = [
        f"Measured {datetime.date.today()} on 2 CPU cores: `python bench/corpus.py` ({len(models)} models; "
        f"budget: exact for simplify, cosine >= {args.min_cosine:g} otherwise; pipeline = `{PIPELINE}`)",
        "",
        "| model | run | changed | skipped (most common reasons) | params / MACs after | validation | s |",
        "|---|---|---|---|---|---|---|",
    ]
    totals = collections.Counter()
    start = time.perf_counter()
    for path in models:
        for spec in specs:
            print(f"{path.stem} {spec} ...", file=sys.stderr, flush=True)
            result = run_isolated(path, spec, args.min_cosine, args.timeout)
            lines.append(_row(path.stem, spec, result))
            totals["error" if "error" in result else "ok" if result["ok"] else "failed"] += 1
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(lines) + "\n")  # a partial table survives an interrupted survey
    lines += [
        "",
        f"{sum(totals.values())} runs: {totals['ok']} validated ok, {totals['failed']} failed validation, "
        f"{totals['error']} errors or time-outs; {time.perf_counter() - start:.0f} s in all.",
    ]
    emit("\n".join(lines), args.out)
    return 0 if not totals["error"] else 1


if __name__ == "__main__":
    sys.exit(main())
