"""Calibration throughput on one process vs Ray with 1 and 2 workers, and an Amdahl projection to more workers.

    python bench/scale.py [--model ../shared/models/cifar10/cifar10_resnet20_akamaster_bn.onnx]
                          [--samples 1024] [--batch 32] [--repeat 2]

The statistics are those the ``prune`` pass requests (collected by :func:`onnxopt.stats.collect_stats`), over
seeded random inputs shaped like the model's (throughput does not depend on the values). A local Ray head is
started on loopback with 2 CPUs; each configuration runs once to warm up (worker processes, sessions) and then
``--repeat`` times; the best time counts. ``local`` is today's single-process loop (``--executor local``).

The projection fits Amdahl's law ``S(n) = 1 / (s + (1 - s) / n)`` to the measured Ray speed-up ``S(2) = T1 / T2``
(``s``: the serial fraction: reading and sharding batches, pickling reducer states, merging them in the driver)
and scales the 1-worker throughput by ``S(n)``. Two points fit one parameter only; on a shared, loaded machine
the figure is a rough guide, not a measurement of a cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared/models/cifar10/cifar10_resnet20_akamaster_bn.onnx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)

    import ray

    from onnxopt import data, graph, registry, stats
    from onnxopt.executor import RayExecutor

    model = graph.load(args.model)
    spec = data.input_specs(model)[0]
    shape = (args.samples, *[d or 1 for d in spec.shape[1:]])
    x = np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)
    source = data.as_source({spec.name: x}, model, batch_size=args.batch)
    request = registry.make_pass("prune").stats_request(model)
    print(f"model {Path(args.model).name}, {args.samples} samples in batches of {args.batch}, "
          f"{len(request.values)} values, {len(request.grams)} Gram matrices; os.cpu_count()={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    def best(executor) -> tuple[float, stats.StatsTable]:
        stats.collect_stats(model, source, request, executor=executor)  # warm-up
        times, table = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            table = stats.collect_stats(model, source, request, executor=executor)
            times.append(time.perf_counter() - t0)
        return min(times), table

    rows = {}
    rows["local"], reference = best(None)
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    start_s = time.perf_counter() - t0
    try:
        for workers in (1, 2):
            rows[f"ray, {workers} worker{'s' * (workers > 1)}"], table = best(RayExecutor(num_workers=workers))
            worst = max(
                float(np.max(np.abs(table.channels[n].mean - reference.channels[n].mean)))
                / max(float(np.max(np.abs(reference.channels[n].mean))), 1e-30)
                for n in reference.channels
            )
            assert worst < 1e-6, f"Ray statistics differ from local: {worst:.2g} relative"
    finally:
        ray.shutdown()

    print(f"Ray head start-up: {start_s:.1f} s (not counted below)")
    print("| executor | seconds | samples/s |")
    print("|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} | {args.samples / seconds:.0f} |")
    t1, t2 = rows["ray, 1 worker"], rows["ray, 2 workers"]
    speedup = t1 / t2
    serial = min(1.0, max(0.0, 2 / speedup - 1))
    print(f"Ray overhead at 1 worker: {t1 / rows['local']:.2f}x the local time; speed-up 1->2 workers {speedup:.2f}x")
    print(f"Amdahl fit: serial fraction s = {serial:.2f}")
    print("| workers | projected speed-up | projected samples/s |")
    print("|---|---|---|")
    for n in (1, 2, 8, 32, 128):
        s_n = 1 / (serial + (1 - serial) / n)
        print(f"| {n} | {s_n:.2f} | {args.samples / t1 * s_n:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
