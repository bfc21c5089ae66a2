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

With ``hidden``, the student also matches the teacher inside (FitNets / TinyBERT's hidden-state loss): the block
outputs — every LayerNormalization's output, and the end of every residual block (a residual ``Add`` of two computed
tensors, followed through single-consumer activations such as the Relu after a ResNet block) — that the original
holds under the same name with the same shape, by the same relative squared error, times ``hidden_weight``. A
pruned transformer keeps its residual stream (heads and FFN neurons go, the hidden size stays), so every layer's
output gets a target; in a pruned CNN a block whose channels were removed has no match and is left out. The
teacher's intermediates come from a copy of the original with those tensors added as graph outputs.

Image inputs are augmented (``augment``, on by default): every epoch the student sees a new random crop (resized back)
and horizontal flip of each calibration image, and the original is run on exactly that view for the target
(:mod:`onnxopt.augment`). Without it, distillation on a few hundred images learns those images: on a pruned
ResNet-20 (500 calibration images) the held-out loss rose and the pass kept nothing; with it, the held-out top-1
drop went from 5.6 to 2.4-3.3 pp in three runs. On MobileNetV2 with 200 images neither helped measurably
(``bench/results/distill_augment.md``). Not every image is a photograph: when the views do not lower the held-out
loss, the images as given are tried too (on the MNIST ``mobile_cnn``, views 0.0756 -> 0.0809, as given -> 0.0713),
and the better of the two is kept.

The trained weights are kept only when they bring the model closer to the original on data the training did not
see (the evaluation data, else a held-out quarter of the calibration data): the pass never makes a model worse by
its own measure, which is the training's loss (:func:`_distance`). The report gives it before and after.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.pass_base import Change, OptPass, OptResult, PassConfig, Skip

