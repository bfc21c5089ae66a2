"""What the command line prints: the before/after table, MAC-count notes, validation and metric lines, goal points.

Only :mod:`onnxopt.cli` calls these; with :mod:`onnxopt.progress` (each pass's line as it ends) they are the only
places that print.
"""

from __future__ import annotations

from onnxopt.progress import plural

__all__ = [
    "print_run",
    "print_goal",
    "goal_point_line",
    "print_validation",
    "metric_line",
    "print_table",
    "print_profiles",
    "print_cost_shapes",
    "print_partial",
    "shapes_text",
]


def goal_point_line(point) -> str:
    """One point of the goal search: its pipeline, metric, ratios, verdict and time."""
    parts = []
    if point.metric is not None and point.metric_after is not None:
        drop = f" (drop {point.metric_drop:+.4g})" if point.metric_drop is not None else ""
        before = f"{point.metric_before:.4g} -> " if point.metric_before is not None else ""
        parts.append(f"{point.metric} {before}{point.metric_after:.4g}{drop}")
    if point.cosine is not None:
        parts.append(f"cosine {point.cosine:.5f}")
    for label, value in (("latency", point.latency_ratio), ("size", point.size_ratio), ("MACs", point.macs_ratio)):
        if value is not None:
            parts.append(f"{label} {value:.3f}x")
            if label == "latency" and point.latency_ratio_batch1 is not None:
                parts[-1] += f" ({point.latency_ratio_batch1:.3f}x on one sample)"
    verdict = "within the budget" if point.ok else "over the budget"
    if point.reached:
        verdict += ", reaches the target"
    parts.append(verdict)
    if point.note:
        parts.append(point.note)
    return f"{point.pipeline}: {', '.join(parts)}, {point.seconds:.1f} s"


def print_goal(result) -> None:
    """Every point the goal search tried, as a table (``*``: on the Pareto front of the target's ratio and the
    metric, among the points within the budget)."""
    metric = next((p.metric for p in result.points if p.metric is not None), None)
    one = any(p.latency_ratio_batch1 is not None for p in result.points)
    header = ("pipeline", f"{metric} drop" if metric else "metric", "cosine", "latency", "size", "MACs", "budget", "s")
    rows = [header[:4] + ("1 sample",) * one + header[4:]]

    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for p in result.points:
        verdict = ("ok" if p.ok else "over") + (", target" if p.reached else "")
        rows.append(
            (
                p.pipeline + (" *" if p.on_front else ""),
                cell(p.metric_drop, "+.4g"),
                cell(p.cosine, ".5f"),
                cell(p.latency_ratio, ".3f"),
                *((cell(p.latency_ratio_batch1, ".3f"),) if one else ()),
                cell(p.size_ratio, ".3f"),
                cell(p.macs_ratio, ".3f"),
                verdict,
                f"{p.seconds:.1f}",
            )
        )
    shapes = shapes_text(result.latency_inputs)
    print(f"goal points ({result.target.describe()}; * on the Pareto front; latency timed on {shapes}):")
    print_table(rows)
    for skipped in result.skipped:
        print(f"  not tried: {skipped}")


def print_run(report, latency: dict[str, float] | None) -> None:
    """The before/after table and the validation (each pass's line was printed as it ended: ProgressView)."""
    before, after = report.before, report.after
    rows = [("", "before", "after", "ratio")]
    for label, b, a in (
        ("params", before.params, after.params),
        ("MACs", before.macs, after.macs),
        ("bytes", before.bytes, after.bytes),
    ):
        rows.append((label, f"{b:,}", f"{a:,}", f"{a / b:.3f}" if b else "-"))
    if latency is not None:
        rows.append(
            (
                "latency us",
                f"{latency['before']:.1f}",
                f"{latency['after']:.1f}",
                f"{latency['after'] / latency['before']:.3f}",
            )
        )
    if report.validation is not None and report.validation.accuracy is not None:
        acc = report.validation.accuracy
        rows.append(("accuracy %", f"{acc['before']:.2f}", f"{acc['after']:.2f}", ""))
    if report.validation is not None and report.validation.task_mse is not None:
        mse = report.validation.task_mse
        rows.append(("task MSE", f"{mse['before']:.4g}", f"{mse['after']:.4g}", f"{mse['after'] / mse['before']:.3f}"))
    print_table(rows)
    print_cost_shapes(before, getattr(report, "cost_shapes_from", None))
    for label, counted in (("before", before), ("after", after)):
        print_partial(counted, f"MACs {label}")
    if latency is not None and "inputs" in latency:
        print(f"latency timed on {shapes_text(latency['inputs'])} ({latency['inputs_from']})")
    if report.validation is not None:
        print_validation(report.validation)


