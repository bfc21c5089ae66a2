"""The whole comparison in one command: onnxopt against onnxslim, onnxruntime quantization and onnxsim on MNIST.

    python bench/run.py --mnist ../shared/data/mnist [--shared ../shared] [--out-dir bench/results]
                        [--budget 0.5] [--rounds 41] [--only tiny_mlp,...] [--tools onnxslim,onnxopt prune,...]
    python bench/run.py --mnist ../shared/data/mnist --only tiny_mlp --quick --out-dir /tmp/quick   # < 1 min

Models: the reference models in models/ (tiny_mlp, mnist_mlp, mnist_cnn, mobile_cnn) and, when ``--shared``
holds them, the third-party MNIST models (lenet5, lenet5_bn, mlp6, mnist8). Rows, per model:

- ``original``; ``onnxslim`` (lossless peer);
- ``ort quantize_static``: onnxruntime's ``quantize_static`` called directly with its defaults (QDQ, int8
  activations and weights, per tensor, MinMax); ``ort quantize_dynamic``: ``quantize_dynamic`` with its
  defaults. Where the call fails or its output does not load (opset < 13 models), it is retried once on the
  model converted to opset 13 by onnx's version converter, and the row says so;
- ``onnxsim L2`` / ``onnxsim Wanda``: onnxsim 0.8.1's structured pruning (``apply_structured_pruning``,
  ``apply_structured_wanda_pruning`` calibrated on the calibration images), at the largest sparsity of 0.1,
  0.2 ... 0.9 that keeps the budget on the budget split (the search is part of its tool time);
  ``onnxsim int8``: ``onnxsim.quantize_static`` (its static int8 path: MinMax ranges from the calibration
  images, per-channel weights), retried on opset 13 like onnxruntime's when it fails or changes nothing;
- ``onnxopt <pipeline>``: onnxopt's PassManager (what ``onnxopt run`` does) with the accuracy budget on the
  budget split, passes alone and combined, default options unless the label says otherwise (``quant``
  keeps float where int8 is slower; ``quant:size`` keeps int8 for size).

The protocol (bench/_protocol.py), the same for every tool: calibration on MNIST training images 0-999;
the accuracy budget (``--budget`` percentage points, default 0.5) checked on test images 0-4,999; accuracy
reported on the held-out test images 5,000-9,999, and on the full test set for reference. Columns: file size,
MACs (onnxopt's cost model) and latency as ratios to the original; latency is onnxruntime with full graph
optimizations at 1 intra-op thread, the model's batch (1 when dynamic) of real images, the median of
``--rounds`` rounds interleaved over the original and every variant of the model, so ratios hold on a
shared, noisy machine; "within budget" compares the budget-split accuracy drop with ``--budget``; tool time
is the wall time of the tool's call (searches and validation included). Writes ``run.md`` (through emit) and
``run.png`` (held-out accuracy against latency ratio, one panel per model) into ``--out-dir``.
Needs the ``bench`` extra (onnxslim, onnxsim, matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import logging
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import PROTOCOL, ROOT, Case, accuracy, cases, load, macs  # noqa: E402
from _report import emit  # noqa: E402

# label -> [(pass name, options)]; run by onnxopt's PassManager under the accuracy budget
ONNXOPT = {
    "prune": [("prune", {})],
    "prune+refit": [("prune", {"refit": True})],
    "split": [("split", {})],
    "svd": [("svd", {})],
    "quant": [("quant", {})],
    "quant:size": [("quant", {"objective": "size"})],
    "share": [("share", {})],
    "prune,svd,quant": [("prune", {}), ("svd", {}), ("quant", {})],
    "prune,svd,share": [("prune", {}), ("svd", {}), ("share", {})],
    "prune+refit,split,quant": [("prune", {"refit": True}), ("split", {}), ("quant", {})],
}


QUICK = ("onnxslim", "ort quantize_static", "ort quantize_dynamic", "onnxsim L2", "onnxsim int8", "onnxopt prune",
         "onnxopt quant")  # fmt: skip


@dataclasses.dataclass
class Row:
    tool: str
    path: Path | None = None
    seconds: float = 0.0
    note: str = ""
    error: str = ""
    size: float = 1.0
    macs: float = 1.0
    latency: float = float("nan")
    budget_acc: float = float("nan")
    heldout_acc: float = float("nan")
    test_acc: float = float("nan")
    within: bool = True  # the budget-split accuracy drop is within the budget


@contextlib.contextmanager
def _quiet():
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def _opset(path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _to_opset13(path: Path, work: Path) -> Path:
    proto = onnx.version_converter.convert_version(onnx.load(str(path)), 13)
    out = work / "opset13.onnx"
    onnx.save(proto, str(out))
    return out


def _loads(path: Path, case: Case) -> None:
    """Raise when onnxruntime cannot load or run ``path`` (e.g. per-axis QDQ below opset 13)."""
    from onnxopt.runtime import Session

    session = Session(path, optimize=True)
    session.run({case.input_name: case.budget[0][: case.batch or 1]})


def _retry_opset13(run: Callable[[Path, Path], Path], unchanged: Callable[[Path], bool] | None = None):
    """Run the tool on the model; if it fails, its output does not load or (``unchanged``) it did nothing,
    run it once more on the model converted to opset 13 and say so."""

    def tool(case: Case, work: Path) -> tuple[Path, str]:
        try:
            out = run(case.path, work / "out.onnx")
            _loads(out, case)
            if unchanged is not None and unchanged(out):
                raise RuntimeError("model returned unchanged")
            return out, ""
        except Exception as e:
            if _opset(case.path) >= 13:
                if unchanged is not None and "unchanged" in str(e):
                    return out, "returned the model unchanged (no int8 inserted)"
                raise
            first = " ".join(str(e).split())[:60]
            out = run(_to_opset13(case.path, work), work / "out13.onnx")
            _loads(out, case)
            return out, f"opset {_opset(case.path)} → 13 first (as-is: {first})"

    return tool


def _onnxslim(case: Case, work: Path) -> tuple[Path, str]:
    import onnxslim

    out = work / "out.onnx"
    with _quiet():
        onnx.save(onnxslim.slim(str(case.path)), str(out))
    return out, ""


def _ort_static(src: Path, dst: Path, case: Case) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(case.calib_batches())

        def get_next(self):
            return next(self.batches, None)

    with _quiet():
        quantize_static(str(src), str(dst), Reader())
    return dst


def _ort_dynamic(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst))
    return dst


def _onnxsim_int8(src: Path, dst: Path, case: Case) -> Path:
    import onnxsim

    with _quiet():
        onnx.save(onnxsim.quantize_static(str(src), calibration_data=case.calib_batches()), str(dst))
    return dst


def _no_qdq(path: Path) -> bool:
    return not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)


def _onnxsim_prune(wanda: bool, budget: float):
    def tool(case: Case, work: Path) -> tuple[Path, str]:
        import onnxsim

        base = accuracy(case.path, *case.budget)
        best, best_sparsity = case.path, 0.0
        for sparsity in np.arange(0.1, 0.95, 0.1):
            try:
                with _quiet():
                    if wanda:
                        pruned = onnxsim.apply_structured_wanda_pruning(
                            str(case.path), case.calib_batches(), sparsity=float(sparsity)
                        )
                    else:
                        pruned = onnxsim.apply_structured_pruning(str(case.path), sparsity=float(sparsity))
            except Exception as e:  # a peer failing at some sparsity is a result: keep the best so far
                logging.info("onnxsim failed at %.1f: %s", sparsity, e)
                break
            out = work / f"s{sparsity:.1f}.onnx"
            onnx.save(pruned, str(out))
            if base - accuracy(out, *case.budget) <= budget + 1e-9:
                best, best_sparsity = out, float(sparsity)
        note = f"sparsity {best_sparsity:.1f}" if best is not case.path else "no sparsity within budget: original"
        return best, note

    return tool


def _onnxopt(steps, budget: float):
    def tool(case: Case, work: Path) -> tuple[Path, str]:
        from onnxopt import graph, registry
        from onnxopt.manager import PassManager
        from onnxopt.validate import Budget

        passes = [registry.make_pass(name, **options) for name, options in steps]
        report = PassManager(
            passes, data=case.calib, eval_data=case.budget_data, budget=Budget(max_accuracy_drop=budget)
        ).run(case.path)
        out = work / "out.onnx"
        graph.save(report.model, out)
        lossy = {name for name, _ in steps}
        idle = [r.name for r in report.passes if r.name in lossy and not r.modified]
        notes = [f"{', '.join(idle)}: no change"] if idle else []
        if not report.ok:
            notes.append("validation failed")
        return out, "; ".join(notes)

    return tool


def tools(budget: float) -> dict[str, Callable[[Case, Path], tuple[Path, str]]]:
    table = {
        "onnxslim": _onnxslim,
        "ort quantize_static": lambda case, work: _retry_opset13(lambda s, d: _ort_static(s, d, case))(case, work),
        "ort quantize_dynamic": _retry_opset13(_ort_dynamic),
        "onnxsim L2": _onnxsim_prune(False, budget),
        "onnxsim Wanda": _onnxsim_prune(True, budget),
        "onnxsim int8": lambda case, work: _retry_opset13(lambda s, d: _onnxsim_int8(s, d, case), _no_qdq)(case, work),
    }
    table.update({f"onnxopt {label}": _onnxopt(steps, budget) for label, steps in ONNXOPT.items()})
    return table


def bench_model(case: Case, selected: dict, budget: float, rounds: int) -> list[Row]:
    from onnxopt.runtime import measure_latency

    base = Row("original", case.path)
    rows = [base]
    for label, tool in selected.items():
        print(f"{case.name}: {label} ...", file=sys.stderr, flush=True)
        row = Row(label)
        work = Path(tempfile.mkdtemp(prefix=f"bench-{case.name}-"))
        start = time.perf_counter()
        try:
            row.path, row.note = tool(case, work)
            row.seconds = time.perf_counter() - start
            _loads(row.path, case)
        except Exception as e:  # a tool failing is a result
            row.seconds = time.perf_counter() - start
            row.error = " ".join(f"{type(e).__name__}: {e}".split())[:100]
            row.path = None
        rows.append(row)
    base_macs = macs(case.path)
    for row in rows:
        if row.path is None:
            continue
        row.size = row.path.stat().st_size / case.path.stat().st_size
        with contextlib.suppress(Exception):  # quantized ops the cost model does not know
            row.macs = macs(row.path) / base_macs
        row.budget_acc = accuracy(row.path, *case.budget)
        row.heldout_acc = accuracy(row.path, *case.heldout)
        row.test_acc = (row.budget_acc + row.heldout_acc) / 2  # the two halves of the test set
    measured = [row for row in rows if row.path is not None]
    feeds = {case.input_name: case.heldout[0][: case.batch or 1]}
    print(f"{case.name}: latency of {len(measured)} models, {rounds} interleaved rounds ...", file=sys.stderr)
    latencies = measure_latency([row.path for row in measured], feeds, rounds=rounds)
    for row, latency in zip(measured, latencies, strict=True):
        row.latency = latency.median_us / latencies[0].median_us
    base.note = f"{latencies[0].median_us:.0f} µs, batch {case.batch or 1}, {base_macs:,} MACs"
    return rows


def table(results: dict[str, list[Row]], budget: float) -> list[str]:
    lines = [
        "| model | tool | size | MACs | latency | held-out acc % (Δ pp) | within budget | full-test acc % "
        "| tool s | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in results.items():
        base = rows[0]
        for row in rows:
            if row.error:
                lines.append(f"| {model} | {row.tool} | failed | | | | | | {row.seconds:.1f} | {row.error} |")
                continue
            drop = base.budget_acc - row.budget_acc
            delta = row.heldout_acc - base.heldout_acc
            acc = f"{row.heldout_acc:.2f}" + ("" if row is base else f" ({delta:+.2f})")
            row.within = drop <= budget + 1e-9
            within = "" if row is base else ("yes" if row.within else f"no ({-drop:+.2f})")
            lines.append(
                f"| {model} | {row.tool} | {row.size:.3f} | {row.macs:.3f} | {row.latency:.2f} | {acc} | {within} "
                f"| {row.test_acc:.2f} | {row.seconds:.1f} | {row.note} |"
            )
    return lines


PEER_COLORS = ["#000000", "#7f7f7f", "#d62728", "#ff7f0e", "#8c564b", "#bcbd22", "#e377c2"]
ONNXOPT_COLORS = ["#1f77b4", "#17becf", "#2ca02c", "#98df8a", "#9467bd", "#c5b0d5", "#aec7e8", "#393b79", "#006d2c"]
MARKERS = "osD^v<>PXhp*dH8D"  # the 16th reuses D in an onnxopt colour
SUMMARY_HEADING = "Summary, per model: latency ratio / size ratio / held-out Δ pp (✗: over the budget on its split)"


def rows_from_table(text: str) -> dict[str, list[Row]]:
    """The results back from a run.md full table (for ``--replot``)."""
    results: dict[str, list[Row]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10 or cells[0] in ("model", "---") or not line.startswith("| "):
            continue
        row = Row(cells[1])
        if cells[2] == "failed":
            row.error = cells[9]
        else:
            row.size, row.macs, row.latency = float(cells[2]), float(cells[3]), float(cells[4])
            row.heldout_acc, row.test_acc, row.seconds = float(cells[5].split()[0]), float(cells[7]), float(cells[8])
            row.note, row.within = cells[9], cells[6] in ("", "yes")
        results.setdefault(cells[0], []).append(row)
    return results


def summary(results: dict[str, list[Row]]) -> list[str]:
    """One row per tool, one column per model: latency / size / held-out accuracy change."""
    models = list(results)
    tools_seen = list(dict.fromkeys(row.tool for rows in results.values() for row in rows if row.tool != "original"))
    lines = [f"| tool | {' | '.join(models)} |", "|---|" + "---|" * len(models)]
    for tool in tools_seen:
        cells = []
        for model in models:
            rows = results[model]
            row = next((r for r in rows if r.tool == tool), None)
            if row is None:
                cells.append("")
            elif row.error:
                cells.append("failed")
            else:
                delta = row.heldout_acc - rows[0].heldout_acc
                flag = "" if row.within else " ✗"
                cells.append(f"{row.latency:.2f} / {row.size:.2f} / {delta:+.2f}{flag}")
        lines.append(f"| {tool} | {' | '.join(cells)} |")
    return lines


def _styles(labels: list[str]) -> dict[str, tuple[str, str]]:
    """A marker and colour per tool: peers in greys and warm colours, onnxopt's pipelines in blues and greens."""
    peers = [label for label in labels if not label.startswith("onnxopt")]
    ours = [label for label in labels if label.startswith("onnxopt")]
    style = {label: (MARKERS[i % len(MARKERS)], PEER_COLORS[i % len(PEER_COLORS)]) for i, label in enumerate(peers)}
    for i, label in enumerate(ours):
        style[label] = (MARKERS[(len(peers) + i) % len(MARKERS)], ONNXOPT_COLORS[i % len(ONNXOPT_COLORS)])
    return style