__all__ = ["DistillConfig", "DistillPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistillConfig(PassConfig):
    epochs: int = dataclasses.field(default=3, metadata={"help": "passes over the calibration data"})
    lr: float = dataclasses.field(
        default=-1.0, metadata={"help": "Adam learning rate (<0: 1e-5 for image inputs, else 1e-4)"}
    )
    temperature: float = dataclasses.field(default=2.0, metadata={"help": "softening of class scores (KL loss)"})
    max_samples: int = dataclasses.field(default=4096, metadata={"help": "calibration samples used at most"})
    hidden: bool = dataclasses.field(
        default=False,
        metadata={"help": "also match the original's block outputs (LayerNorm, residual blocks) of the same shape"},
    )
    hidden_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of each matched block output"})
    augment: bool = dataclasses.field(
        default=True,
        metadata={"help": "image inputs: a new random crop and flip of each image every epoch, the original run on it"},
    )

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr == 0 or not self.temperature > 0 or self.max_samples < 1:
            raise ValueError("distill: epochs >= 1, lr > 0 (or < 0: by the data), temperature > 0, max_samples >= 1")
        if not self.hidden_weight >= 0:
            raise ValueError(f"distill: hidden_weight >= 0, got {self.hidden_weight}")


class DistillPass(OptPass):
    """Train float weights to reproduce the original model's outputs on calibration data (no labels; torch extra)."""

    name = "distill"
    exact = False
    spends_budget = False  # it brings the model closer to the original: a pipeline's budget split skips it
    config_class = DistillConfig

    def call(self, model: ir.Model) -> OptResult:
        context = self.context
        if context is None or context.data is None or context.original is None:
            why = "needs calibration data (--data)" if context is None or context.data is None else "no original model"
            return OptResult(model, modified=False, skipped=[Skip("model", why)])
        hidden = _matching_blocks(model, context.original) if self.config.hidden else []
        teacher = _Teacher(context.original, hidden)
        outputs = [v.name for v in model.graph.outputs if v.dtype in _FLOATS and v.name in teacher.outputs]
        if not outputs:
            return OptResult(model, modified=False, skipped=[Skip("model", "no float output to distill")])
        batches = teacher.batches(context.data, outputs + hidden, self.config.max_samples)
        if context.eval_data is not None:
            train, held = batches, teacher.batches(context.eval_data, outputs, self.config.max_samples)
        else:
            cut = max(1, len(batches) * 3 // 4) if len(batches) > 1 else len(batches)
            train, held = batches[:cut], batches[cut:] or batches
        before = _distance(model, held, outputs, self.config.temperature)
        if before <= 1e-12:
            return OptResult(model, modified=False, skipped=[Skip("model", "already equal to the original")])
        from onnxopt.augment import image_inputs

        images = bool(train) and bool(image_inputs(train[0][0]))
        tried = []  # (trained model, held-out loss, what) per attempt
        if self.config.augment and images:
            views = functools.partial(_Views, teacher, train, outputs + hidden, context.seed)
            result, after, what = self._train(model, views, outputs, hidden, held, images)
            seen = f"each of the {_count(train)} images seen as {self.config.epochs} random crops and flips"
            tried.append((result, after, f"{what}; {seen}"))
        if not tried or not tried[-1][1] < before:
            # not augmented, or the views did not help: the images as given (digits, text lines: a mirrored or
            # cropped view is not one of them; on the MNIST mobile_cnn the views raised the held-out loss, the images
            # as given lowered it)
            result, after, what = self._train(model, train, outputs, hidden, held, images)
            tried.append((result, after, f"{what}; the images as given" if tried else what))
        result, after, _ = min(tried, key=lambda attempt: attempt[1])
        what = f"distillation loss {before:.4g} -> " + "; then -> ".join(attempt[2] for attempt in tried)
        if not after < before:
            return OptResult(model, modified=False, skipped=[Skip("model", f"training did not help: {what}")])
        _copy_weights(result.model, model)
        changes = [Change("model", f"trained {result.parameters} weights for {self.config.epochs} epochs: {what}")]
        logger.info("distill: %s", changes[0].what)
        return OptResult(model, modified=True, changes=changes)

    def _train(self, model, batches, outputs, hidden, held, images: bool):
        """One training run from ``model``: (the trained result, its held-out loss, a line saying so)."""
        from onnxopt.finetune import distill
        from onnxopt.runtime import work_threads

        result = distill(
            model,
            batches,
            outputs=outputs,
            epochs=self.config.epochs,
            lr=self.config.lr if self.config.lr > 0 else IMAGE_LR if images else LR,
            temperature=self.config.temperature,
            hidden=hidden,
            hidden_weight=self.config.hidden_weight,
            seed=self.context.seed,
            # image models' convolutions are large enough for the work threads (MobileNetV2, 4 batches of 16: 3.6-4.1 s
            # on 2 threads, 6.5-10.6 s on 1); anything else stays on one (finetune.distill says why)
            threads=work_threads() if images else 1,
            log=logger.debug,
        )
        after = _distance(result.model, held, outputs, self.config.temperature)
        what = f"{after:.4g} on {_count(held)} held-out samples"
        if self.config.hidden:
            what += f"; {len(result.hidden)} block output{'s' * (len(result.hidden) != 1)} matched inside"
        return result, after, what


# Adam's learning rates by default. 1e-4 recovered pruned MiniLM (bench/results/prune_minilm.md); on a pruned and
# re-fitted CNN trained on augmented images it overshot: ResNet-20 at 0.86 of the MACs, 20 epochs, held-out top-1
# drop 5.6 -> 6.3 / 4.8 / 3.7 pp at 1e-4 and 5.6 -> 3.3 / 2.7 / 2.4 pp at 1e-5 in three runs; MobileNetV2's loss
# went from 0.52 to 1.9-2.2 at 1e-4 (bench/results/distill_augment.md), on its images as given too (0.037 -> 2 in
# the goal run). On the images as given, the MNIST mobile_cnn gained less at 1e-5 (0.0756 -> 0.0740) than at 1e-4
# (0.0713).
LR, IMAGE_LR = 1e-4, 1e-5

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}


# ops whose output ends a block (the residual stream after normalization); shape-keeping ops a residual block's end
# is followed through (ResNet's Add -> Relu)
_BLOCK_ENDS = frozenset({"LayerNormalization", "RMSNormalization"})
_ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Gelu"})


def _block_outputs(model: ir.Model) -> list[ir.Value]:
    """The student's block outputs, in graph order: normalization outputs and the ends of residual blocks."""
    found: dict[int, ir.Value] = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            continue
        if node.op_type in _BLOCK_ENDS:
            found[id(node.outputs[0])] = node.outputs[0]
        elif node.op_type == "Add" and _residual(node):
            end = node.outputs[0]
            while len(end.uses()) == 1 and end.uses()[0].node.op_type in _ELEMENTWISE | _BLOCK_ENDS:
                consumer = end.uses()[0].node
                if consumer.op_type in _BLOCK_ENDS:
                    break  # the normalization's output is the block output
                end = consumer.outputs[0]
            else:
                found[id(end)] = end
    return [v for v in found.values() if v.dtype in _FLOATS and not v.is_graph_output() and v.name]


def _residual(node: ir.Node) -> bool:
    """A residual Add: two computed activations (not weights or constants) of one known shape (no broadcasting,
    which leaves out attention-mask and position-embedding Adds)."""
    if len(node.inputs) != 2 or any(v is None or v.shape is None for v in node.inputs):
        return False
    producers = [v.producer() for v in node.inputs]
    if any(p is None or p.op_type in ("Constant", "ConstantOfShape") for p in producers):
        return False
    return node.inputs[0].shape == node.inputs[1].shape


def _matching_blocks(model: ir.Model, original) -> list[str]:
    """Names of the student's block outputs that the original has under the same name with a compatible shape
    (dimensions known on both sides equal; the exact shapes are compared again on each batch)."""
    from onnx_ir.passes.common import ShapeInferencePass

    from onnxopt import graph as graph_io

    teacher, student = graph_io.load(original), model.clone()  # the clone shares the weights; shapes inferred on it
    for each in (teacher, student):
        ShapeInferencePass(strict_mode=False)(each)
    theirs = {v.name: v for node in teacher.graph for v in node.outputs if v.name}
    names = []
    for value in _block_outputs(student):
        other = theirs.get(value.name)
        if other is not None and other.dtype == value.dtype and _compatible(value.shape, other.shape):
            names.append(value.name)
    logger.debug("distill: %d block outputs to match inside: %s", len(names), ", ".join(names))
    return names


def _compatible(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    if a is None or b is None:
        return True
    if len(a) != len(b):
        return False
    return all(not isinstance(x, int) or not isinstance(y, int) or x == y for x, y in zip(a, b, strict=True))


class _Teacher:
    """The original model in onnxruntime, giving its outputs (and the ``hidden`` intermediates) for batches."""

    def __init__(self, path, hidden: list[str] = ()) -> None:
        from onnxopt import graph as graph_io
        from onnxopt.runtime import Session

        source = path
        if hidden:
            source = graph_io.load(path)
            values = {v.name: v for node in source.graph for v in node.outputs}
            source.graph.outputs.extend(values[name] for name in hidden if not values[name].is_graph_output())
        self.session = Session(source, optimize=True)
        self.outputs = set(self.session.output_names)

    def run(self, feeds: dict, outputs: list[str]) -> dict:
        return self.session.run(feeds, outputs)

    def batches(self, source, outputs: list[str], limit: int) -> list[tuple[dict, dict]]:
        pairs, seen = [], 0
        for batch in source:
            if seen >= limit:
                break
            feeds = {k: v[: limit - seen] for k, v in batch.feeds.items()}
            pairs.append((feeds, self.session.run(feeds, outputs)))
            seen += next(iter(feeds.values())).shape[0] if feeds else 1
        return pairs


class _Views(Sequence):
    """One epoch's training pairs: a new random view (:func:`onnxopt.augment.augment_feeds`) of every calibration
    batch, with the teacher's outputs on that view. A view is made when training asks for its batch, so an epoch's
    views are never all held at once; the first one made is kept (``distill`` reads the first batch's teacher
    outputs before training, and would otherwise run the teacher on it twice). :func:`onnxopt.finetune.distill`
    takes the epochs as a callable of the epoch: ``functools.partial(_Views, teacher, batches, outputs, seed)``."""

    def __init__(self, teacher: _Teacher, batches: list[tuple[dict, dict]], outputs: list[str], seed: int,
                 epoch: int) -> None:  # fmt: skip
        self.teacher, self.batches, self.outputs, self.seed, self.epoch = teacher, batches, outputs, seed, epoch
        self.kept: tuple[int, tuple[dict, dict]] | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):
        from onnxopt.augment import augment_feeds

        if self.kept is not None and self.kept[0] == index:
            return self.kept[1]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])  # the same view in every run
        view = augment_feeds(self.batches[index][0], rng)
        pair = (view, self.teacher.run(view, self.outputs))
        if self.kept is None:
            self.kept = (index, pair)
        return pair


