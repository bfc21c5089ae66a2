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

The markup is a Jinja2 template with autoescaping, ``onnxopt/templates/report.html.j2`` (CSS in
``report.css`` beside it), shipped as package data; this module computes and formats the values it shows.
matplotlib and jinja2 (the ``report`` extra) are imported only when rendering; :func:`require_matplotlib`
lets the CLI fail fast without them.
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
    from onnxopt.goal import GoalResult, Point
    from onnxopt.manager import PassRecord, RunReport, StageRecord
    from onnxopt.validate import ValidationReport

__all__ = ["render", "write", "require_matplotlib", "layer_rows", "LayerRow"]

_BEFORE, _AFTER = "#9aa9bd", "#2563eb"
_MAX_PLOTTED_LAYERS = 60
_MAX_LISTED_SITES = 500


def require_matplotlib() -> None:
    """Raise a one-line :class:`UsageError` naming the extra to install when matplotlib or jinja2 is missing."""
    for module in ("matplotlib", "jinja2"):
        try:
            __import__(module)
        except ImportError:
            raise UsageError(f"--html needs {module}: pip install 'onnxopt[report]'") from None


def write(path: str | os.PathLike, page: str) -> Path:
    """Write ``page`` to ``path`` atomically (a temporary file beside it, then renamed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # as open() would: mkstemp's 0600 is for secrets, not a report
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
    goal: GoalResult | None = None,
) -> str:
    """The HTML page for ``report`` (with ``latency`` = ``{"before": us, "after": us}`` when measured).

    ``goal``: the search of ``run --target`` (:mod:`onnxopt.goal`), shown as a table of every point it tried and an
    inline SVG plot of the metric against the target's ratio, the Pareto front highlighted.
    """
    require_matplotlib()
    rows = layer_rows(report.before, report.after)
    metric = _main_metric(report)
    before, after = report.before, report.after
    counts = {s: sum(1 for r in rows if r.status == s) for s in ("changed", "removed", "added")}
    page = _template().render(
        model_name=model_name,
        output_name=output_name,
        pipeline=" → ".join(r.name for r in report.passes) or "(no passes)",
        seconds=f"{report.seconds:.2f} s",
        cards=_cards(report, latency),
        summary=_summary(report, latency),
        validation=_validation(report.validation),
        **_plots(report, rows, metric),
        passes=[_pass(r) for r in report.passes],
        max_sites=_MAX_LISTED_SITES,
        layers=[_layer(row) for row in rows],
        layer_summary=", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no layer changed",
        layer_total=[
            f"{before.params:,}",
            f"{after.params:,}",
            _ratio(after.params, before.params),
            f"{before.macs:,}",
            f"{after.macs:,}",
            _ratio(after.macs, before.macs),
        ],  # fmt: skip
        version=_version(),
        goal=_goal(goal, report.validation),
    )
    return page.rstrip("\n") + "\n"


def _template():
    """The page template (package data under ``onnxopt/templates``), autoescaped.

    Values are escaped with :func:`html.escape` (``"`` as ``&quot;``) rather than markupsafe's numeric
    entities, so the page reads the same as before the template; ``Markup`` values are left alone.
    """
    import jinja2
    from markupsafe import Markup

    def escape(value: object) -> Markup:
        return value if isinstance(value, Markup) else Markup(html.escape(str(value), quote=True))

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("onnxopt", "templates"),
        autoescape=True,
        finalize=escape,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("report.html.j2")


# --- sections: plain values for the template, formatted here -------------------------------------------------


def _cards(report: RunReport, latency: Mapping[str, float] | None) -> list[dict[str, Any]]:
    validation = report.validation
    if validation is None:
        verdict = {"value": "not validated", "badge": "neutral", "detail": "validation skipped"}
    elif validation.ok:
        verdict = {"value": "OK", "badge": "ok", "detail": "within the error budget"}
    else:
        verdict = {"value": "FAILED", "badge": "fail", "detail": "misses the error budget"}
    cards = [{"label": "verdict", **verdict}]
    for label, b, a in (
        ("parameters", report.before.params, report.after.params),
        ("MACs", report.before.macs, report.after.macs),
        ("file size", report.before.bytes, report.after.bytes),
    ):
        cards.append(_card(label, f"{_ratio(a, b)}×" if b else "–", f"{_short(b)} → {_short(a)}"))
    if latency is not None:
        cards.append(_card("latency", f"{_ratio(latency['after'], latency['before'])}×", _latency_text(latency)))
    if validation is not None and validation.accuracy is not None:
        acc = validation.accuracy
        change = f"from {acc['before']:.2f}% ({acc['after'] - acc['before']:+.2f} pp)"
        cards.append(_card("accuracy", f"{acc['after']:.2f}%", change))
    elif validation is not None and validation.task_mse is not None:
        mse = validation.task_mse
        cards.append(_card("task MSE", f"{mse['after']:.4g}", f"from {mse['before']:.4g}"))
    return cards


def _card(label: str, value: str, detail: str) -> dict[str, Any]:
    return {"label": label, "value": value, "badge": None, "detail": detail}


def _summary(report: RunReport, latency: Mapping[str, float] | None) -> list[tuple[str, str, str, str]]:
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
    return rows


def _validation(validation: ValidationReport | None) -> dict[str, Any] | None:
    if validation is None:
        return None
    lines = []
    if validation.accuracy is not None:
        acc = validation.accuracy
        lines.append(
            f"Accuracy {acc['before']:.2f}% → {acc['after']:.2f}% (drop {acc['before'] - acc['after']:.2f} pp)."
        )
    if validation.task_mse is not None:
        mse = validation.task_mse
        lines.append(f"Task MSE {mse['before']:.4g} → {mse['after']:.4g}.")
    outputs = []
    for name, diff in validation.outputs.items():
        top1 = "–" if diff.top1_agreement is None else f"{diff.top1_agreement:.4f}"
        cells = [f"{diff.max_abs:.3g}", f"{diff.max_rel:.3g}", f"{diff.scaled_abs:.3g}", f"{diff.cosine:.6f}"]
        outputs.append((name, [*cells, f"{diff.rel_l2:.3g}", top1]))
    return {
        "ok": validation.ok,
        "samples": f"{validation.samples:,}",
        "data": validation.data,
        "budget": validation.budget.describe(),
        "lines": lines,
        "failures": list(validation.failures),
        "checker_error": validation.checker_error,
        "outputs": outputs,
    }


def _plots(report: RunReport, rows: list[LayerRow], metric: tuple[str, str, bool] | None) -> dict[str, Any]:
    """``macs_figure``, ``stage_figure`` (``{png, caption, note}`` or ``None``), ``stages`` and ``metric_label``."""
    out: dict[str, Any] = {"macs_figure": None, "stage_figure": None, "stages": [], "metric_label": "metric"}
    mac_rows = [r for r in rows if any(c is not None and c.macs for c in (r.before, r.after))]
    if mac_rows:
        png, note = _macs_plot(mac_rows)
        out["macs_figure"] = {"png": png, "caption": "MACs per layer, before and after", "note": note}
    stages = list(report.stages)
    if stages:
        png, note = _stage_plot(stages, metric, report.validation)
        caption = (
            f"{metric[1]} against file size after each pipeline stage"
            if metric is not None
            else "File size after each pipeline stage (no validation metric recorded)"
        )
        out["stage_figure"] = {"png": png, "caption": caption, "note": note}
        out["metric_label"] = metric[1] if metric is not None else "metric"
        for s in stages:
            value = "–"
            if metric is not None and getattr(s, metric[0]) is not None:
                value = _metric_text(metric[0], getattr(s, metric[0]))
            out["stages"].append(
                {"name": s.name, "bytes": f"{s.bytes:,}", "value": value, "source": s.source or "unknown"}
            )
    return out


def _pass(record: PassRecord) -> dict[str, Any]:
    stats = f" (+{record.stats_seconds:.2f} s statistics)" if record.stats_seconds else ""
    return {
        "name": record.name,
        "modified": record.modified,
        "reverted": getattr(record, "reverted", None),
        "changes": list(record.changes),
        "skipped": list(record.skipped),
        "time": f"{record.seconds:.2f} s{stats}",
    }


def _layer(row: LayerRow) -> dict[str, Any]:
    b, a = row.before, row.after
    cells = [
        _count(b, "params"),
        _count(a, "params"),
        _ratio_cell(b, a, "params"),
        _count(b, "macs"),
        _count(a, "macs"),
        _ratio_cell(b, a, "macs"),
    ]
    return {"name": row.name, "op": _op_text(b, a), "cells": cells, "status": row.status}


# --- the goal search's Pareto plot (inline SVG, drawn by the template) -------------------------------------------

_SVG_SIZE = (660, 360)
_SVG_PAD = (70, 24, 18, 46)  # left, right, top, bottom


def _goal(goal: GoalResult | None, validation: ValidationReport | None) -> dict[str, Any] | None:
    """The goal section: the verdict, the plot's geometry (one marker per point with both coordinates) and a row
    per point. x is the target's ratio (latency or size, to the original), y the task metric (else the worst
    cosine); the original sits at (1, its metric); the budget's bound and the target are dashed lines."""
    if goal is None:
        return None
    target = goal.target
    points = list(goal.points)
    with_metric = any(p.metric_after is not None for p in points)
    metric = next((p for p in points if p.metric_after is not None), None)

    def y_of(p: Point) -> float | None:
        value = p.metric_after if with_metric else p.cosine
        return value if value is not None and math.isfinite(value) else None

    plotted = [(p, target.value(p), y_of(p)) for p in points]
    plotted = [(p, x, y) for p, x, y in plotted if x is not None and y is not None and math.isfinite(x)]
    original_y = (metric.metric_before if metric is not None else None) if with_metric else 1.0
    bound = _goal_bound(validation, metric, with_metric)
    xs = [x for _, x, _ in plotted] + [1.0, target.ratio]
    ys = [y for _, _, y in plotted] + [v for v in (original_y, bound) if v is not None and math.isfinite(v)]
    x0, x1 = 0.0, max(1.1, max(xs) * 1.08)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    spread = (y1 - y0) or max(abs(y1) * 0.01, 1e-3)
    y0, y1 = y0 - 0.12 * spread, y1 + 0.12 * spread
    width, height = _SVG_SIZE
    left, right, top, bottom = _SVG_PAD
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return round(left + (x - x0) / (x1 - x0) * plot_w, 1)

    def sy(y: float) -> float:
        return round(top + (y1 - y) / (y1 - y0) * plot_h, 1)

    markers, labelled = [], {}
    for p, x, y in plotted:
        state = "reached" if p.reached else ("ok" if p.ok else "over")
        title = f"{p.pipeline}: {_goal_metric_text(p)}; {target.kind} {x:.3f}x; {state}"
        marker = {"cx": sx(x), "cy": sy(y), "front": p.on_front, "state": state, "label": p.pipeline, "title": title}
        first = labelled.setdefault((marker["cx"], marker["cy"]), marker)
        if first is not marker:  # the same spot (a pass that changed nothing): one label for all of them
            first["label"] += f" = {p.pipeline}"
            marker["label"] = ""
        markers.append(marker)
    markers.sort(key=lambda m: m["front"])  # front markers drawn last, on top of any they share a spot with
    front = sorted(((x, y) for p, x, y in plotted if p.on_front), key=lambda xy: xy[0])
    y_label = (f"{metric.metric} after" if metric is not None else "metric") if with_metric else "worst cosine"
    return {
        "target": target.describe(),
        "reached": goal.reached,
        "reason": goal.reason,
        "chosen": goal.chosen.pipeline if goal.chosen is not None else None,
        "seconds": f"{goal.seconds:.1f} s",
        "svg": {
            "width": width,
            "height": height,
            "left": left,
            "top": top,
            "right": width - right,
            "bottom": height - bottom,
            "markers": markers,
            "front": " ".join(f"{sx(x)},{sy(y)}" for x, y in front),
            "x_ticks": [{"at": sx(v), "text": f"{v:g}"} for v in _ticks(x0, x1)],
            "y_ticks": [{"at": sy(v), "text": f"{v:.4g}"} for v in _ticks(y0, y1)],
            "original": None if original_y is None else {"cx": sx(1.0), "cy": sy(original_y)},
            "target_x": sx(target.ratio),
            "bound_y": None if bound is None or not y0 <= bound <= y1 else sy(bound),
            "x_label": f"{target.kind} / original",
            "y_label": y_label,
        },
        "unplotted": [p.pipeline for p in points if not any(p is q for q, _, _ in plotted)],
        "rows": [_goal_row(p) for p in points],
        "skipped": list(goal.skipped),
    }