def plot(results: dict[str, list[Row]], budget: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    style = _styles(list(dict.fromkeys(row.tool for rows in results.values() for row in rows)))
    count = len(results)
    cols = min(count, 4)
    nrows = (count + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols + 2.6, 3.4 * nrows + 0.7), squeeze=False)
    for ax, (model, rows) in zip(axes.flat, results.items(), strict=False):
        shown = [row for row in rows if not row.error and not np.isnan(row.latency)]
        base = rows[0].heldout_acc
        floor = base - max(3 * budget, 1.5)
        lowest = min(min(r.heldout_acc for r in shown), base - budget)
        ax.axhline(base, color="grey", lw=0.8)
        ax.axhline(base - budget, color="grey", lw=0.8, ls="--")
        ax.axvline(1.0, color="grey", lw=0.8)
        for row in shown:
            marker, color = style[row.tool]
            y = max(row.heldout_acc, floor)
            ax.scatter(row.latency, y, marker=marker if y == row.heldout_acc else "v", color=color, s=48,
                       edgecolors="black", linewidths=0.4, alpha=0.9, zorder=3)  # fmt: skip
            if y != row.heldout_acc:
                ax.annotate(f"{row.heldout_acc:.1f}", (row.latency, y), fontsize=6, xytext=(4, 2),
                            textcoords="offset points")  # fmt: skip
        low, high = min(r.latency for r in shown), max(r.latency for r in shown)
        ax.set_xscale("log")
        ax.set_xlim(min(low, 1.0) / 1.25, max(high, 1.0) * 1.25)
        ticks = [t for t in (0.125, 0.25, 0.5, 0.75, 1, 1.5, 2, 4, 8, 16) if low / 1.25 <= t <= high * 1.25 or t == 1]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.set_ylim(max(floor, lowest) - 0.15, max(r.heldout_acc for r in shown) + 0.25)
        ax.set_title(f"{model} (fp32 {base:.2f}%)", fontsize=10)
        ax.set_xlabel("latency ratio to fp32 (log; < 1 faster)", fontsize=8)
        ax.set_ylabel("held-out accuracy %", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], marker=m, color=c, ls="", markeredgecolor="black", markersize=7) for m, c in style.values()
    ]
    fig.legend(handles, list(style), loc="center right", fontsize=8, frameon=False)
    fig.suptitle(
        "MNIST, held-out test images 5,000-9,999: accuracy vs onnxruntime latency at 1 thread (interleaved medians)\n"
        f"solid line: fp32; dashed: budget (−{budget} pp); ▼ pinned at the floor: accuracy below the panel, printed",
        fontsize=9 if cols > 2 else 6,
    )
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / (3.6 * cols + 2.6), 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


