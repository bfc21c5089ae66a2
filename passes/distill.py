"""`distill`: label-free recovery — train the current model's float weights to reproduce the original model's outputs.

After a lossy pass (``prune``, ``svd``, ``split``) the graph is smaller and its outputs have drifted. ``distill``
runs the *original* model (the one the pipeline started from) over the calibration data to get its outputs — the
teacher — and trains the current model — the student — to reproduce them, with Adam in PyTorch (the ``torch``
extra), node by node through :func:`onnxopt.finetune.distill`. No labels are used (knowledge distillation, Hinton
et al. 2015): class-score outputs are matched by the KL divergence of their softened distributions, every other
float output by its squared error relative to the teacher's scale. The graph is unchanged: only float
initializers of weight-carrying ops get new values, so a later ``prune`` sees the same structure. This is the
thesis's retraining between pruning rounds, without a training set: ``--passes prune,distill,prune,distill,quant``
prunes, recovers, and prunes again, each search judged against the original on the evaluation data.

The trained weights are kept only when they bring the model closer to the original on data the training did not
see (the evaluation data, else a held-out quarter of the calibration data): the pass never makes a model worse by
its own measure. The report gives the distance before and after.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip

__all__ = ["DistillConfig", "DistillPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistillConfig(PassConfig):
    epochs: int = dataclasses.field(default=3, metadata={"help": "passes over the calibration data"})
    lr: float = dataclasses.field(default=1e-4, metadata={"help": "Adam learning rate"})
    temperature: float = dataclasses.field(default=2.0, metadata={"help": "softening of class scores (KL loss)"})
    max_samples: int = dataclasses.field(default=4096, metadata={"help": "calibration samples used at most"})

    def __post_init__(self) -> None:
        if self.epochs < 1 or not self.lr > 0 or not self.temperature > 0 or self.max_samples < 1:
            raise ValueError("distill: epochs >= 1, lr > 0, temperature > 0, max_samples >= 1")


class DistillPass(OptPass):
    """Train float weights to reproduce the original model's outputs on calibration data (no labels; torch extra)."""

    name = "distill"
    exact = False
    config_class = DistillConfig

    def call(self, model: ir.Model) -> OptResult:
        from onnxopt.finetune import distill  # torch, lazily

        context = self.context
        if context is None or context.data is None or context.original is None:
            why = "needs calibration data (--data)" if context is None or context.data is None else "no original model"
            return OptResult(model, modified=False, skipped=[Skip("model", why)])
        teacher = _Teacher(context.original)
        outputs = [v.name for v in model.graph.outputs if v.dtype in _FLOATS and v.name in teacher.outputs]
        if not outputs:
            return OptResult(model, modified=False, skipped=[Skip("model", "no float output to distill")])
        batches = teacher.batches(context.data, outputs, self.config.max_samples)
        if context.eval_data is not None:
            train, held = batches, teacher.batches(context.eval_data, outputs, self.config.max_samples)
        else:
            cut = max(1, len(batches) * 3 // 4) if len(batches) > 1 else len(batches)
            train, held = batches[:cut], batches[cut:] or batches
        before = _distance(model, held, outputs)
        if before <= 1e-12:
            return OptResult(model, modified=False, skipped=[Skip("model", "already equal to the original")])
        result = distill(
            model,
            train,
            outputs=outputs,
            epochs=self.config.epochs,
            lr=self.config.lr,
            temperature=self.config.temperature,
            seed=context.seed,
            log=logger.debug,
        )
        after = _distance(result.model, held, outputs)
        what = f"relative output error {before:.4g} -> {after:.4g} on {_count(held)} held-out samples"
        if not after < before:
            return OptResult(model, modified=False, skipped=[Skip("model", f"training did not help: {what}")])
        _copy_weights(result.model, model)
        changes = [Change("model", f"trained {result.parameters} weights for {self.config.epochs} epochs: {what}")]
        logger.info("distill: %s", changes[0].what)
        return OptResult(model, modified=True, changes=changes)


_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}


class _Teacher:
    """The original model in onnxruntime, giving its outputs for batches of feeds."""

    def __init__(self, path) -> None:
        from onnxopt.runtime import Session

        self.session = Session(path, optimize=True)
        self.outputs = set(self.session.output_names)

    def batches(self, source, outputs: list[str], limit: int) -> list[tuple[dict, dict]]:
        pairs, seen = [], 0
        for batch in source:
            if seen >= limit:
                break
            feeds = {k: v[: limit - seen] for k, v in batch.feeds.items()}
            pairs.append((feeds, self.session.run(feeds, outputs)))
            seen += next(iter(feeds.values())).shape[0] if feeds else 1
        return pairs


def _distance(model: ir.Model, batches: list[tuple[dict, dict]], outputs: list[str]) -> float:
    """Σ‖y' − y‖² / Σ‖y‖² over the batches and outputs: how far ``model`` is from the teacher."""
    from onnxopt.runtime import Session

    session = Session(model, optimize=True)
    error = norm = 0.0
    for feeds, teacher in batches:
        got = session.run(feeds, outputs)
        for name in outputs:
            ref = np.asarray(teacher[name], dtype=np.float64)
            error += float(np.sum((np.asarray(got[name], dtype=np.float64) - ref) ** 2))
            norm += float(np.sum(ref**2))
    return error / max(norm, 1e-30)


def _count(batches: list[tuple[dict, dict]]) -> int:
    return sum(next(iter(feeds.values())).shape[0] for feeds, _ in batches if feeds)


def _copy_weights(source: ir.Model, target: ir.Model) -> None:
    """Give ``target``'s initializers the values of ``source``'s initializers of the same name."""
    trained = source.graph.initializers
    for name, value in target.graph.initializers.items():
        if name in trained and trained[name].const_value is not None:
            value.const_value = ir.tensor(trained[name].const_value.numpy(), name=name)
