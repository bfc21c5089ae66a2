"""What ``prune`` checks before it hands its result on: the budget holds, and the model is not slower than its input.

Budget: the search checks each setting it tries, but the setting it ends on when nothing stronger passes — ratio 0
(dead channels only), the apoz threshold 1.0, the constant threshold 0 — was never checked: "dead" on the
calibration data need not be dead on the evaluation data (on the PP-OCR direction classifier, removing the 83
channels in 9 layers that never fired on its one calibration image took the cosine on 12 photographs to 0.59). So a
result the search did not check is checked once (:func:`budget_miss`); when it misses, prune backs off to no change.

Latency: fewer channels can run slower (onnxruntime's convolution kernels want channel counts that are multiples
of 8; odd counts made a pruned MobileNet-style model 1.9x slower). The pruned model and its input are timed
together as ``quant`` times its recipes (:mod:`onnxopt.latency`: the first batch of the run's data, 1 thread,
warm-up, interleaved rounds, medians, the latency record so the same command decides the same way; the rounds stop
once the verdict cannot change, :func:`onnxopt.latency.not_slower_whatever_follows`), and the input
is kept when the pruned model is clearly slower (:func:`slower`): its median slower by more than the margin (5%), and
even its fastest round slower than the input's median; at the data's batch, and on one sample too when the batch is
larger and the model's batch dynamic (a device runs one input at a time). Within that noise of a shared CPU the two
are equally fast, and the smaller model stands; on a model that runs in microseconds a loaded machine moves the
medians' ratio by 15%, so a median alone would flip the decision from one run to the next.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

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
    """:func:`onnxopt.latency.slower` for ``prune`` (figures ``input_us``, ``pruned_us``, ...; its own record key)."""
    return latency.slower(context, model, pruned, margin=margin, rounds=rounds, purpose="prune latency guard",
                          label="pruned")  # fmt: skip