# the package a peer's label needs (its first word), from the ``bench`` extra; the other tools need the core only
PEER_PACKAGES = {"onnxslim": "onnxslim", "onnxsim": "onnxsim"}


def missing_packages(labels: list[str]) -> list[str]:
    """The peer packages the tools ``labels`` need that are not installed (sorted, each once)."""
    import importlib.util

    needed = {PEER_PACKAGES[label.split()[0]] for label in labels if label.split()[0] in PEER_PACKAGES}
    return sorted(name for name in needed if importlib.util.find_spec(name) is None)


def missing_peers(labels: list[str], install: str) -> str | None:
    """Why the tools ``labels`` cannot all run (their packages missing, and ``install``, the command that adds them),
    or ``None``: a script stops on it before a run that would fill their rows with ``ModuleNotFoundError``."""
    missing = missing_packages(labels)
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    names = ", ".join(missing)
    return f"the peers need {names}, which {verb} not installed: {install}, or name the tools to run with --tools"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", help="directory with the four MNIST IDX .gz files")
    parser.add_argument("--replot", action="store_true", help="only redraw run.png and the summary from run.md")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="../shared (third-party models)")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--budget", type=float, default=0.5, help="accuracy drop allowed, percentage points")
    parser.add_argument("--rounds", type=int, default=41, help="interleaved latency rounds")
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--tools", help="';'-separated tool labels (they contain commas; default: all)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}; 9 latency rounds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    out_dir = Path(args.out_dir)
    if args.replot:
        text = (out_dir / "run.md").read_text().split(f"\n{SUMMARY_HEADING}")[0].rstrip("\n")
        results = rows_from_table(text)
        emit("\n".join([text, "", SUMMARY_HEADING, "", *summary(results)]), str(out_dir / "run.md"))
        plot(results, args.budget, out_dir / "run.png")
        return 0
    if not args.mnist:
        parser.error("--mnist is required")
    available = tools(args.budget)
    wanted = args.tools.split(";") if args.tools else list(QUICK if args.quick else available)
    if args.quick:
        args.rounds = min(args.rounds, 9)
    unknown = [t for t in wanted if t not in available]
    if unknown:
        parser.error(f"unknown tool(s) {unknown}; choose from {list(available)}")
    if why := missing_peers(wanted, "pip install -c constraints.txt -e '.[bench]' (make bench does)"):
        parser.error(why)
    selected = {t: available[t] for t in wanted}
    mnist = load(args.mnist)
    results = {}
    started = time.perf_counter()
    command = shlex.join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])

    def document() -> list[str]:
        return [
            f"Measured {datetime.date.today()} on a shared 2-core machine "
            f"(about {time.perf_counter() - started:.0f} s): `{command}`",
            "",
            f"Protocol: {PROTOCOL}; budget {args.budget} pp. Size, MACs and latency are ratios to the original "
            f"(latency: onnxruntime, 1 intra-op thread, median of {args.rounds} rounds interleaved over all variants "
            "of a model; other agents share the CPU, so treat differences under about 10% as noise). "
            "Tool s: wall time of the tool's call, searches and validation included. See bench/run.py's docstring.",
            "",
            *table(results, args.budget),
            "",
            SUMMARY_HEADING,
            "",
            *summary(results),
        ]

    out_dir.mkdir(parents=True, exist_ok=True)
    for case in cases(mnist, args.shared, args.only):
        results[case.name] = bench_model(case, selected, args.budget, args.rounds)
        (out_dir / "run.md").write_text("\n".join(document()) + "\n")  # partial results survive a crash
    lines = document()
    emit("\n".join(lines), str(out_dir / "run.md"))
    if results:
        plot(results, args.budget, out_dir / "run.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
