"""Calibration, validation and a budget search: one process vs Ray with 1 and 2 workers, and an Amdahl projection.

    python bench/scale.py [--shared ../shared] [--samples 384] [--batch 32] [--repeat 1]
                          [--search-samples 96] [--search-steps 4] [--mobilenet-samples 16] [--skip-mobilenet]

Workloads (ResNet-20 on CIFAR-10 JPEGs from ``../shared/data/cifar10/test2000``, a subset spread over the classes,
read lazily from the folder: on Ray each task reads its own images by path):

- calibration: the statistics ``prune`` requests (:func:`onnxopt.stats.collect_stats`), samples/s;
- validation: :func:`onnxopt.validate.validate` of a lightly perturbed copy against the original with labels
  (accuracy, top1 with its bootstrap interval, cosine), both models run on every sample, samples/s;
- search: ``PassManager(["prune"])`` with a ratio search within ``--max-accuracy-drop`` 1 pp (bisection, then per
  layer group), calibration and evaluation folders, wall time of ``run()``; the chosen model must be the same on
  every executor (the script asserts it). With 2 workers it also runs with 3 candidates scored at once
  (speculative bisection: ``RayExecutor(max_candidates=3)``).

A local Ray head is started on loopback with 2 CPUs; each configuration runs once to warm up (worker processes,
sessions) and then ``--repeat`` times; the best time counts. ``local`` is the single-process loop (``--executor
local``). The projection fits Amdahl's law ``S(n) = 1 / (s + (1 - s) / n)`` to the measured Ray speed-up
``S(2) = T1 / T2`` (``s``: the serial fraction) and scales the 1-worker figure by ``S(n)``. Two points fit one
parameter only; on a shared, loaded 2-core machine the figure is a rough guide, not a measurement of a cluster.

Last, the serial fraction of a MobileNetV2 ``prune`` run (ImageNet val1300 images, ``--mobilenet-samples`` for
evaluation, 32 calib200 images for calibration, local executor, no early stop: every check scores every sample, as
on Ray), instrumented: onnxruntime inference and image decoding in the budget checks and the final validation (what
Ray shards, growing with the samples) and the calibration statistics, against everything else, which no number of
workers shrinks: the graph surgery and shape inference of every candidate (in the driver, one after the other),
opening a session of every candidate (on every worker again), the metric's bootstrap, scoring and cleanup. It is
projected to 600 evaluation images (the issue's 621 s run): inference and decoding grow with the samples, the rest
does not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CIFAR = "none,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"
WORKERS = (1, 2)
PROJECT = (1, 2, 8, 32, 128)


def subset(folder: Path, count: int, dst: Path, offset: int = 0) -> Path:
    """``count`` images of ``folder`` spread evenly over it (every class), as symlinks with a ``labels.txt``."""
    from onnxopt import images

    files, labels = images.list_images(folder)
    picks = np.linspace(offset, len(files) - 1, count).astype(int)
    dst.mkdir(parents=True)
    lines = []
    for number, index in enumerate(picks):
        name = f"{number:05d}{files[index].suffix}"
        (dst / name).symlink_to(files[index].resolve())
        lines.append(f"{name}, {labels[index]}" if labels is not None else "")
    if labels is not None:  # a folder without labels (calibration images) stays without
        (dst / "labels.txt").write_text("\n".join(lines) + "\n")
    return dst


def perturbed(model, scale: float = 1e-3, seed: int = 0):
    """A copy of ``model`` with relative noise on its weight matrices and kernels (not on BatchNorm's statistics, whose
    variance must stay positive): a slightly lossy candidate."""
    import onnx_ir as ir

    rng = np.random.default_rng(seed)
    candidate = model.clone()
    for value in candidate.graph.initializers.values():
        array = value.const_value.numpy()
        if array.dtype.kind == "f" and array.ndim >= 2:
            noise = rng.standard_normal(array.shape).astype(array.dtype) * scale * float(np.abs(array).max() or 1)
            value.const_value = ir.tensor(array + noise, name=value.name)
    return candidate


def best_of(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up: worker processes, sessions, the page cache
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def report_difference(got, want, where: str = "report") -> float:
    """The largest relative difference between two reports' JSON figures; anything else must be equal."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        return max([report_difference(got[k], want[k], f"{where}.{k}") for k in want] or [0.0])
    if isinstance(want, list | tuple):
        assert len(got) == len(want), where
        return max([report_difference(g, w, where) for g, w in zip(got, want, strict=True)] or [0.0])
    if isinstance(want, float) and isinstance(got, float):
        return 0.0 if got == want else abs(got - want) / max(abs(want), 1e-12)
    assert got == want, f"{where}: {got!r} != {want!r}"
    return 0.0


