"""Lossless cleanup side by side: onnxopt `simplify` vs onnxslim vs onnxsim's simplify, on real models.

    python bench/simplify.py [--shared ../shared] [--rounds 15] [--out bench/results/simplify.md]

For each model in ../shared/models (with its reference input) and each onnx-wheel light model (random
input): node count, onnxruntime latency at 1 intra-op thread (full optimizations, as users run it; median
of interleaved rounds, so ratios hold on a noisy machine), latency ratio to the original, and the max abs
output difference from the original relative to max(1, max|y|). Needs the `bench` extra (onnxslim, onnxsim).
A tool that fails on a model shows its error instead of numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from _report import emit

ROOT = Path(__file__).resolve().parents[1]


def _onnxopt(src: Path, dst: Path) -> None:
    from onnxopt import graph
    from onnxopt.passes.simplify import SimplifyPass

    model = graph.load(src)
    SimplifyPass()(model)
    graph.save(model, dst)


def _onnxslim(src: Path, dst: Path) -> None:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):
        onnx.save(onnxslim.slim(str(src)), str(dst))


def _onnxsim(src: Path, dst: Path) -> None:
    import onnxsim

    with contextlib.redirect_stdout(io.StringIO()):
        model, ok = onnxsim.simplify(str(src))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    onnx.save(model, str(dst))


TOOLS = {"onnxopt": _onnxopt, "onnxslim": _onnxslim, "onnxsim": _onnxsim}


def _feeds(path: Path) -> dict[str, np.ndarray]:
    ref = path.with_name(path.name.replace(".onnx", ".ref.npz"))
    if ref.exists():
        z = np.load(ref)
        return {k.removeprefix("input__"): z[k] for k in z.files if k.startswith("input__")}
    from onnxopt import data, graph

    return next(iter(data.random_source(graph.load(path), seed=0))).feeds


def _max_err(ref: dict, got: dict) -> float:
    worst = 0.0
    for name, r in ref.items():
        g = got[name]
        worst = max(worst, float(np.abs(g.astype(np.float64) - r).max()) / max(1.0, float(np.abs(r).max())))
    return worst


def bench_model(path: Path, rounds: int) -> dict:
    from onnxopt.runtime import Session, measure_latency

    feeds = _feeds(path)
    row = {"model": path.stem, "tools": {}}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"original": path}
        for tool, fn in TOOLS.items():
            dst = Path(tmp) / f"{tool}.onnx"
            start = time.perf_counter()
            try:
                fn(path, dst)
                variants[tool] = dst
                row["tools"][tool] = {"seconds": time.perf_counter() - start}
            except Exception as e:  # a peer failing on a model is a result, not a crash
                row["tools"][tool] = {"error": " ".join(str(e).split())[:80]}
        reference = Session(path, optimize=False).run(feeds)
        usable = {}
        for name, variant in variants.items():
            try:
                out = Session(variant, optimize=False).run(feeds)
                usable[name] = variant
                if name != "original":
                    row["tools"][name]["max_err"] = _max_err(reference, out)
                    row["tools"][name]["nodes"] = len(onnx.load(str(variant), load_external_data=False).graph.node)
            except Exception as e:
                row["tools"][name] = {"error": "does not run: " + " ".join(str(e).split())[:60]}
        row["nodes"] = len(onnx.load(str(path), load_external_data=False).graph.node)
        latencies = measure_latency(list(usable.values()), feeds, rounds=rounds)
        for name, latency in zip(usable, latencies, strict=True):
            if name == "original":
                row["latency_us"] = latency.median_us
            else:
                row["tools"][name]["latency_us"] = latency.median_us
    return row


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| model | nodes | latency us | " + " | ".join(f"{t} nodes / latency ratio / max err" for t in TOOLS) + " |",
        "|---|---|---|" + "---|" * len(TOOLS),
    ]
    for row in rows:
        cells = [row["model"], str(row["nodes"]), f"{row['latency_us']:.0f}"]
        for tool in TOOLS:
            r = row["tools"].get(tool, {})
            if "error" in r:
                cells.append(f"fails: {r['error']}")
            else:
                ratio = r["latency_us"] / row["latency_us"]
                cells.append(f"{r['nodes']} / {ratio:.2f} / {r['max_err']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", help="substring of the model names to run")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    models = sorted(Path(args.shared, "models").glob("*/*.onnx"))
    models += sorted((Path(onnx.__file__).parent / "backend/test/data/light").glob("light_*.onnx"))
    models = [m for m in models if not args.only or args.only in m.stem]
    rows = []
    for path in models:
        print(f"{path.stem} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(path, args.rounds))
    table = to_markdown(rows)
    header = f"Measured {datetime.date.today()} with `python bench/simplify.py --rounds {args.rounds}` (1 thread)\n\n"
    emit(header + table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
