"""Self-contained HTML report of one ``onnxopt run``: ``render(report) -> str``, written by ``run --html PATH``.

The page has, in order: summary cards and a before/after table (params, MACs, bytes, latency, accuracy or task
MSE), the validation (verdict, budget, failures, per-output metrics), two plots, what each pass changed and
skipped (with the reasons and its time), and a per-layer table of params and MACs before and after.

- Layers are matched by node name (the pass manager makes names unique before the first pass); a layer only
  in the original is "removed", one only in the result "added". A layer is listed when it has parameters or
  MACs on either side. The totals are :mod:`onnxopt.cost`'s (a weight shared by several nodes counts once).
- Plots (matplotlib, Agg canvas, no pyplot state) are embedded as base64 PNG: MACs per layer before vs after
  (horizontal bars), and the main validation metric (accuracy, else task MSE, else the worst cosine) against
  the serialized size after each pipeline stage (:class:`onnxopt.manager.StageRecord`).
- No external resource, no script: CSS is inline, and every string that comes from the model, the data or
  a pass is HTML-escaped (node names may contain ``<``).

matplotlib is imported only when rendering; :func:`require_matplotlib` lets the CLI fail fast without it.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxopt.errors import UsageError

if TYPE_CHECKING:
    from onnxopt.cost import ModelCost, NodeCost
    from onnxopt.manager import PassRecord, RunReport, StageRecord
    from onnxopt.validate import ValidationReport

__all__ = ["render", "write", "require_matplotlib", "layer_rows", "LayerRow"]

_BEFORE, _AFTER = "#9aa9bd", "#2563eb"
_MAX_PLOTTED_LAYERS = 60
_MAX_LISTED_SITES = 500


def require_matplotlib() -> None:
    """Raise a one-line :class:`UsageError` naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--html needs matplotlib: pip install 'onnxopt[report]'") from None


def write(path: str | os.PathLike, page: str) -> Path:
    """Write ``page`` to ``path`` atomically (a temporary file beside it, then renamed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One layer of the per-layer table; ``before``/``after`` is ``None`` where the layer does not exist."""

    name: str
    before: NodeCost | None
    after: NodeCost | None

    @property
    def status(self) -> str:
        if self.after is None:
            return "removed"
        if self.before is None:
            return "added"
        same = (self.before.params, self.before.macs, self.before.op_type) == (
            self.after.params,
            self.after.macs,
            self.after.op_type,
        )
        return "" if same else "changed"


def layer_rows(before: ModelCost, after: ModelCost) -> list[LayerRow]:
    """Layers with parameters or MACs on either side, matched by node name, in model order.

    Original layers keep their order; an added layer goes after the last matched layer before it in the result.
    """
    old = _keyed(before.nodes)
    new = _keyed(after.nodes)
    order = list(old)
    position = {key: i for i, key in enumerate(order)}
    inserted: dict[int, list[str]] = {}  # index in `order` after which the added layers go (-1: at the start)
    anchor = -1
    for key in new:
        if key in position:
            anchor = position[key]
        else:
            inserted.setdefault(anchor, []).append(key)
    keys = inserted.get(-1, [])
    for i, key in enumerate(order):
        keys.append(key)
        keys.extend(inserted.get(i, []))
    rows = [LayerRow(_display_name(key), old.get(key), new.get(key)) for key in keys]
    return [r for r in rows if any(c is not None and (c.params or c.macs) for c in (r.before, r.after))]


