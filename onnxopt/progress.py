"""What ``onnxopt run`` shows while it works: progress bars on a terminal, plain lines otherwise (CLI only).

The engine never prints: :class:`onnxopt.manager.PassManager` emits :class:`~onnxopt.manager.ProgressEvent`
objects and :class:`ProgressView`, used only by :mod:`onnxopt.cli`, renders them on stdout:

- on a terminal, a bar with a rate and an ETA for calibration and validation (samples) and for each search
  (trial k of n, with the best passing candidate so far), cleared when the stage ends;
- when stdout is not a terminal (a pipe, a log file, CI), one plain line per finished stage and per trial,
  so a log reads in order and nothing is overwritten with carriage returns;
- in both, each pass's summary line as soon as the pass ends.

``--quiet`` builds no view at all. tqdm rather than rich: it has no dependencies (rich brings pygments and
markdown-it, about 10 times its size, for colours this output does not use), ``tqdm.write`` prints a line
above a live bar without breaking it, and its ``set_postfix_str`` carries the search's best-so-far.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from onnxopt.manager import PassRecord, ProgressEvent
    from onnxopt.validate import ValidationReport

__all__ = ["ProgressView", "pass_lines", "plural"]

_MAX_SKIPS_SHOWN = 10


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 sample``, ``2 samples``, ``1,000 channels``."""
    word = noun if count == 1 else (plural_form or noun + "s")
    return f"{count:,} {word}"


def pass_lines(record: PassRecord) -> list[str]:
    """The summary of one pass: what it did and the first skipped sites with their reasons."""
    state = "changed" if record.modified else "unchanged"
    if getattr(record, "reverted", None):  # its result missed the budget: the manager restored its input
        state = "reverted (result outside the budget)"
    counts = f"{plural(len(record.changes), 'site')} rewritten, {len(record.skipped):,} skipped"
    share = record.details.get("budget_share")
    within = f", within {share:.2g} of the budget (more lossy passes follow)" if share is not None else ""
    lines = [f"pass {record.name}: {state}, {counts}, {record.seconds:.2f} s{within}"]
    for skip in record.skipped[:_MAX_SKIPS_SHOWN]:
        lines.append(f"  skipped {skip.site}: {skip.reason}")
    if len(record.skipped) > _MAX_SKIPS_SHOWN:
        lines.append(f"  ... {plural(len(record.skipped) - _MAX_SKIPS_SHOWN, 'more skipped site')} in the report")
    return lines


def describe_best(weights: float | None, report: ValidationReport | None) -> str:
    """``best: weights 0.62x, accuracy 96.80%`` for the smallest passing candidate, or ``no candidate passed yet``."""
    if weights is None or report is None:
        return "no candidate passed yet"
    metric = ""
    if report.accuracy is not None:
        metric = f", accuracy {report.accuracy['after']:.2f}%"
    elif report.task_mse is not None:
        metric = f", task MSE {report.task_mse['after']:.4g}"
    elif report.outputs:
        metric = f", cosine {min(d.cosine for d in report.outputs.values()):.5f}"
    return f"best: weights {weights:.2f}x{metric}"


class ProgressView:
    """Renders progress events; call it with each event, then :meth:`close` once (also after an error).

    Args:
        stream: where to write (stdout).
        live: draw tqdm bars (a terminal); ``None``: ``stream.isatty()``.
        min_interval: seconds between two redraws of a bar.
    """

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None, min_interval: float = 0.2) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.min_interval = min_interval
        self._bar = None  # the live bar, with the (kind, stage) it shows
        self._bar_key: tuple[str, str] | None = None
        self._started: dict[tuple[str, str], float] = {}
        self._pending: str | None = None  # plain mode: a samples line waiting for its stage to end

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "samples":
            self._samples(event)
        elif event.kind == "trial":
            self._trial(event)
        elif event.kind == "pass_end" and event.record is not None:
            self._end_bar()
            self._flush()
            for line in pass_lines(event.record):
                self._line(line)

    def close(self) -> None:
        """Clear a bar still shown and print a stage line still pending (before the final table or an error)."""
        self._end_bar()
        self._flush()

    # --- event kinds ---------------------------------------------------------------------------------------

    def _samples(self, event: ProgressEvent) -> None:
        key = ("samples", event.stage)
        start = self._started.setdefault(key, time.perf_counter())
        finished = event.total is not None and event.done >= event.total
        if self.live:
            bar = self._bar_for(key, event.stage, event.total, " samples")  # "24.1 samples/s"
            bar.update(event.done - bar.n)
        else:
            self._pending = f"{event.stage}: {plural(event.done, 'sample')}, {time.perf_counter() - start:.1f} s"
        if finished:
            self._started.pop(key, None)
            self._end_bar()
            self._flush()

    def _trial(self, event: ProgressEvent) -> None:
        self._flush()
        best = describe_best(event.best_weights, event.best)
        if self.live:
            bar = self._bar_for(("trial", event.stage), f"{event.stage} search", event.total, "trial")
            if event.total is not None and bar.total != event.total:
                bar.total = event.total
            bar.set_postfix_str(best, refresh=False)
            bar.update(event.done - bar.n)
            return
        of = f" of {event.total}" if event.total else ""
        self._line(f"{event.stage} search: trial {event.done}{of} {'ok' if event.ok else 'over the budget'}; {best}")

    # --- output --------------------------------------------------------------------------------------------

    def _bar_for(self, key: tuple[str, str], desc: str, total: int | None, unit: str):
        """The live bar for ``key``; tqdm writes ``unit`` after the rate (``3.4s/trial``, ``24 samples/s``)."""
        if self._bar is not None and self._bar_key == key:
            return self._bar
        self._end_bar()
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=self.stream,
            leave=False,
            dynamic_ncols=True,
            mininterval=self.min_interval,
            miniters=1,
        )
        self._bar_key = key
        return self._bar

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._bar_key = None, None

    def _flush(self) -> None:
        if self._pending is not None:
            line, self._pending = self._pending, None
            self._line(line)

    def _line(self, text: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()
