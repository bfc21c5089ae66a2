"""onnxopt's own cost: wall time and peak memory of `onnxopt run --passes prune,svd,quant` as the model and the
calibration data grow.

    python bench/own_cost.py --mnist ../shared/data/mnist [--shared ../shared] [--out bench/results/own_cost.md]
                             [--timeout 1800] [--skip MODEL,...] [--calib 500,1000,2000,5000]

Each run is a child process (``python -m onnxopt run ...``); its wall time is measured around it and its peak
memory is the child's own peak RSS (``/usr/bin/time -f %M``; without it ``os.wait4``'s ``ru_maxrss``, which
can include this script's RSS copied at fork), so one run's peak never leaks into the next. Per-pass seconds
come from the run's ``--report``.

- Model growth: tiny_mlp and mnist_cnn (MNIST: calibration on training images 0-999, the 0.5 pp accuracy
  budget on test images 0-4,999, as bench/_protocol.py); the CIFAR ResNet-20 from ``--shared`` (no CIFAR
  data offline: 32 random images in [0, 1]); ResNet-50 built by ``models/resnet.py`` (random weights, 25.6 M
  parameters, 32 random 224×224 images in [0, 1]). Random weights and inputs make accuracy meaningless, so
  those two keep every output's per-sample cosine similarity ≥ ``--min-cosine`` (0.99) instead; a random
  network's output hardly depends on its input, so that budget is vacuous and only their cost is meaningful.
- Calibration growth: mnist_cnn with ``--calib`` training images (default 500, 1,000, 2,000, 5,000; the
  evaluation split stays the 5,000 test images).

A run that exceeds ``--timeout`` seconds is killed and reported as such; ``--profile DIR`` runs every child
under cProfile and prints its ten most expensive functions (cumulative) to see where the time goes.

Search cost (``--search resnet20,mobilenet_v2``, no ``--mnist`` needed): one ``onnxopt run --passes prune`` on a
real pair of bench/_real_tasks.py (its calibration split, its budget split as ``--eval``, cut to ``--search-eval``
samples, its metric and budget), once with early-stopped budget checks off (``ONNXOPT_EARLY_STOP=off``) and once
as shipped (on); with ``--search-fast`` also with the opt-in statistical stop for top-1 (``fast``); optionally
also with the onnxopt of another source tree (``--before-tree DIR``: a checkout whose ``onnxopt/`` package holds
``passes/`` too). Per run: wall time, peak RSS, the prune pass's seconds, its budget
checks (candidates, stopped early, samples scored of those a full check scores, check seconds, the estimated
time saved) and a digest of the written model (the same digest: the same model). Written to
``bench/results/own_cost_search.md`` unless ``--out`` says otherwise.

Prune speed (``--speed mobilenet_v2,resnet20,resnet56,ultraface,superres``; also ``efficientnet_lite0`` and
``yolox_nano``, a pair only this benchmark runs): ``onnxopt run --passes prune`` and ``--passes prune
--prune-refit`` (``--speed-variants prune,refit``; ``norefit``: ``--no-prune-refit``; plain prune has refit auto)
on real pairs of bench/_real_tasks.py with the
budget flags bench/real.py gives onnxopt (top-1 drop, PSNR floor, worst cosine), the pair's calibration split as
``--data`` and its budget split as ``--eval``, written once as .npz files to ``--data-dir`` (default
``--cache``/prune_speed) and reused. Per run: wall seconds, peak RSS, the prune pass's seconds and budget checks,
the MACs after, the metric on the budget split, and the 1-minute load average before and after the run (other
jobs on the machine make wall times upper bounds). Each run starts with an empty latency record
(``ONNXOPT_CACHE_DIR``), so prune's latency guard times its models as on a first run. Written to
``bench/results/prune_speed.md`` unless ``--out`` says otherwise. One command for the lead:
``python bench/own_cost.py --speed mobilenet_v2,efficientnet_lite0,resnet20,resnet56,ultraface,superres,yolox_nano``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pstats
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import BUDGET, MODELS, ROOT, load  # noqa: E402
from _report import emit  # noqa: E402

PASSES = "prune,svd,quant"
TIME = Path("/usr/bin/time")


def measure(model: Path, data: Path, evaluation: Path | None, budget: list[str], work: Path, timeout: float,
            profile: Path | None = None, passes: str = PASSES, env: dict | None = None) -> dict:  # fmt: skip
    """Run ``onnxopt run`` in a child process; wall seconds, the child's peak RSS and its JSON report.

    ``env``: variables set for the child (``ONNXOPT_EARLY_STOP``, ``PYTHONPATH``)."""
    out, report = work / f"{model.stem}.opt.onnx", work / f"{model.stem}.report.json"
    report.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    prefix = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else [sys.executable]
    command = [*prefix, "-m", "onnxopt", "run", str(model), "--passes", passes, "--data", str(data),
               "-o", str(out), "--report", str(report), *budget]  # fmt: skip
    if evaluation is not None:
        command += ["--eval", str(evaluation)]
    rss_file = work / "maxrss.txt"
    rss_file.unlink(missing_ok=True)
    if TIME.exists():  # a small parent: the forked child of this script would start with its RSS (MNIST arrays)
        command = [str(TIME), "-f", "%M", "-o", str(rss_file), *command]
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **(env or {})},
        cwd=work,  # not the checkout: `python -m` puts the working directory first on sys.path (--before-tree)
    )  # fmt: skip
    status, usage = None, None
    while status is None:
        pid, status_code, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            status = os.waitstatus_to_exitcode(status_code)
        elif time.perf_counter() - start > timeout:
            os.killpg(child.pid, signal.SIGKILL)  # its own session: /usr/bin/time and onnxopt under it
            _, status_code, usage = os.wait4(child.pid, 0)
            status = "timeout"
        else:
            time.sleep(0.2)
    child.returncode = status if isinstance(status, int) else -9
    stderr = child.stderr.read() if child.stderr else ""
    result = {
        "seconds": time.perf_counter() - start,
        "peak_mb": int(rss_file.read_text().split()[-1]) / 1024 if rss_file.exists() else usage.ru_maxrss / 1024,
        "status": status,
        "error": stderr.strip().splitlines()[-1][:100] if status not in (0,) and stderr.strip() else "",
        "report": json.loads(report.read_text()) if report.exists() else None,
        "command": shlex.join(["onnxopt", *command[command.index("onnxopt") + 1 :]]),
        "model_sha256": hashlib.sha256(out.read_bytes()).hexdigest()[:12] if out.exists() else None,
    }
    return result


SEARCH_HEADER = [
    "| pair | onnxopt | eval samples | wall s | peak RSS MB | prune s (stats s) | budget checks | stopped early "
    "(exact / statistical) | samples scored / full | check s | est. saved s | MACs after | output sha256 |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def search_cost(names: list[str], args, work: Path) -> list[str]:
    """The prune search of each real pair, early stop off / on (/ another tree): one table row per run."""
    sys.path.insert(0, str(ROOT / "bench"))
    from _real_tasks import LOADERS, Skip  # the pairs' data and budgets, as bench/real.py reads them

    rows, commands = [], []
    for name in names:
        try:
            task = LOADERS[name](Path(args.shared), Path(args.cache), False)
        except Skip as e:
            rows.append(f"| {name} | skipped: {e} |" + " |" * 11)
            continue
        if task.metric != "top1":
            raise SystemExit(f"--search {name}: only top1 pairs are wired here (got {task.metric})")
        count = min(args.search_eval or len(task.budget_data["labels"]), len(task.budget_data["labels"]))
        calib, evaluation = work / f"{name}.calib.npz", work / f"{name}.eval.npz"
        np.savez(calib, **task.calib)
        np.savez(evaluation, **{k: v[:count] for k, v in task.budget_data.items()})
        budget = ["--metric", "top1", "--max-metric-drop", f"{task.budget:g}"]
        variants = {
            "off": ("early stop off", {"ONNXOPT_EARLY_STOP": "off"}),
            "on": ("early stop on (default)", {}),
            "fast": ("early stop fast (opt-in)", {"ONNXOPT_EARLY_STOP": "fast"}),
            "before": (f"before ({args.before_tree})", {"PYTHONPATH": args.before_tree or ""}),
        }
        chosen = args.search_variants.split(",") if args.search_variants else ["off", "on"]
        chosen += ["fast"] * (args.search_fast and "fast" not in chosen)
        chosen += ["before"] * (bool(args.before_tree) and "before" not in chosen)
        for label, env in [variants[v] for v in chosen]:
            print(f"{name}: {label} ...", file=sys.stderr, flush=True)
            result = measure(task.model, calib, evaluation, budget, work, args.timeout, passes="prune", env=env)
            print(f"  {result['seconds']:.1f} s, status {result['status']} {result['error']}", file=sys.stderr)
            prefix = " ".join(f"{k}={v}" for k, v in env.items())
            commands.append(f"- {name}, {label}: `{prefix + ' ' if prefix else ''}{result['command']}`")
            rows.append(_search_row(name, label, count, result))
    return rows + ["", "Commands (the .npz files: the pair's calibration split and its budget split):", "", *commands]


SPEED_HEADER = [
    "| pair | run | wall s | peak RSS MB | prune s (stats s) | budget checks (stopped early) | MACs after "
    "| metric on the budget split | load before / after | status |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def speed(names: list[str], args, work: Path) -> list[str]:
    """`prune` and `prune --prune-refit` on each real pair: one table row per run, then the commands."""
    sys.path.insert(0, str(ROOT / "bench"))
    from _real_tasks import LOADERS, SPEED_ONLY, Skip
    from real import onnxopt_flags  # the budget flags bench/real.py gives onnxopt

    data_dir = Path(args.data_dir or Path(args.cache) / "prune_speed")
    data_dir.mkdir(parents=True, exist_ok=True)
    rows, commands = [], []
    variants = {
        "prune": ("prune (refit auto)", []),
        "refit": ("prune --prune-refit", ["--prune-refit"]),
        "norefit": ("prune --no-prune-refit", ["--no-prune-refit"]),
    }
    for name in names:
        calib, evaluation = data_dir / f"{name}.calib.npz", data_dir / f"{name}.eval.npz"
        try:
            task = {**LOADERS, **SPEED_ONLY}[name](Path(args.shared), Path(args.cache), False)
        except Skip as e:
            rows.append(f"| {name} | skipped: {e} |" + " |" * 8)
            continue
        if not (calib.exists() and evaluation.exists()):  # written once, reused by later runs
            np.savez(calib, **task.calib)
            np.savez(evaluation, **task.budget_data)
        for variant in args.speed_variants.split(","):
            label, extra = variants[variant]
            print(f"{name}: {label} ...", file=sys.stderr, flush=True)
            load_before = os.getloadavg()[0]
            fresh = {"ONNXOPT_CACHE_DIR": tempfile.mkdtemp(prefix="latency-", dir=work)}  # no recorded latencies
            budget = onnxopt_flags(task, {"--max-metric-drop", "--allow-small-eval"})[0]
            result = measure(task.model, calib, evaluation, budget + extra, work, args.timeout,
                             passes="prune", env=fresh)  # fmt: skip
            load_after = os.getloadavg()[0]
            print(f"  {result['seconds']:.1f} s, status {result['status']} {result['error']}", file=sys.stderr)
            commands.append(f"- {name}, {label}: `{result['command']}`")
            rows.append(_speed_row(name, label, result, load_before, load_after))
    return rows + ["", "Commands (the .npz files: the pair's calibration split and its budget split):", "", *commands]


def _speed_row(name: str, label: str, result: dict, load_before: float, load_after: float) -> str:
    report = result["report"]
    load = f"{load_before:.1f} / {load_after:.1f}"
    if report is None:
        status = "timeout" if result["status"] == "timeout" else f"failed: {result['error']}"
        cells = [name, label, f"{result['seconds']:.1f}", f"{result['peak_mb']:.0f}", "", "", "", "", load, status]
        return "| " + " | ".join(cells) + " |"
    prune = next(p for p in report["passes"] if p["name"] == "prune")
    search = prune.get("details", {}).get("search") or {}
    macs = report["model"]["after"]["macs"] / max(report["model"]["before"]["macs"], 1)
    validation = report.get("validation") or {}
    metric = validation.get("metric")
    if metric:
        before, after = (
            f"{v:.2f}" if isinstance(v, int | float) else str(v) for v in (metric["before"], metric["after"])
        )
        shown = f"{metric['name']} {before} -> {after}" if metric["before"] is not None else f"{metric['name']} {after}"
        shown += f" (drop {metric['drop']:.2f})" if metric.get("drop") is not None else ""
    elif validation.get("outputs"):
        shown = (
            "worst cosine "
            + f"{min(o['cosine'] for o in validation['outputs'].values() if o['cosine'] is not None):.5f}"
        )
    else:
        shown = ""
    status = {0: "ok", 1: "budget failed"}.get(result["status"], str(result["status"]))
    checks = f"{search.get('candidates', 0)} ({search.get('stopped_early', 0)})" if search else "0"
    cells = [name, label, f"{result['seconds']:.1f}", f"{result['peak_mb']:.0f}",
             f"{prune['seconds']:.1f} ({prune.get('stats_seconds', 0):.1f})", checks, f"{macs:.3f}", shown, load,
             status]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _search_row(name: str, label: str, count: int, result: dict) -> str:
    report = result["report"]
    if report is None:
        status = "timeout" if result["status"] == "timeout" else f"failed: {result['error']}"
        return (
            f"| {name} | {label} | {count} | {result['seconds']:.1f} | {result['peak_mb']:.0f} | {status} |" + " |" * 7
        )
    prune = next(p for p in report["passes"] if p["name"] == "prune")
    search = prune.get("details", {}).get("search")
    macs = report["model"]["after"]["macs"] / max(report["model"]["before"]["macs"], 1)
    cells = [name, label, str(count), f"{result['seconds']:.1f}", f"{result['peak_mb']:.0f}",
             f"{prune['seconds']:.1f} ({prune.get('stats_seconds', 0):.1f})"]  # fmt: skip
    if search:
        cells += [str(search["candidates"]), f"{search['stopped_early']} ({search['stopped_exact']} / "
                  f"{search['stopped_statistical']})", f"{search['samples_scored']} / {search['samples_if_full']}",
                  f"{search['check_seconds']:.1f}", f"{search['seconds_saved_estimate']:.1f}"]  # fmt: skip
    else:
        cells += ["(not reported)"] * 5
    cells += [f"{macs:.3f}", result["model_sha256"] or ""]
    return "| " + " | ".join(cells) + " |"


def _row(label: str, samples: int, result: dict) -> str:
    report = result["report"]
    status = {0: "ok", 1: "budget failed (kept original)", "timeout": "timeout"}.get(result["status"], "failed")
    if result["error"] and result["status"] not in (0, 1):
        status += f": {result['error']}"
    if report is None:
        return f"| {label} | | | {samples} | {result['seconds']:.1f} | {result['peak_mb']:.0f} | | | {status} |"
    before, after = report["model"]["before"], report["model"]["after"]
    per_pass = ", ".join(
        f"{p['name']} {p['seconds'] + p.get('stats_seconds', 0):.1f}"
        for p in report["passes"]
        if p["name"] != "simplify"
    )
    return (
        f"| {label} | {before['params'] / 1e6:.3g} M | {before['macs'] / 1e6:.4g} M | {samples} | "
        f"{result['seconds']:.1f} | {result['peak_mb']:.0f} | {per_pass} | "
        f"{after['macs'] / max(before['macs'], 1):.3f} / {after['bytes'] / before['bytes']:.3f} | {status} |"
    )


def _print_profile(path: Path) -> None:
    if path.exists():
        print(f"--- {path}", file=sys.stderr)
        pstats.Stats(str(path), stream=sys.stderr).sort_stats("cumulative").print_stats(10)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", help="directory with the four MNIST IDX .gz files")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--out", help="default bench/results/own_cost.md (own_cost_search.md with --search)")
    parser.add_argument("--search", help="comma-separated real pairs (resnet20, mobilenet_v2...): the search cost")
    parser.add_argument("--search-eval", type=int, default=0, help="--search: evaluation samples (0: all)")
    parser.add_argument("--search-variants", help="--search: which runs, in order (off,on,fast,before)")
    parser.add_argument("--search-fast", action="store_true", help="--search: also ONNXOPT_EARLY_STOP=fast")
    parser.add_argument("--before-tree", help="--search: also run the onnxopt of this source tree (PYTHONPATH)")
    parser.add_argument("--speed", help="comma-separated real pairs: prune's own wall time (prune_speed.md)")
    parser.add_argument(
        "--speed-variants", default="prune,refit", help="--speed: prune (refit auto), refit (--prune-refit), norefit"
    )
    parser.add_argument(
        "--data-dir", help="--speed: where the pairs' .npz files are written once (default: CACHE/prune_speed)"
    )
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "onnxopt-bench"), help="bench/real.py's cache")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    parser.add_argument("--min-cosine", type=float, default=0.99, help="budget of the random-weight models")
    parser.add_argument("--skip", default="", help="comma-separated: tiny_mlp,mnist_cnn,resnet20,resnet50,calib")
    parser.add_argument("--calib", default="500,1000,2000,5000", help="mnist_cnn calibration sizes")
    parser.add_argument("--profile", help="directory: run each child under cProfile and print the top functions")
    args = parser.parse_args(argv)
    from _real_tasks import LOADERS, SPEED_ONLY  # bench/ is on the path (above)

    for option, known in (("speed", {**LOADERS, **SPEED_ONLY}), ("search", LOADERS)):
        unknown = [n for n in (getattr(args, option) or "").split(",") if n and n not in known]
        if unknown:
            parser.error(f"--{option}: unknown pair {', '.join(unknown)} (known: {', '.join(known)})")
    args.shared = str(Path(args.shared).resolve())  # the children run in a scratch directory
    load_average = os.getloadavg()[0]
    skip = set(args.skip.split(","))
    work = Path(tempfile.mkdtemp(prefix="onnxopt-own-cost-"))
    invocation = shlex.join(sys.argv[1:] if argv is None else argv)

    def report(rows: list[str], protocol: str, header: list[str], default: str) -> int:
        lines = [
            f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores "
            f"(1-minute load average {load_average:.1f} before the runs): `python bench/own_cost.py {invocation}`",
            "",
            protocol,
            "",
            *header,
            *rows,
        ]
        emit("\n".join(lines), args.out or str(ROOT / "bench" / "results" / default))
        return 0

    if args.speed:
        return report(
            speed([n for n in args.speed.split(",") if n], args, work),
            "`onnxopt run --passes prune` (and `--prune-refit`) on real pairs (bench/_real_tasks.py: calibration split "
            "as --data, budget split as --eval, the budget bench/real.py gives onnxopt), one child process per run; "
            "peak RSS is the child's (/usr/bin/time %M). The metric is the final validation on the budget split. "
            "Load: the 1-minute load average before and after each run; above 2 (the cores) other jobs shared the "
            "machine and the wall times are upper bounds.",
            SPEED_HEADER,
            "prune_speed.md",
        )
    if args.search:
        return report(
            search_cost([n for n in args.search.split(",") if n], args, work),
            "`onnxopt run --passes prune` on real pairs (bench/_real_tasks.py: calibration split, budget split as "
            "--eval, top-1 budget), budget checks with early stop off (`ONNXOPT_EARLY_STOP=off`) and on (the "
            "default). 'samples scored / full': evaluation samples the search's candidates were scored on, and what "
            "full checks would score; 'est. saved s': each stopped check's scoring time extrapolated to the samples it "
            "skipped (onnxopt's own estimate, in the report's details.search). The same sha256: the same model.",
            SEARCH_HEADER,
            "own_cost_search.md",
        )
    if not args.mnist:
        parser.error("--mnist is required (unless --search or --speed)")
    args.out = args.out or str(ROOT / "bench" / "results" / "own_cost.md")
    profile_dir = Path(args.profile) if args.profile else None
    train_x, train_y, test_x, test_y = load(args.mnist)
    accuracy_budget = ["--max-accuracy-drop", "0.5"]
    cosine_budget = ["--min-cosine", str(args.min_cosine)]

    def mnist_data(name: str, calib: int) -> tuple[Path, Path, Path]:
        rel, prep, _ = MODELS[name]
        model = ROOT / "models" / rel
        import onnx

        input_name = onnx.load(str(model), load_external_data=False).graph.input[0].name
        data, evaluation = work / f"{name}.calib{calib}.npz", work / f"{name}.eval.npz"
        np.savez(data, **{input_name: prep(train_x[:calib]).astype(np.float32), "labels": train_y[:calib]})
        np.savez(evaluation, **{input_name: prep(test_x[BUDGET]).astype(np.float32), "labels": test_y[BUDGET]})
        return model, data, evaluation

    def random_data(model: Path, shape: tuple[int, ...]) -> Path:
        import onnx

        input_name = onnx.load(str(model), load_external_data=False).graph.input[0].name
        path = work / f"{model.stem}.random.npz"
        np.savez(path, **{input_name: np.random.default_rng(0).random(shape, dtype=np.float32)})
        return path

    def run(label: str, samples: int, model: Path, data: Path, evaluation: Path | None, budget: list[str]) -> str:
        print(f"{label} ({samples} samples) ...", file=sys.stderr, flush=True)
        profile = profile_dir / f"{label.split()[0]}-{samples}.prof" if profile_dir else None
        if profile_dir:
            profile_dir.mkdir(parents=True, exist_ok=True)
        result = measure(model, data, evaluation, budget, work, args.timeout, profile)
        print(f"  {result['seconds']:.1f} s, {result['peak_mb']:.0f} MB, status {result['status']}", file=sys.stderr)
        if profile:
            _print_profile(profile)
        commands.append(f"- {label}, {samples} samples: `{result['command']}`")
        return _row(label, samples, result)

    commands: list[str] = []
    growth: list[str] = []
    done: dict[tuple[str, int], str] = {}
    for name in ("tiny_mlp", "mnist_cnn"):
        if name not in skip:
            done[name, 1000] = run(name, 1000, *mnist_data(name, 1000), accuracy_budget)
            growth.append(done[name, 1000])
    resnet20 = Path(args.shared) / "models/cifar10/cifar10_resnet20_akamaster_bn.onnx"
    if "resnet20" not in skip and resnet20.exists():
        growth.append(run("CIFAR ResNet-20", 32, resnet20, random_data(resnet20, (32, 3, 32, 32)), None, cosine_budget))
    if "resnet50" not in skip:
        resnet50 = work / "resnet50.onnx"
        subprocess.run([sys.executable, str(ROOT / "models" / "resnet.py"), "--arch", "resnet50", "-o", str(resnet50)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        data = random_data(resnet50, (32, 3, 224, 224))
        growth.append(run("ResNet-50 (random weights)", 32, resnet50, data, None, cosine_budget))
    calib_rows = []
    if "calib" not in skip:
        for size in [int(s) for s in args.calib.split(",") if s]:
            row = done.get(("mnist_cnn", size))  # the model-growth run already measured it
            calib_rows.append(row or run("mnist_cnn", size, *mnist_data("mnist_cnn", size), accuracy_budget))
    header = [
        "| model | params | MACs | calibration samples | wall s | peak RSS MB | per-pass s (stats included) "
        "| MACs / size after | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        f"Measured {datetime.date.today()} on {os.cpu_count()} CPU cores (1-minute load average "
        f"{load_average:.1f} before the runs; other jobs on the machine make wall times upper bounds): "
        f"`python bench/own_cost.py {invocation}`",
        "",
        f"`onnxopt run --passes {PASSES}` in a child process; peak RSS is that child's (/usr/bin/time %M). "
        "MNIST models: accuracy budget 0.5 pp on test images 0-4,999; random-weight models: "
        f"`--min-cosine {args.min_cosine}` on their own 32 random calibration images.",
        "",
        "Caveat on the random-weight rows: a randomly initialized ResNet maps every input to nearly the same output "
        "(ResNet-50: cosine 0.99999 between the outputs of two different random images), so no output-similarity "
        "budget constrains it and their 'after' ratios mean nothing. Their time and memory do: the prune search "
        "runs a fixed number of trials (7, then 3 per channel group) whatever the budget.",
        "",
        "As the model grows:",
        "",
        *header,
        *growth,
        "",
        "As the calibration data grows (mnist_cnn; evaluation stays 5,000 test images):",
        "",
        *header,
        *calib_rows,
        "",
        "Commands:",
        "",
        *commands,
    ]
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
