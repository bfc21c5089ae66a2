"""What ``prune`` checks before it hands its result on: the budget holds, and the model is not slower than its input.

Budget: the search checks each setting it tries, but the setting it ends on when nothing stronger passes — ratio 0
(dead channels only), the apoz threshold 1.0, the constant threshold 0 — was never checked: "dead" on the
calibration data need not be dead on the evaluation data (on the PP-OCR direction classifier, removing the 83
channels in 9 layers that never fired on its one calibration image took the cosine on 12 photographs to 0.59). So a
result the search did not check is checked once (:func:`budget_miss`); when it misses, prune backs off to no change.

Latency: fewer channels can run slower (onnxruntime's convolution kernels want channel counts that are multiples
of 8; odd counts made a pruned MobileNet-style model 1.9x slower). The pruned model and its input are timed
together as ``quant`` times its recipes (:mod:`onnxopt.latency`: the first batch of the run's data, 1 thread,
warm-up, interleaved rounds, medians, the latency record so the same command decides the same way), and the input
is kept when the pruned model is clearly slower (:func:`slower`): its median slower by more than the margin (5%), and
even its fastest round slower than the input's median; at the data's batch, and on one sample too when the batch is
larger and the model's batch dynamic (a device runs one input at a time). Within that noise of a shared CPU the two
are equally fast, and the smaller model stands; on a model that runs in microseconds a loaded machine moves the
medians' ratio by 15%, so a median alone would flip the decision from one run to the next.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt import graph as graph_io
from onnxopt import latency
from onnxopt.pass_base import budget_figures

__all__ = ["budget_miss", "slower"]

logger = logging.getLogger(__name__)


def budget_miss(model: ir.Model, check) -> str | None:
    """Check ``model`` (pruned in place) against the run's budget; the figures of the miss, or ``None`` if it holds."""
    ShapeInferencePass(strict_mode=False)(model)  # as the search's candidates were checked
    report = check(model)
    return None if report.ok else budget_figures(report)


def slower(context, model: ir.Model, pruned: ir.Model, *, margin: float, rounds: int) -> tuple[str | None, dict]:
    """Time ``pruned`` against its input ``model``: why to keep the input (or ``None``), and the figures for the
    report (``prune_latency``: both medians and round ranges in microseconds, the ratio, the feeds' shapes, whether
    the figures come from the latency record)."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-prune-") as tmp:
        paths = [graph_io.save(m.clone(), Path(tmp) / f"{n}.onnx") for m, n in ((model, "input"), (pruned, "pruned"))]
        feeds = latency.run_feeds(context, paths[0])
        (before, after), reused = latency.compare(paths, feeds, rounds=rounds, purpose="prune latency guard")
        one = latency.single_sample(feeds, paths[0])
        if one is not None:  # a device runs one input at a time: not slower there either
            (one_before, one_after), _ = latency.compare(paths, one, rounds=rounds, purpose="prune latency guard")
    ratio = after[0] / before[0] if before[0] > 0 else 1.0
    figures = {
        "input_us": round(before[0], 1),
        "pruned_us": round(after[0], 1),
        "input_rounds_us": [round(before[1], 1), round(before[2], 1)],  # the fastest and the slowest round
        "pruned_rounds_us": [round(after[1], 1), round(after[2], 1)],
        "ratio": round(ratio, 4),
        "feeds": {name: list(array.shape) for name, array in feeds.items()},
        "recorded": reused,
    }
    if one is not None:
        one_ratio = one_after[0] / one_before[0] if one_before[0] > 0 else 1.0
        figures["one_sample"] = {"input_us": round(one_before[0], 1), "pruned_us": round(one_after[0], 1),
                                 "ratio": round(one_ratio, 4)}  # fmt: skip
    logger.info("prune latency: pruned %.0f us, input %.0f us (%.3fx)%s", after[0], before[0], ratio,
                " (from the latency record)" if reused else "")  # fmt: skip
    if latency.clearly_slower(after, before[0], margin):
        why = (
            f"the pruned model is slower than its input: median {after[0]:.0f} us against {before[0]:.0f} us "
            f"({ratio:.2f}x; its rounds {after[1]:.0f}-{after[2]:.0f} us, the input's "
            f"{before[1]:.0f}-{before[2]:.0f} us)"
        )
        return why, figures
    if one is not None and latency.clearly_slower(one_after, one_before[0], margin):
        why = (
            f"the pruned model is slower than its input on one sample: median {one_after[0]:.0f} us against "
            f"{one_before[0]:.0f} us ({one_ratio:.2f}x; at the data's batch {ratio:.2f}x)"
        )
        return why, figures
    return None, figures