def amdahl(t1: float, t2: float) -> float:
    """The serial fraction ``s`` that Amdahl's law fits to a 1 -> 2 worker speed-up ``t1 / t2``."""
    return min(1.0, max(0.0, 2 * t2 / t1 - 1))


def table(name: str, unit: str, rows: dict[str, float], work: float | None) -> list[str]:
    """Markdown lines: the measured rows, the fit and the projection (``work``: samples, for a rate)."""
    out = [f"### {name}", "", f"| executor | seconds | {unit} |", "|---|---:|---:|"]
    for label, seconds in rows.items():
        rate = f"{work / seconds:.1f}" if work else "-"
        out.append(f"| {label} | {seconds:.2f} | {rate} |")
    t1, t2 = rows["ray, 1 worker"], rows["ray, 2 workers"]
    s = amdahl(t1, t2)
    out += ["", f"Ray at 1 worker: {t1 / rows['local']:.2f}x the local time; 1 -> 2 workers: {t1 / t2:.2f}x; "
            f"Amdahl fit s = {s:.2f}", "", f"| workers | projected speed-up | projected seconds | projected {unit} |",
            "|---:|---:|---:|---:|"]  # fmt: skip
    for n in PROJECT:
        speedup = 1 / (s + (1 - s) / n)
        rate = f"{work / t1 * speedup:.1f}" if work else "-"
        out.append(f"| {n} | {speedup:.2f} | {t1 / speedup:.2f} | {rate} |")
    return out + [""]