def shapes_text(shapes) -> str:
    from onnxopt.cost import describe_shapes

    return describe_shapes(shapes)


def print_cost_shapes(counted, shapes_from: str | None) -> None:
    """One line: the input shapes MACs were counted at, and where they come from."""
    source = f" ({shapes_from})" if shapes_from else ""
    print(f"MACs counted at {shapes_text(counted.input_shapes)}{source}")


def print_partial(counted, label: str = "MACs") -> None:
    """A note when a MAC count is partial: how many nodes it leaves out, the first few by name and why."""
    if not counted.macs_partial:
        return
    missing = counted.uncounted
    shown = "; ".join(f"{u.node} ({u.op_type}: {u.reason})" for u in missing[:3])
    more = f"; {len(missing) - 3} more in the report" if len(missing) > 3 else ""
    print(f"note: {label} are partial, {len(missing)} nodes not counted: {shown}{more}")


def print_validation(report) -> None:
    print(
        f"validation on {plural(report.samples, 'sample')} of {report.data} ({report.budget.describe()}): "
        f"{'ok' if report.ok else 'FAILED'}"
    )
    for name, diff in report.outputs.items():
        top1 = f", top-1 agreement {diff.top1_agreement:.4f}" if diff.top1_agreement is not None else ""
        exact = f", {100 * diff.mismatch:.3g}% of values differ" if diff.mismatch is not None else ""
        if diff.nonfinite or diff.nonfinite_mismatch:
            exact += f", {diff.nonfinite} NaN/Inf ({diff.nonfinite_mismatch} unmatched)"
        print(f"  {name}: max abs {diff.max_abs:.3g}, cosine {diff.cosine:.6f}, rel L2 {diff.rel_l2:.3g}{top1}{exact}")
    if report.metric is not None:
        print(f"  {metric_line(report.metric)}")
    for failure in report.failures:
        print(f"  failed: {failure}")


def metric_line(m) -> str:
    """One line for a task metric: its values, the drop and its bootstrap interval."""
    direction = "higher" if m.higher_is_better else "lower"
    output = f" on '{m.output}'" if m.output else ""
    text = f"metric {m.name}{output} ({direction} is better): "
    if m.drop is None:
        text += f"{m.after:.4f}"
        of = "value"
    else:
        text += f"{m.before:.4f} -> {m.after:.4f}, drop {m.drop:.4f}"
        of = "drop"
    if m.interval is not None:
        text += f", {100 * m.confidence:g}% interval of the {of} [{m.interval[0]:.4f}, {m.interval[1]:.4f}]"
    return text


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in pairs]
        print("  ".join(cells))


def print_profiles(named, top: int = 5) -> None:
    """``onnxopt bench --profile``: time per kind of kernel side by side, then each model's slowest kernels."""
    from onnxopt.profile import kinds_rows

    if not named:
        return
    first = named[0][1]
    threads = plural(first.threads, "thread")
    print(
        f"\nwhere the time goes (onnxruntime's profiler, all optimizations, {threads}, median of {first.runs} runs; "
        "us per kind of kernel, share of the model's kernel time; profiled one model after the other):"
    )
    print_table(kinds_rows(named))
    for name, prof in named:
        print(f"{name}: slowest kernels on {shapes_text(prof.feeds)}")
        for kernel in prof.top(top):
            print(f"  {kernel.us:9,.0f} us  {kernel.kind:<20} {kernel.op:<14} {kernel.name}")