def _goal_bound(validation: ValidationReport | None, metric: Point | None, with_metric: bool) -> float | None:
    """The budget's worst allowed y: the metric before less the allowed drop, or the cosine floor."""
    if validation is None:
        return None
    budget = validation.budget
    if not with_metric:
        return budget.min_cosine
    if metric is None or metric.metric_before is None:
        return None
    drop = budget.max_metric_drop
    if drop is None and metric.metric in ("top1", "accuracy"):
        drop = budget.max_accuracy_drop
    if drop is None:
        return None
    return metric.metric_before - drop if metric.metric_higher_is_better else metric.metric_before + drop


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values between ``low`` and ``high`` (steps of 1, 2 or 5 times a power of ten)."""
    raw = (high - low) / count
    if not raw > 0 or not math.isfinite(raw):
        return [low]
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step) + 1)]


def _goal_metric_text(p: Point) -> str:
    if p.metric is not None and p.metric_after is not None:
        drop = "" if p.metric_drop is None else f" (drop {p.metric_drop:+.4g})"
        return f"{p.metric} {p.metric_after:.4g}{drop}"
    return "–" if p.cosine is None else f"cosine {p.cosine:.5f}"


def _goal_row(p: Point) -> dict[str, Any]:
    def cell(value: float | None, spec: str) -> str:
        return "–" if value is None or not math.isfinite(value) else format(value, spec)

    return {
        "pipeline": p.pipeline,
        "front": p.on_front,
        "state": "reached" if p.reached else ("ok" if p.ok else "over"),
        "cells": [
            _goal_metric_text(p) if p.metric is not None else "–",
            cell(p.cosine, ".5f"),
            cell(p.latency_ratio, ".3f")
            + ("" if p.latency_ratio_batch1 is None else f" / {cell(p.latency_ratio_batch1, '.3f')}"),
            cell(p.size_ratio, ".3f"),
            cell(p.macs_ratio, ".3f"),
            f"{p.seconds:.1f} s",
        ],
        "note": p.note,
    }


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


def _version() -> str:
    from onnxopt import __version__

    return __version__