def scaling(args, shared: Path, tmp: Path) -> list[str]:
    import ray

    from onnxopt import data, graph, images, registry, stats, validate
    from onnxopt.executor import RayExecutor
    from onnxopt.manager import PassManager

    model_path = shared / "models/cifar10/cifar10_resnet20_akamaster_bn.onnx"
    folder = shared / "data/cifar10/test2000"
    pre = images.parse_preprocess(CIFAR)
    model = graph.load(model_path)
    work = subset(folder, args.samples, tmp / "work")
    calib = subset(folder, 64, tmp / "calib", offset=1)
    held = subset(folder, args.search_samples, tmp / "eval", offset=2)
    source = data.as_source(images.ImageFolder(work, pre, args.batch), model)
    request = registry.make_pass("prune").stats_request(model)
    candidate = perturbed(model)
    budget = validate.Budget(max_accuracy_drop=1.0, min_cosine=0.99)
    lines = [f"ResNet-20, {args.samples} CIFAR-10 JPEGs read lazily from a folder in batches of {args.batch}; "
             f"{len(request.values)} statistics values; os.cpu_count()={os.cpu_count()}, load average at the start "
             f"{os.getloadavg()[0]:.1f}", ""]  # fmt: skip

    def search(executor):
        manager = PassManager(
            [registry.make_pass("prune", steps=args.search_steps)],
            data=images.ImageFolder(calib, pre, args.batch), eval_data=images.ImageFolder(held, pre, args.batch),
            budget=validate.Budget(max_accuracy_drop=1.0), executor=executor, simplify=False,
        )  # fmt: skip
        checks = []
        manager.progress = lambda e: checks.append(e) if e.kind == "trial" else None
        report = manager.run(model_path)
        shapes = {n: v.shape for n, v in report.model.graph.initializers.items()}
        return shapes, [c.what for r in report.passes for c in r.changes], len(checks)

    results: dict[str, dict[str, float]] = {"calibration": {}, "validation": {}, "search": {}}
    outcome: dict[str, object] = {}

    def measure(label: str, executor) -> None:
        results["calibration"][label], table_ = best_of(
            lambda: stats.collect_stats(model, source, request, executor=executor), args.repeat
        )
        results["validation"][label], report = best_of(
            lambda: validate.validate(model_path, candidate, source, budget, executor=executor), args.repeat
        )
        t0 = time.perf_counter()
        chosen = search(executor)
        results["search"][label] = time.perf_counter() - t0
        outcome[label] = (table_, report, chosen)
        print(f"{label}: calibration {results['calibration'][label]:.1f} s, validation "
              f"{results['validation'][label]:.1f} s, search {results['search'][label]:.1f} s "
              f"({chosen[2]} checks)", flush=True)  # fmt: skip

    measure("local", None)
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    start_s = time.perf_counter() - t0
    try:
        for workers in WORKERS:
            measure(f"ray, {workers} worker{'s' * (workers > 1)}", RayExecutor(num_workers=workers))
        t0 = time.perf_counter()
        chosen = search(RayExecutor(num_workers=2, max_candidates=3))
        speculative = time.perf_counter() - t0
    finally:
        ray.shutdown()
    want_table, want_report, want_chosen = outcome["local"]
    report_diffs: dict[str, float] = {}
    problems = []  # printed, not raised: the timings above stay
    for label, (got_table, got_report, got_chosen) in outcome.items():
        worst = max(
            float(np.max(np.abs(got_table.channels[n].mean - want_table.channels[n].mean)))
            / max(float(np.max(np.abs(want_table.channels[n].mean))), 1e-30)
            for n in want_table.channels
        )
        if not worst < 1e-6:
            problems.append(f"{label}: statistics differ from local by {worst:.2g} relative")
        try:
            report_diffs[label] = report_difference(got_report.to_json(), want_report.to_json())
        except AssertionError as e:
            report_diffs[label] = float("inf")
            problems.append(f"{label}: the validation report differs from local: {e}")
        if not report_diffs[label] <= 1e-6:
            problems.append(f"{label}: the validation report's figures differ by {report_diffs[label]:.2g} relative")
        if got_chosen[:2] != want_chosen[:2]:
            problems.append(f"{label}: the search chose differently: {got_chosen[1]} vs {want_chosen[1]}")
    if chosen[:2] != want_chosen[:2]:
        problems.append(f"3 candidates at once: the search chose differently: {chosen[1]}")
    lines += [f"**MISMATCH**: {p}" for p in problems]
    worst_cosine = min(d.cosine for d in want_report.outputs.values())
    worst_report = max(report_diffs.values())
    verdict = "equals" if not problems else "was compared with"
    lines += [f"Ray head start-up: {start_s:.1f} s (not counted). Every Ray result {verdict} the local one (statistics "
              f"within 1e-6 relative; the validation report's figures within {worst_report:.2g} relative, verdicts "
              "and counts identical; the same pruned model).", "",
              f"Validation: {want_report.samples} samples, accuracy {want_report.accuracy['before']:.2f} -> "
              f"{want_report.accuracy['after']:.2f} %, worst cosine {worst_cosine:.6f}.",
              f"Search: prune ratio search (steps {args.search_steps}) on 64 calibration and {args.search_samples} "
              f"evaluation images, {want_chosen[2]} budget checks; chose: {'; '.join(want_chosen[1]) or 'nothing'}.",
              ""]  # fmt: skip
    lines += table("Calibration statistics", "samples/s", results["calibration"], args.samples)
    lines += table("Validation (original + candidate on every sample)", "samples/s", results["validation"],
                   args.samples)  # fmt: skip
    lines += table("Budget search (prune, wall time of the run)", "runs/h", results["search"], None)
    lines += [
        f"Search on 2 workers with 3 candidates scored at once (speculative bisection): {speculative:.2f} s "
        f"({results['search']['ray, 2 workers'] / speculative:.2f}x the 2-worker run with one at a time).",
        "",
    ]
    return lines


