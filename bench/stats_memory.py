"""Memory of the statistics collector as the calibration set grows (1x -> 10x): it must stay flat.

    python bench/stats_memory.py [--model models/tiny_mlp/tiny_mlp.onnx --data models/tiny_mlp/calib.npz]

Each size runs in a fresh subprocess, streaming batches from a callable (the data is never held whole), and
collects per-channel statistics of every Relu output plus the Gram matrices of every Gemm. Printed: samples,
wall time, the peak of Python/numpy allocations (tracemalloc) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(model_path: str, data_path: str, repeat: int, batch: int) -> dict:
    import resource
    import time
    import tracemalloc

    import numpy as np

    from onnxopt import data, graph, stats

    model = graph.load(model_path)
    arrays = dict(np.load(data_path))
    arrays.pop("labels", None)
    name, base = next(iter(arrays.items()))

    def batches():
        for _ in range(repeat):
            for start in range(0, len(base), batch):
                yield {name: base[start : start + batch]}

    source = data.as_source(batches, model)
    request = stats.StatsRequest(
        values=frozenset(n.outputs[0].name for n in model.graph if n.op_type == "Relu"),
        grams=frozenset(n.name for n in model.graph if n.op_type in ("Gemm", "MatMul")),
    )
    tracemalloc.start()
    start = time.perf_counter()
    table = stats.collect_stats(model, source, request)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    return {
        "samples": table.samples,
        "seconds": round(seconds, 2),
        "tracemalloc_peak_mb": round(peak / 1e6, 2),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models/tiny_mlp/tiny_mlp.onnx"))
    parser.add_argument("--data", default=str(ROOT / "models/tiny_mlp/calib.npz"))
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model, args.data, args.child, args.batch)))
        return 0
    rows = []
    for repeat in (1, 10):
        cmd = [sys.executable, __file__, "--model", args.model, "--data", args.data, "--child", str(repeat)]
        out = subprocess.run(cmd + ["--batch", str(args.batch)], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| samples | seconds | tracemalloc peak MB | max RSS MB |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['samples']} | {row['seconds']} | {row['tracemalloc_peak_mb']} | {row['max_rss_mb']} |")
    growth = rows[1]["tracemalloc_peak_mb"] / max(rows[0]["tracemalloc_peak_mb"], 1e-9)
    print(f"peak allocation ratio 10x/1x samples: {growth:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