def render(
    report: RunReport,
    *,
    latency: Mapping[str, float] | None = None,
    model_name: str = "model",
    output_name: str | None = None,
) -> str:
    """The HTML page for ``report`` (with ``latency`` = ``{"before": us, "after": us}`` when measured)."""
    require_matplotlib()
    rows = layer_rows(report.before, report.after)
    metric = _main_metric(report)
    pipeline = " → ".join(r.name for r in report.passes) or "(no passes)"
    subtitle = f"{_e(model_name)}" + (f" → {_e(output_name)}" if output_name else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>onnxopt report: {_e(model_name)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f'<header><h1>onnxopt report</h1><p class="sub">{subtitle}</p>',
        f'<p class="sub">pipeline: <span class="pipeline">{_e(pipeline)}</span> · {report.seconds:.2f} s</p></header>',
        _cards(report, latency),
        _summary(report, latency),
        _validation(report.validation),
        _plots(report, rows, metric),
        _passes(report.passes),
        _layers(report, rows),
        f"<footer>onnxopt {_e(_version())} · self-contained: no scripts, no external resources</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


# --- sections -----------------------------------------------------------------------------------------------


def _cards(report: RunReport, latency: Mapping[str, float] | None) -> str:
    validation = report.validation
    if validation is None:
        verdict = ('<span class="badge neutral">not validated</span>', "validation skipped")
    elif validation.ok:
        verdict = ('<span class="badge ok">OK</span>', "within the error budget")
    else:
        verdict = ('<span class="badge fail">FAILED</span>', "misses the error budget")
    cards = [("verdict", *verdict)]
    for label, b, a in (
        ("parameters", report.before.params, report.after.params),
        ("MACs", report.before.macs, report.after.macs),
        ("file size", report.before.bytes, report.after.bytes),
    ):
        cards.append((label, f"{_ratio(a, b)}×" if b else "–", f"{_short(b)} → {_short(a)}"))
    if latency is not None:
        cards.append(("latency", f"{_ratio(latency['after'], latency['before'])}×", _latency_text(latency)))
    if validation is not None and validation.accuracy is not None:
        acc = validation.accuracy
        change = f"from {acc['before']:.2f}% ({acc['after'] - acc['before']:+.2f} pp)"
        cards.append(("accuracy", f"{acc['after']:.2f}%", change))
    elif validation is not None and validation.task_mse is not None:
        mse = validation.task_mse
        cards.append(("task MSE", f"{mse['after']:.4g}", f"from {mse['before']:.4g}"))
    items = "".join(
        f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{value}</div>'
        f'<div class="detail">{_e(detail)}</div></div>'
        for label, value, detail in cards
    )
    return f'<section class="cards">{items}</section>'


def _summary(report: RunReport, latency: Mapping[str, float] | None) -> str:
    before, after = report.before, report.after
    rows = [
        ("parameters", f"{before.params:,}", f"{after.params:,}", _ratio(after.params, before.params)),
        ("MACs", f"{before.macs:,}", f"{after.macs:,}", _ratio(after.macs, before.macs)),
        ("other ops", f"{before.ops:,}", f"{after.ops:,}", _ratio(after.ops, before.ops)),
        ("file bytes", f"{before.bytes:,}", f"{after.bytes:,}", _ratio(after.bytes, before.bytes)),
    ]
    if latency is not None:
        b, a = latency["before"], latency["after"]
        rows.append(("latency (µs, median)", f"{b:.1f}", f"{a:.1f}", _ratio(a, b)))
    validation = report.validation
    if validation is not None and validation.accuracy is not None:
        acc = validation.accuracy
        change = f"{acc['after'] - acc['before']:+.2f} pp"
        rows.append(("accuracy (%)", f"{acc['before']:.2f}", f"{acc['after']:.2f}", change))
    if validation is not None and validation.task_mse is not None:
        mse = validation.task_mse
        rows.append(("task MSE", f"{mse['before']:.4g}", f"{mse['after']:.4g}", _ratio(mse["after"], mse["before"])))
    body = "".join(f"<tr><th>{_e(r[0])}</th>{''.join(f'<td>{_e(c)}</td>' for c in r[1:])}</tr>" for r in rows)
    return (
        '<section id="summary"><h2>Before and after</h2>'
        '<table class="num"><thead><tr><th></th><th>before</th><th>after</th><th>after / before</th></tr></thead>'
        f"<tbody>{body}</tbody></table></section>"
    )


def _validation(validation: ValidationReport | None) -> str:
    head = '<section id="validation"><h2>Validation</h2>'
    if validation is None:
        return head + "<p>Validation was skipped (<code>--no-validate</code>).</p></section>"
    badge = '<span class="badge ok">OK</span>' if validation.ok else '<span class="badge fail">FAILED</span>'
    out = [
        head,
        f"<p>{badge} on {validation.samples:,} samples of {_e(validation.data)}.</p>",
        f"<p>Budget: <b>{_e(validation.budget.describe())}</b>.</p>",
    ]
    if validation.accuracy is not None:
        acc = validation.accuracy
        out.append(
            f"<p>Accuracy {acc['before']:.2f}% → {acc['after']:.2f}% (drop {acc['before'] - acc['after']:.2f} pp).</p>"
        )
    if validation.task_mse is not None:
        mse = validation.task_mse
        out.append(f"<p>Task MSE {mse['before']:.4g} → {mse['after']:.4g}.</p>")
    if validation.failures:
        items = "".join(f"<li>{_e(f)}</li>" for f in validation.failures)
        out.append(f'<div class="failures"><b>Failures</b><ul>{items}</ul></div>')
    if validation.checker_error:
        out.append(f'<p class="failures">ONNX checker: {_e(validation.checker_error)}</p>')
    if validation.outputs:
        rows = []
        for name, diff in validation.outputs.items():
            top1 = "–" if diff.top1_agreement is None else f"{diff.top1_agreement:.4f}"
            cells = [f"{diff.max_abs:.3g}", f"{diff.max_rel:.3g}", f"{diff.scaled_abs:.3g}", f"{diff.cosine:.6f}"]
            cells += [f"{diff.rel_l2:.3g}", top1]
            rows.append(f"<tr><th><code>{_e(name)}</code></th>{''.join(f'<td>{c}</td>' for c in cells)}</tr>")
        out.append(
            '<table class="num"><thead><tr><th>output</th><th>max |Δ|</th><th>max rel</th><th>scaled |Δ|</th>'
            "<th>worst cosine</th><th>worst rel L2</th><th>top-1 agreement</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            '<p class="note">Worst per-sample cosine and relative L2; scaled |Δ| = max |Δ| / max(1, max |y|); '
            "top-1 agreement: the fraction of samples whose argmax is unchanged.</p>"
        )
    out.append("</section>")
    return "".join(out)


def _plots(report: RunReport, rows: list[LayerRow], metric: tuple[str, str, bool] | None) -> str:
    out = ['<section id="plots"><h2>Plots</h2>']
    mac_rows = [r for r in rows if any(c is not None and c.macs for c in (r.before, r.after))]
    if mac_rows:
        png, note = _macs_plot(mac_rows)
        out.append(_figure(png, "MACs per layer, before and after", note))
    else:
        out.append("<p>No layer has MACs (no Conv, Gemm or MatMul with known shapes).</p>")
    stages = list(report.stages)
    if stages:
        png, note = _stage_plot(stages, metric, report.validation)
        caption = (
            f"{metric[1]} against file size after each pipeline stage"
            if metric is not None
            else "File size after each pipeline stage (no validation metric recorded)"
        )
        out.append(_figure(png, caption, note))
        out.append(_stage_table(stages, metric))
    out.append("</section>")
    return "".join(out)


def _passes(records: Sequence[PassRecord]) -> str:
    out = ['<section id="passes"><h2>Passes</h2>']
    if not records:
        return out[0] + "<p>No pass ran.</p></section>"
    rows = []
    for index, r in enumerate(records, 1):
        state = '<span class="badge ok">changed</span>'
        if not r.modified:
            state = '<span class="badge neutral">unchanged</span>'
        stats = f" (+{r.stats_seconds:.2f} s statistics)" if r.stats_seconds else ""
        rows.append(
            f'<tr><td>{index}</td><th><a href="#pass-{index}">{_e(r.name)}</a></th><td class="text">{state}</td>'
            f"<td>{len(r.changes)}</td><td>{len(r.skipped)}</td><td>{r.seconds:.2f} s{stats}</td></tr>"
        )
    out.append(
        '<table class="num"><thead><tr><th>#</th><th class="text">pass</th><th class="text">result</th>'
        f"<th>sites changed</th><th>sites skipped</th><th>time</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    for index, r in enumerate(records, 1):
        out.append(f'<div class="pass" id="pass-{index}"><h3>{index}. {_e(r.name)}</h3>')
        if not r.changes and not r.skipped:
            out.append('<p class="note">Nothing to change and nothing declined.</p>')
        out.append(_site_list("Changed", r.changes, "what", open_=True))
        out.append(_site_list("Skipped", r.skipped, "reason", open_=len(r.skipped) <= 20))
        out.append("</div>")
    out.append("</section>")
    return "".join(out)


def _site_list(title: str, items: Sequence[Any], field: str, *, open_: bool) -> str:
    if not items:
        return ""
    shown = items[:_MAX_LISTED_SITES]
    rows = "".join(f"<tr><td><code>{_e(i.site)}</code></td><td>{_e(getattr(i, field))}</td></tr>" for i in shown)
    more = ""
    if len(items) > len(shown):
        more = f'<p class="note">… {len(items) - len(shown):,} more in the JSON report (<code>--report</code>).</p>'
    head = "reason" if field == "reason" else "what"
    return (
        f"<details{' open' if open_ else ''}><summary>{title} ({len(items):,})</summary>"
        f'<table class="sites"><thead><tr><th>site</th><th>{head}</th></tr></thead><tbody>{rows}</tbody></table>'
        f"{more}</details>"
    )


def _layers(report: RunReport, rows: list[LayerRow]) -> str:
    body = []
    for row in rows:
        b, a = row.before, row.after
        op = _op_text(b, a)
        cells = [
            _count(b, "params"),
            _count(a, "params"),
            _ratio_cell(b, a, "params"),
            _count(b, "macs"),
            _count(a, "macs"),
            _ratio_cell(b, a, "macs"),
        ]
        status = row.status
        tag = f'<span class="tag {status}">{status}</span>' if status else ""
        body.append(
            f'<tr class="{status or "same"}"><th><code>{_e(row.name)}</code></th><td class="text">{_e(op)}</td>'
            f'{"".join(f"<td>{c}</td>" for c in cells)}<td class="text">{tag}</td></tr>'
        )
    before, after = report.before, report.after
    total = (
        f"<tr><th>total (model)</th><td></td><td>{before.params:,}</td><td>{after.params:,}</td>"
        f"<td>{_ratio(after.params, before.params)}</td><td>{before.macs:,}</td><td>{after.macs:,}</td>"
        f"<td>{_ratio(after.macs, before.macs)}</td><td></td></tr>"
    )
    counts = {s: sum(1 for r in rows if r.status == s) for s in ("changed", "removed", "added")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no layer changed"
    return (
        '<section id="layers"><h2>Layers</h2>'
        f'<p class="note">{len(rows)} layers with parameters or MACs, matched by node name: {_e(summary)}. '
        "Ratios are after / before. Totals count a weight shared by several nodes once; after quantization the "
        "weights are held by the DequantizeLinear nodes that read them.</p>"
        '<table class="num layers"><thead><tr><th>layer</th><th class="text">op</th><th>params before</th>'
        "<th>params after</th><th>ratio</th><th>MACs before</th><th>MACs after</th><th>ratio</th>"
        '<th class="text"></th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody><tfoot>{total}</tfoot></table></section>"
    )


# --- plots --------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=144, facecolor="white")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _macs_plot(rows: list[LayerRow]) -> tuple[str, str]:
    note = ""
    if len(rows) > _MAX_PLOTTED_LAYERS:
        largest = sorted(rows, key=lambda r: -max(_get(r.before, "macs"), _get(r.after, "macs")))
        keep = {id(r) for r in largest[:_MAX_PLOTTED_LAYERS]}
        note = f"The {_MAX_PLOTTED_LAYERS} layers with the most MACs of {len(rows)}; all are in the table below."
        rows = [r for r in rows if id(r) in keep]
    n = len(rows)
    figure = _new_figure(9.0, max(2.4, 0.42 * n + 1.3))
    ax = figure.add_subplot()
    before = [_get(r.before, "macs") for r in rows]
    after = [_get(r.after, "macs") for r in rows]
    ys = range(n)
    height = 0.38
    ax.barh([y - height / 2 for y in ys], before, height, color=_BEFORE, label="before")
    ax.barh([y + height / 2 for y in ys], after, height, color=_AFTER, label="after")
    ax.set_yticks(list(ys), [_plot_label(r.name) for r in rows], fontsize=9)
    ax.invert_yaxis()
    top = max(before + after) or 1
    ax.set_xlim(0, top * 1.16)
    for y, row, b, a in zip(ys, rows, before, after, strict=True):
        text = row.status if row.status in ("removed", "added") else (f"{a / b:.2g}×" if b else "")
        ax.text(max(a, b) + top * 0.01, y, text, va="center", fontsize=8, color="#374151")
    ax.xaxis.set_major_formatter(_si_formatter())
    ax.set_xlabel("MACs (batch 1)")
    ax.grid(axis="x", color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(loc="lower right", frameon=False, fontsize=9)
    return _png(figure), note


def _stage_plot(
    stages: list[StageRecord], metric: tuple[str, str, bool] | None, validation: ValidationReport | None
) -> tuple[str, str]:
    figure = _new_figure(9.0, 4.2)
    ax = figure.add_subplot()
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    scale, unit = _size_unit(max(s.bytes for s in stages))
    if metric is None:
        labels = [f"{i}. {_plot_label(s.name, 18)}" for i, s in enumerate(stages)]
        ax.bar(range(len(stages)), [s.bytes / scale for s in stages], color=_AFTER)
        ax.set_xticks(range(len(stages)), labels, fontsize=8, rotation=20, ha="right")
        ax.set_ylabel(f"file size ({unit})")
        return _png(figure), ""
    field, label, _higher_is_better = metric
    known = [getattr(s, field) is not None and math.isfinite(getattr(s, field)) for s in stages]
    points = [(i, s.bytes / scale, getattr(s, field)) for i, s in enumerate(stages) if known[i]]
    unknown = [s.name for s, ok in zip(stages, known, strict=True) if not ok]
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, color=_AFTER, linewidth=1.2, alpha=0.5, zorder=1)
    colors = [_BEFORE if i == 0 else _AFTER for i, _, _ in points]
    ax.scatter(xs, ys, s=46, color=colors, zorder=2, edgecolors="white", linewidths=0.8)
    groups: dict[tuple[float, float], list[str]] = {}
    for i, x, y in points:
        groups.setdefault((x, y), []).append(f"{i}. {stages[i].name}")
    for (x, y), names in groups.items():
        text = _plot_label(", ".join(names), 40)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8, color="#374151")
    limit = _budget_line(metric, stages[0], validation)
    if limit is not None:
        ax.axhline(limit, color="#dc2626", linestyle="--", linewidth=1)
        ax.annotate("budget", (1.0, limit), xycoords=("axes fraction", "data"), fontsize=8, color="#dc2626",
                    ha="right", va="bottom")  # fmt: skip
    if xs:
        span = max(xs) - min(xs) or max(xs) or 1
        ax.set_xlim(max(0.0, min(xs) - 0.08 * span), max(xs) + 0.25 * span)
    ax.margins(y=0.18)
    ax.set_xlabel(f"file size ({unit})")
    ax.set_ylabel(label)
    note = "Stages are numbered in pipeline order (0 is the original)."
    if unknown:
        note += f" Without a recorded metric (a fixed setting checks nothing): {', '.join(unknown)}."
    return _png(figure), note


def _stage_table(stages: list[StageRecord], metric: tuple[str, str, bool] | None) -> str:
    rows = []
    for i, s in enumerate(stages):
        value = "–"
        if metric is not None and getattr(s, metric[0]) is not None:
            value = _metric_text(metric[0], getattr(s, metric[0]))
        rows.append(
            f"<tr><td>{i}</td><th>{_e(s.name)}</th><td>{s.bytes:,}</td><td>{value}</td>"
            f'<td class="text">{_e(s.source or "unknown")}</td></tr>'
        )
    label = metric[1] if metric is not None else "metric"
    return (
        '<table class="num stages"><thead><tr><th>#</th><th class="text">stage</th><th>file bytes</th>'
        f'<th>{_e(label)}</th><th class="text">metric from</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
        '<p class="note">No extra model runs: a lossy stage\'s metric is its last passing budget check (the setting '
        "it kept); unchanged and exact stages carry the one before; the original and the result come from the "
        "final validation.</p>"
    )


def _budget_line(
    metric: tuple[str, str, bool], original: StageRecord, validation: ValidationReport | None
) -> float | None:
    if validation is None:
        return None
    budget, field = validation.budget, metric[0]
    base = getattr(original, field)
    if field == "accuracy" and budget.max_accuracy_drop is not None and base is not None:
        return base - budget.max_accuracy_drop
    if field == "task_mse" and budget.max_mse_increase is not None and base is not None:
        return base * (1 + budget.max_mse_increase)
    if field == "cosine" and budget.min_cosine is not None:
        return budget.min_cosine
    return None


# --- helpers ------------------------------------------------------------------------------------------------


def _main_metric(report: RunReport) -> tuple[str, str, bool] | None:
    """(StageRecord field, axis label, higher is better) of the metric the plot shows, if any stage has one."""
    for field, label, higher in (
        ("accuracy", "accuracy (%)", True),
        ("task_mse", "task MSE", False),
        ("cosine", "worst per-sample cosine", True),
    ):
        if any(getattr(s, field) is not None for s in report.stages):
            return field, label, higher
    return None


def _metric_text(field: str, value: float) -> str:
    if field == "accuracy":
        return f"{value:.2f}"
    if field == "cosine":
        return f"{value:.6f}"
    return f"{value:.4g}"


def _keyed(nodes: Sequence[NodeCost]) -> dict[str, NodeCost]:
    """Nodes keyed by name; unnamed or repeated names get a suffix that cannot clash with a real name."""
    keyed: dict[str, NodeCost] = {}
    for index, node in enumerate(nodes):
        key = node.name if node.name else f"\0unnamed {node.op_type} #{index}"
        occurrence = 1
        while key in keyed:
            occurrence += 1
            key = f"{node.name}\0{occurrence}"
        keyed[key] = node
    return keyed


def _display_name(key: str) -> str:
    if key.startswith("\0"):
        return f"({key[1:]})"
    name, _, occurrence = key.partition("\0")
    return f"{name} ({occurrence})" if occurrence else name


def _get(cost: NodeCost | None, field: str) -> int:
    return getattr(cost, field) if cost is not None else 0


def _count(cost: NodeCost | None, field: str) -> str:
    return "–" if cost is None else f"{getattr(cost, field):,}"


def _ratio_cell(before: NodeCost | None, after: NodeCost | None, field: str) -> str:
    if before is None or after is None:
        return ""
    b, a = getattr(before, field), getattr(after, field)
    if b == a:
        return "1" if b else ""
    return "0" if b and not a else _ratio(a, b)


def _op_text(before: NodeCost | None, after: NodeCost | None) -> str:
    if before is not None and after is not None and before.op_type != after.op_type:
        return f"{before.op_type} → {after.op_type}"
    return (after or before).op_type  # type: ignore[union-attr]


def _ratio(after: float, before: float) -> str:
    if not before:
        return "–"
    value = after / before
    return f"{value:.3f}" if math.isfinite(value) else "–"


def _short(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.0f}"


def _latency_text(latency: Mapping[str, float]) -> str:
    return f"{latency['before']:.1f} → {latency['after']:.1f} µs"


def _size_unit(largest: int) -> tuple[float, str]:
    if largest >= 1 << 30:
        return float(1 << 30), "GiB"
    if largest >= 1 << 20:
        return float(1 << 20), "MiB"
    return 1024.0, "KiB"


def _si_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: _short(v) if v else "0")


def _plot_label(text: str, width: int = 32) -> str:
    """A node name for a matplotlib label: its last ``width`` characters, ``$`` escaped (no mathtext)."""
    text = text if len(text) <= width else "…" + text[-(width - 1) :]
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _figure(png: str, caption: str, note: str) -> str:
    note_html = f'<p class="note">{_e(note)}</p>' if note else ""
    return (
        f'<figure><img src="data:image/png;base64,{png}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption>{note_html}</figure>"
    )


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _version() -> str:
    from onnxopt import __version__

    return __version__


_CSS = """
:root { --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; --soft: #f8fafc; --accent: #2563eb;
  --ok: #15803d; --ok-bg: #dcfce7; --fail: #b91c1c; --fail-bg: #fee2e2; }
* { box-sizing: border-box; }
body { margin: 0; background: #f1f5f9; color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 24px auto; padding: 28px 36px; background: #fff; border-radius: 10px;
  box-shadow: 0 1px 3px rgba(15, 23, 42, .08); }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { margin: 36px 0 12px; font-size: 20px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { margin: 22px 0 8px; font-size: 16px; }
.sub { margin: 2px 0; color: var(--muted); overflow-wrap: anywhere; }
.pipeline { color: var(--fg); font-weight: 600; }
code { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; margin-top: 20px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: var(--soft); }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 650; margin: 2px 0; font-variant-numeric: tabular-nums; }
.card .detail { color: var(--muted); font-size: 13px; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 1px 10px; border-radius: 999px; font-size: 13px; font-weight: 650; }
.card .badge { font-size: 18px; }
.badge.ok { color: var(--ok); background: var(--ok-bg); }
.badge.fail { color: var(--fail); background: var(--fail-bg); }
.badge.neutral { color: var(--muted); background: #eef2f7; }
table { border-collapse: collapse; margin: 10px 0; font-size: 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
thead th { text-align: right; color: var(--muted); font-weight: 600; font-size: 12.5px;
  border-bottom: 2px solid var(--line); white-space: nowrap; }
tbody th { text-align: left; font-weight: 500; }
table.num td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.num td.text, table.num th.text { text-align: left; }
thead th:first-child, tbody th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: var(--soft); }
tfoot th, tfoot td { font-weight: 650; border-top: 2px solid var(--line); border-bottom: 0; text-align: right; }
tfoot th { text-align: left; }
table.layers { width: 100%; }
table.layers tbody th { max-width: 360px; }
tr.removed th code, tr.removed td { color: var(--muted); }
tr.removed th code { text-decoration: line-through; }
.tag { font-size: 12px; padding: 0 7px; border-radius: 4px; }
.tag.changed { background: #dbeafe; color: #1d4ed8; }
.tag.removed { background: var(--fail-bg); color: var(--fail); }
.tag.added { background: var(--ok-bg); color: var(--ok); }
table.sites { width: 100%; }
table.sites th { text-align: left; }
table.sites td:first-child { width: 32%; }
details { margin: 6px 0 10px; }
summary { cursor: pointer; color: var(--accent); font-weight: 600; }
.failures { color: var(--fail); background: var(--fail-bg); padding: 8px 12px; border-radius: 6px; }
.failures ul { margin: 4px 0; }
figure { margin: 18px 0 26px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 6px; }
.note { color: var(--muted); font-size: 13.5px; }
a { color: var(--accent); text-decoration: none; }
footer { margin-top: 40px; padding-top: 10px; color: var(--muted); font-size: 12.5px;
  border-top: 1px solid var(--line); }
@media print { body { background: #fff; } main { box-shadow: none; margin: 0; } }
"""