def _distance(model: ir.Model, batches: list[tuple[dict, dict]], outputs: list[str], temperature: float) -> float:
    """How far ``model`` is from the teacher on ``batches``, by the loss the training minimizes (per sample, summed
    over ``outputs``): for class scores (2-d, at least two columns) the KL divergence of the softened distributions
    times the temperature's square, which ignores what softmax ignores (a shift of all of a sample's scores); for any
    other output the squared error relative to the teacher's mean square. Judging by another measure would keep or
    drop the training on something it was not asked to do: on a pruned ResNet-20 the logits' relative L2 error rose
    while the KL divergence fell."""
    from onnxopt.runtime import Session

    session = Session(model, optimize=True)
    softmax = {v.name for v in model.graph.outputs if v.producer() is not None and v.producer().op_type == "Softmax"}
    total = count = 0.0
    for feeds, teacher in batches:
        got = session.run(feeds, outputs)
        size = _count([(feeds, teacher)]) or 1
        for name in outputs:
            student, ref = (np.asarray(a, dtype=np.float64) for a in (got[name], teacher[name]))
            total += size * _loss(student.reshape(ref.shape), ref, temperature, name in softmax)
        count += size
    return total / max(count, 1.0)


def _loss(student: np.ndarray, teacher: np.ndarray, temperature: float, probabilities: bool) -> float:
    """The training's own loss (:func:`onnxopt.finetune._distill_loss`) on one batch of held-out outputs, in
    float64; ``probabilities``: a Softmax's output, compared through its log."""
    import torch

    from onnxopt.finetune import _distill_loss

    student, teacher = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)) for a in (student, teacher))
    with torch.no_grad():
        return float(_distill_loss(student, teacher, temperature, probabilities))


def _count(batches: list[tuple[dict, dict]]) -> int:
    return sum(next(iter(feeds.values())).shape[0] for feeds, _ in batches if feeds)


def _copy_weights(source: ir.Model, target: ir.Model) -> None:
    """Give ``target``'s initializers the values of ``source``'s initializers of the same name."""
    trained = source.graph.initializers
    for name, value in target.graph.initializers.items():
        if name in trained and trained[name].const_value is not None:
            value.const_value = ir.tensor(trained[name].const_value.numpy(), name=name)