@contextlib.contextmanager
def _environ(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class Timer:
    """Seconds spent inside wrapped functions (outermost calls only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.depth = 0

    def wrap(self, owner, name: str, label: str, patches: contextlib.ExitStack, unless: Timer | None = None) -> None:
        """Time ``owner.name`` (not while ``unless`` is inside one of its own calls)."""
        real = getattr(owner, name)

        def timed(*a, **k):
            outer = self.depth == 0 and (unless is None or unless.depth == 0)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.depth -= 1
                if outer:
                    self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)
        patches.callback(setattr, owner, name, real)


def mobilenet(args, shared: Path, tmp: Path) -> list[str]:
    from onnxopt import images, manager, registry, runtime, validate
    from onnxopt.passes import prune as prune_mod

    model_path = shared / "models/imagenet/mobilenet_v2_torchvision.onnx"
    pre = images.parse_preprocess("imagenet")
    calib = subset(shared / "data/imagenet/calib200", 32, tmp / "mcalib")
    held = subset(shared / "data/imagenet/val1300", args.mobilenet_samples, tmp / "meval")
    stats_timer, checks_timer, per_sample, opening, surgery, driver = (Timer() for _ in range(6))
    with contextlib.ExitStack() as patches:
        # every check scores every sample, as on Ray (the early stop is local only)
        patches.enter_context(_environ("ONNXOPT_EARLY_STOP", "off"))
        stats_timer.wrap(manager, "collect_stats", "statistics", patches)
        checks_timer.wrap(manager, "validate", "checks", patches)
        checks_timer.wrap(manager, "metric_baseline", "checks", patches)
        # outside the statistics: inference and image decoding grow with the evaluation samples
        per_sample.wrap(runtime.Session, "run", "samples", patches, unless=stats_timer)
        per_sample.wrap(images, "load_image", "samples", patches, unless=stats_timer)
        opening.wrap(runtime.Session, "__init__", "open", patches, unless=stats_timer)
        driver.wrap(validate, "_measure", "driver", patches)
        surgery.wrap(prune_mod.ChannelPrunePass, "_candidate", "surgery", patches)
        run = manager.PassManager(
            [registry.make_pass("prune")], data=images.ImageFolder(calib, pre),
            eval_data=images.ImageFolder(held, pre), budget=validate.Budget(max_accuracy_drop=1.0), simplify=False,
        )  # fmt: skip
        checks = []
        run.progress = lambda e: checks.append(e) if e.kind == "trial" else None
        t0 = time.perf_counter()
        report = run.run(model_path)
        total = time.perf_counter() - t0
    statistics = stats_timer.seconds.get("statistics", 0.0)
    samples = per_sample.seconds.get("samples", 0.0)  # sharded, and proportional to the evaluation samples
    in_checks = checks_timer.seconds.get("checks", 0.0)
    serial = total - statistics - samples
    opened = opening.seconds.get("open", 0.0)
    cut = surgery.seconds.get("surgery", 0.0)
    metric = driver.seconds.get("driver", 0.0)
    rest = serial - opened - cut - metric
    scaled = samples / args.mobilenet_samples * 600
    projected = serial / (serial + statistics + scaled)
    chose = "; ".join(c.what for r in report.passes for c in r.changes)
    return [
        "### Serial fraction of a MobileNetV2 `prune` run (local executor, instrumented)", "",
        f"`prune` (ratio search, default steps) on MobileNetV2 with 32 calib200 images for calibration and "
        f"{args.mobilenet_samples} val1300 images for evaluation, `--max-accuracy-drop 1`, no early stop (as on Ray): "
        f"{total:.1f} s, {len(checks)} budget checks ({in_checks:.1f} s inside them and the final validation); chose "
        f"{chose[:400]}{'...' if len(chose) > 400 else ''}.", "",
        "| part | seconds | share | on Ray |", "|---|---:|---:|---|",
        f"| inference and image decoding in the checks and validation | {samples:.1f} | {samples / total:.2f} | "
        "sharded over the workers, grows with the samples |",
        f"| calibration statistics | {statistics:.1f} | {statistics / total:.2f} | sharded |",
        f"| opening a session of every candidate | {opened:.1f} | {opened / total:.2f} | on every worker again: "
        "does not shrink |",
        f"| graph surgery of the candidates (clone, select, remove, shape inference) | {cut:.1f} | {cut / total:.2f} | "
        "driver, one candidate after the other |",
        f"| the metric and its bootstrap | {metric:.1f} | {metric / total:.2f} | driver |",
        f"| the rest (fold and compare batches, scoring, cleanup, serialising) | {rest:.1f} | {rest / total:.2f} | "
        "mostly driver |",
        f"| serial in all (all but the first two rows) | {serial:.1f} | {serial / total:.2f} | |", "",
        f"Serial fraction of this run {serial / total:.2f}. Projected to 600 evaluation images (inference and "
        f"decoding grow to {scaled:.0f} s, {samples / args.mobilenet_samples:.2f} s per image over all checks; the "
        f"rest does not): serial fraction {projected:.3f}, so at most {1 / projected:.0f}x from any number of "
        "workers.", "",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--search-samples", type=int, default=96)
    parser.add_argument("--search-steps", type=int, default=4)
    parser.add_argument("--mobilenet-samples", type=int, default=16)
    parser.add_argument("--skip-mobilenet", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args(argv)
    shared = Path(args.shared)
    lines = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-scale-") as tmp:
        if not args.skip_scaling:
            lines += scaling(args, shared, Path(tmp))
        if not args.skip_mobilenet:
            lines += mobilenet(args, shared, Path(tmp))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
