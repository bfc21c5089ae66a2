"""Layer-by-layer least-squares reconstruction of a pruned model (training-free error correction).

After channels are removed, every linear layer downstream (Gemm, MatMul with a constant weight followed by a bias
Add, as transformers have them, and Conv / ConvTranspose with ``group=1``)
sees inputs ``x̃`` that differ from the original ``x``. Walking the layers upstream first, each one's weight and
bias are re-fitted so that, on the calibration data, its output on the *pruned* model's inputs reproduces the
*original* model's output (restricted to the output channels it keeps)::

    [W' b'] = argmin Σ ‖W' x̃ + b' − (W x + b)‖² + λ‖W'‖²

The layer's input in the pruned model already carries the corrections of the layers before it, so errors do
not accumulate (He et al. 2017, "Channel Pruning"; Luo et al. 2017, "ThiNet", without their channel selection).
A Conv's rows are its im2col patches; a ConvTranspose is fitted as the equivalent stride-1 convolution over
its zero-upsampled input. Rows of large feature maps are subsampled (about ``max_rows`` in all, seeded) so
the cost stays bounded. The fit is shrunk towards the layer's current weights (ridge ``λ``), which keeps it
from chasing noise in what a small calibration set cannot determine. The pruned model runs once per layer,
in one onnxruntime session (graph optimizations on) where the re-fitted weights are fed as inputs, over the
samples the layer reads: all of them for a Gemm/MatMul (a row per sample or token), the first ``conv_samples``
(128) for a Conv, which has many rows (patches) per sample; that run is most of a re-fit's cost. The normal
equations are summed in float64 from float32 products of centred rows (:class:`_Normal`).

A layer is fitted only when it is a dense layer in the original model too and its output channels are known:
a depthwise Conv pruned to one channel has ``group=1`` and a (1, 1, k, k) weight, but its original (grouped)
output has a channel per group, so it is declined with the reason (:attr:`Refit.declined`). So is a layer that
would get fewer rows than it has unknowns per output (a classifier over fewer samples than its inputs): that fit
is underdetermined.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt import graph as graph_io
from onnxopt.data import DataSource
from onnxopt.passes._segments import bytes_per_sample, known_bytes_per_sample, last_uses, segment
from onnxopt.passes._transformer_groups import bias_add
from onnxopt.runtime import Session
from onnxopt.stats import conv_patches, expose

__all__ = ["Refit", "downstream", "reconstruct", "refittable"]

logger = logging.getLogger(__name__)

_RIDGE = 1e-3  # λ relative to the mean diagonal of the Gram matrix; the fit is shrunk towards the current W
_CACHE_BYTES = 512 << 20  # the original's layer outputs are computed once when they fit in this
# the pruned model runs a segment at a time when the values kept between fit in this; the original too, when both
# models' fit in twice this (a MobileNetV2 candidate pruned from its first layers on: 588 MiB for the original,
# whose 34 whole runs instead took 53 of a refit's 60 s)
_SEGMENT_BYTES = 512 << 20


def refittable(node: ir.Node) -> bool:
    """Gemm, MatMul (2-D constant weight) + bias Add, and Conv / ConvTranspose with group 1 and constant weights."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gemm", "Conv", "ConvTranspose", "MatMul"):
        return False
    if node.op_type == "MatMul":
        weight = graph_io.const_array(node.inputs[1])
        if weight is None or weight.ndim != 2 or bias_add(node) is None:
            return False
        return node.inputs[1].is_initializer() and len(node.inputs[1].uses()) == 1
    group = node.attributes.get("group")
    if group is not None and group.value != 1:
        return False
    if node.op_type == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].value:
        return False
    if node.op_type == "ConvTranspose":
        dilations = node.attributes.get("dilations")
        if dilations is not None and any(d != 1 for d in dilations.value):
            return False
    weight = graph_io.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    bias_ok = len(node.inputs) < 3 or node.inputs[2] is None or graph_io.const_array(node.inputs[2]) is not None
    return weight is not None and bias_ok and node.inputs[1].is_initializer() and len(node.inputs[1].uses()) == 1


@dataclasses.dataclass
class Refit:
    """What :func:`reconstruct` did: the layers re-fitted (in order) and those declined, with the reason."""

    done: list[str] = dataclasses.field(default_factory=list)
    declined: dict[str, str] = dataclasses.field(default_factory=dict)


def downstream(model: ir.Model, changed: Iterable[ir.Node]) -> list[ir.Node]:
    """Refittable nodes fed, directly or not, by an output of a ``changed`` node, in graph order."""
    seen: set[int] = set()
    frontier = [value for node in changed for value in node.outputs]
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            if id(use.node) not in seen:
                seen.add(id(use.node))
                frontier.extend(use.node.outputs)
    return [node for node in model.graph if id(node) in seen and refittable(node)]


def _one_blas_thread(function):
    """Run ``function`` with numpy's BLAS on one thread (when threadpoolctl is installed; else as it is). The fit's
    matrix products on two threads slowed a MobileNetV2 refit from 7.2 to 35.4 s while another process kept one of
    the 2 cores busy (OpenBLAS's threads wait for each other). The sessions' threads
    (:func:`onnxopt.runtime.work_threads`) do not spin while the fit computes."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return function(*args, **kwargs)
        with threadpool_limits(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return wrapped


@_one_blas_thread
def reconstruct(
    original: ir.Model,
    pruned: ir.Model,
    nodes: list[str],
    kept_outputs: Mapping[str, np.ndarray],
    data: DataSource,
    *,
    max_rows: int = 60_000,
    conv_samples: int = 128,
    seed: int = 0,
) -> Refit:
    """Re-fit ``nodes`` of ``pruned`` in order (in place); returns the names re-fitted and those declined.

    ``kept_outputs[name]`` are the original output channels a node keeps (absent: all of them). About ``max_rows``
    rows fit each layer: a Gemm/MatMul reads every sample, a Conv (many patches per sample) the first
    ``conv_samples`` samples, which is what a re-fit costs (one run of the pruned model per layer and sample).
    """
    by_name = {node.name: node for node in pruned.graph}
    originals = {node.name: node for node in original.graph}
    result = Refit()
    targets = []
    for name in nodes:
        if name not in by_name or name not in originals:
            continue
        why = _why_not(originals[name], by_name[name], kept_outputs.get(name))
        why = why or _underdetermined(originals[name], by_name[name], data.samples, conv_samples, max_rows)
        if why is None:
            targets.append(name)
        else:
            logger.debug("reconstruction: %s declined: %s", name, why)
            result.declined[name] = why
    if not targets:
        return result
    # Fitted in the order of where their inputs are computed: every layer upstream of a layer's input reads a value
    # computed earlier, so it is fitted first, as in graph order, and a layer's fit depends only on its input and
    # the original's output, so the fits are those of graph order. This order also lets the segments run branching
    # graphs (YOLOX's CSP blocks: a Conv after a branch's first Conv reads a later value than the branch's second),
    # and it puts the layers that read the same value side by side (one run fits them together).
    position = {id(node): i for i, node in enumerate(pruned.graph)}
    targets.sort(key=lambda name: _producer_position(by_name[name].inputs[0], position))
    for name in targets:
        _ensure_bias(pruned, by_name[name])
    feeds_model, weight_names = _with_weights_as_inputs(pruned, [by_name[n] for n in targets])
    out_names = sorted({_output(originals[n]).name for n in targets})
    # onnxruntime's graph optimizations on: the re-fitted weights are inputs, so only the rest is folded and fused
    original_session = Session(expose(original, out_names), optimize=True)
    weights = {name: graph_io.const_array(_params(by_name[name])[0]).copy() for name in targets}
    biases = {name: graph_io.const_array(_params(by_name[name])[1]).copy() for name in targets}
    samples = data.samples or 1
    groups = _groups(targets, by_name)
    # a Conv gives many rows (patches) per sample: the first `conv_samples` samples give about as many rows in all
    uses = [samples if any(by_name[n].op_type in ("Gemm", "MatMul") for n in g) else min(samples, conv_samples)
            for g in groups]  # fmt: skip
    reads_in_order = [by_name[group[0]].inputs[0].name for group in groups]
    try:  # the segments bake the current weights in as constants: the model with weights, not feeds_model
        runner = _Segments(pruned.clone(), reads_in_order, data, max(uses), _SEGMENT_BYTES)
        runs = max(uses)  # every segment runs on every sample a later one reads
    except ValueError as e:
        logger.debug("reconstruction: the whole model runs per layer: %s", e)
        runner, runs = _Unsegmented(feeds_model, reads_in_order), 0
    outputs_bytes = known_bytes_per_sample([_output(originals[n]) for n in targets])
    too_big = outputs_bytes is not None and outputs_bytes * max(uses) > _CACHE_BYTES  # known without a run
    cached = None if too_big else _original_outputs(original_session, data, out_names, max(uses))
    original_runner = None
    if cached is None and runs and all(len(group) == 1 for group in groups):  # too big to keep: run it by segments
        try:
            outs = [_output(originals[group[0]]).name for group in groups]
            limit = 2 * _SEGMENT_BYTES - runner.kept_bytes
            original_runner = _Segments(original.clone(), outs, data, max(uses), limit)
        except ValueError as e:
            logger.debug("reconstruction: the whole original runs per layer: %s", e)
    done = result.done
    for step, group in enumerate(groups):
        used = uses[step]
        per_sample = max(1, max_rows // used)
        layers = {name: _Layer(by_name[name], weights[name].shape) for name in group}
        rngs = {name: np.random.default_rng(seed) for name in group}
        sums = {name: _Normal() for name in group}
        extra = {weight_names[n][0]: weights[n] for n in targets}  # the layers re-fitted so far, and the rest
        extra.update({weight_names[n][1]: biases[n] for n in targets})
        wanted = [_output(originals[name]).name for name in group]
        seen = 0
        for index, batch in enumerate(data):
            if seen >= max(used, runs):
                break
            seen += batch.size
            x = runner.run(step, index, {**batch.feeds, **extra})
            if original_runner is not None:
                outputs = {wanted[0]: original_runner.run(step, index, batch.feeds)}
            if seen - batch.size >= used:
                continue  # run for the segments after this one only
            if original_runner is None:
                outputs = cached[index] if cached is not None else original_session.run(batch.feeds, wanted)
            for name in group:
                t = outputs[_output(originals[name]).name]
                sums[name].add(*layers[name].rows(x, t, kept_outputs.get(name), per_sample, rngs[name]))
        for name in group:
            if not sums[name].count:
                break
            a, b = sums[name].normal()
            # ridge towards the layer's current parameters (sliced, constants folded), not towards zero
            ridge = _RIDGE * float(np.trace(a)) / len(a)
            current = layers[name].to_rows(weights[name], biases[name])  # (K+1, M)
            a[np.diag_indices(len(a))] += ridge
            solved = np.linalg.solve(a, b + ridge * current)  # (K+1, M)
            weights[name], biases[name] = layers[name].to_params(solved, weights[name].dtype, biases[name])
            done.append(name)
    for name in done:
        weight, bias = _params(by_name[name])
        weight.const_value = ir.tensor(np.ascontiguousarray(weights[name]), name=weight.name)
        bias.const_value = ir.tensor(np.ascontiguousarray(biases[name]), name=bias.name)
    logger.debug("reconstruction: %d layers re-fitted, %d declined", len(done), len(result.declined))
    return result


def _producer_position(value: ir.Value, position: Mapping[int, int]) -> int:
    """Where ``value`` is computed: its producer's index in graph order (-1 for a graph input)."""
    producer = value.producer()
    return -1 if producer is None else position[id(producer)]


def _why_not(original: ir.Node, pruned: ir.Node, keep: np.ndarray | None) -> str | None:
    """Why the pruned layer cannot be fitted to the ``original`` one's outputs (``None``: it can)."""
    group = original.attributes.get("group")
    if group is not None and group.value != 1:  # e.g. depthwise, pruned to one channel: group 1 now
        return (
            f"not re-fitted: {original.op_type} is grouped in the original (group={group.value}); "
            "a dense fit would mix its channels"
        )
    if not refittable(original):
        return f"not re-fitted: {original.op_type} is not a re-fittable layer in the original"
    wanted = len(keep) if keep is not None else _out_channels(original)
    have = _out_channels(pruned)
    if wanted != have:
        return f"not re-fitted: {have} output channels, but {wanted} of the original's are known to be kept"
    return None


def _underdetermined(
    original: ir.Node, pruned: ir.Node, samples: int | None, conv_samples: int, max_rows: int
) -> str | None:
    """Why the layer is not fitted when it would get fewer rows than unknowns per output (``None``: enough, or not
    known): the least squares then interpolates the calibration rows and only the ridge decides the rest. On
    MobileNetV2 the classifier (1,281 unknowns, 200 calibration samples) fitted so left the logits on 650 held-out
    images 20-30% further from the original's (squared error) than declined, and had every layer before it run on
    all 200 samples instead of ``conv_samples`` (128)."""
    if not samples:
        return None
    weight = graph_io.const_array(pruned.inputs[1]).shape
    if pruned.op_type == "Gemm":
        trans_b = pruned.attributes.get("transB")
        unknowns, rows = (weight[1] if trans_b is not None and trans_b.value else weight[0]) + 1, samples
    elif pruned.op_type == "MatMul":
        shape = original.inputs[0].shape
        tokens = list(shape[1:-1]) if shape is not None else [None]
        if not all(isinstance(d, int) for d in tokens):
            return None
        unknowns, rows = weight[0] + 1, samples * min(int(np.prod(tokens)), max(1, max_rows // samples))
    else:
        shape = original.outputs[0].shape
        spatial = list(shape)[2:] if shape is not None else [None]
        if not spatial or not all(isinstance(d, int) for d in spatial):
            return None
        fan_in = weight[1] if pruned.op_type == "Conv" else weight[0]
        used = min(samples, conv_samples)
        unknowns = fan_in * int(np.prod(weight[2:])) + 1
        rows = used * min(int(np.prod(spatial)), max(1, max_rows // used))
    if rows >= unknowns:
        return None
    return f"not re-fitted: {rows} rows for {unknowns} unknowns per output (underdetermined)"


def _out_channels(node: ir.Node) -> int:
    """Output channels (features) of a refittable layer, from its weight's shape."""
    shape = graph_io.const_array(node.inputs[1]).shape
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return shape[0] if trans_b is not None and trans_b.value else shape[1]
    if node.op_type == "MatMul":
        return shape[1]
    return shape[1] if node.op_type == "ConvTranspose" else shape[0]


def _groups(targets: list[str], by_name: Mapping[str, ir.Node]) -> list[list[str]]:
    """Consecutive layers that read the same value (a transformer's Q, K and V): one run of the model fits them all."""
    groups: list[list[str]] = []
    for name in targets:
        if groups and by_name[groups[-1][0]].inputs[0] is by_name[name].inputs[0]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _original_outputs(session: Session, data: DataSource, names: list[str], limit: int | None) -> list[dict] | None:
    """The original model's outputs ``names`` for every batch (up to ``limit`` samples), run once; None when they
    exceed the cache limit."""
    cached, size, seen = [], 0, 0
    for batch in data:
        if limit is not None and seen >= limit:
            break
        seen += batch.size
        outputs = session.run(batch.feeds, names)
        size += sum(np.asarray(v).nbytes for v in outputs.values())
        if size > _CACHE_BYTES:
            return None
        cached.append(outputs)
    return cached


class _Normal:
    """The normal equations of one layer's least squares, ``A = Σ [x 1]ᵀ[x 1]`` and ``B = Σ [x 1]ᵀ t``, summed over
    batches of float32 rows.

    Each batch's products are float32 matrix products (half the time of float64, and the rows need no float64
    copy) over rows centred on fixed shifts ``μ``, ``ν`` (the first batch's means): activations after a ReLU have
    means as large as their spread, and a float32 sum of uncentred products would lose the spread's digits.
    The sums over batches, the rows' sums ``s = Σx``, ``u = Σt`` and the count ``n`` are float64, and the
    uncentred sums follow exactly: ``Σ xxᵀ = Σ (x−μ)(x−μ)ᵀ + μsᵀ + sμᵀ − nμμᵀ`` and ``Σ xtᵀ = Σ (x−μ)(t−ν)ᵀ + μuᵀ +
    sνᵀ − nμνᵀ``."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: tuple[np.ndarray, np.ndarray] | None = None
        self.xx = self.xt = self.sx = self.st = None

    def add(self, x: np.ndarray, t: np.ndarray) -> None:
        if not len(x):
            return
        if self.shift is None:
            self.shift = tuple(v.mean(axis=0, dtype=np.float64).astype(v.dtype) for v in (x, t))
            self.xx = self.xt = self.sx = self.st = 0.0
        xc, tc = x - self.shift[0], t - self.shift[1]
        self.xx = self.xx + (xc.T @ xc).astype(np.float64)
        self.xt = self.xt + (xc.T @ tc).astype(np.float64)
        self.sx = self.sx + x.sum(axis=0, dtype=np.float64)
        self.st = self.st + t.sum(axis=0, dtype=np.float64)
        self.count += len(x)

    def normal(self) -> tuple[np.ndarray, np.ndarray]:
        """``A`` (K+1, K+1) and ``B`` (K+1, M), float64."""
        mu, nu = (v.astype(np.float64) for v in self.shift)
        n, s, u = float(self.count), self.sx, self.st
        k = len(s)
        a = np.empty((k + 1, k + 1))
        a[:k, :k] = self.xx + np.outer(mu, s) + np.outer(s, mu) - n * np.outer(mu, mu)
        a[:k, k] = a[k, :k] = s
        a[k, k] = n
        b = np.empty((k + 1, len(u)))
        b[:k] = self.xt + np.outer(mu, u) + np.outer(s, nu) - n * np.outer(mu, nu)
        b[k] = u
        return a, b


class _Layer:
    """Rows (features, targets) of one layer and the conversion of the solution back to its parameters."""

    def __init__(self, node: ir.Node, weight_shape: tuple[int, ...]) -> None:
        self.op = node.op_type
        self.attrs = {name: attr.value for name, attr in node.attributes.items()}
        self.weight_shape = weight_shape
        self.kernel = tuple(weight_shape[2:])

    def rows(self, x, t, keep, per_sample: int, rng) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)  # the products are summed in float64 (_Normal)
        t = np.asarray(t, dtype=np.float32)
        if self.op == "Gemm":
            if keep is not None:
                t = t[:, keep]
            return x.reshape(len(x), -1), t.reshape(len(t), -1)
        if self.op == "MatMul":  # (..., K) rows: every token of every sample
            if keep is not None:
                t = t[..., keep]
            limit = per_sample * len(x)  # about per_sample rows per sample, as for Conv patches
            x, t = x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])
            if len(x) > limit:
                pick = rng.choice(len(x), limit, replace=False)
                x, t = x[pick], t[pick]
            return x, t
        if keep is not None:
            t = t[:, keep]
        if self.op == "ConvTranspose":
            x, attrs = self._as_conv_input(x, t.shape[2:])
        else:
            attrs = self.attrs
        feats, targs = [], []
        for i in range(len(x)):
            view = conv_patches(x[i : i + 1], self.kernel, attrs)[0]  # (*out, C, *kernel), nothing copied
            out = view.shape[: len(self.kernel)]
            target = t[i].reshape(t.shape[1], -1)  # (M, positions), a view
            positions = int(np.prod(out))
            if positions != target.shape[1]:
                raise ValueError(f"{self.op}: {positions} patches for {target.shape[1]} output positions")
            if positions > per_sample:  # only the rows kept are copied out of the views
                pick = rng.choice(positions, per_sample, replace=False)
                patches, target = view[np.unravel_index(pick, out)].reshape(len(pick), -1), target[:, pick].T
            else:
                patches, target = view.reshape(positions, -1), target.T
            feats.append(patches)
            targs.append(target)
        return np.concatenate(feats), np.concatenate(targs)

    def _as_conv_input(self, x: np.ndarray, out_spatial: tuple[int, ...]) -> tuple[np.ndarray, dict]:
        """Zero-upsample and pad ``x`` so that a stride-1 Conv with the flipped kernel gives the ConvTranspose."""
        rank = len(self.kernel)
        strides = list(self.attrs.get("strides") or [1] * rank)
        spatial = x.shape[2:]
        up = np.zeros(x.shape[:2] + tuple((n - 1) * s + 1 for n, s in zip(spatial, strides, strict=True)), x.dtype)
        up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
        pads = _convtranspose_pads(spatial, self.kernel, strides, out_spatial, self.attrs)
        # stride-1 conv over `up` padded by (k-1-begin, k-1-end + output_padding); negative pads crop
        begin = [k - 1 - pads[i] for i, k in enumerate(self.kernel)]
        end = [out_spatial[i] + self.kernel[i] - 1 - up.shape[2 + i] - begin[i] for i in range(rank)]
        crop = tuple(slice(max(0, -begin[i]), up.shape[2 + i] - max(0, -end[i])) for i in range(rank))
        up = up[(slice(None), slice(None)) + crop]
        return up, {"pads": [max(0, b) for b in begin] + [max(0, e) for e in end]}

    def to_rows(self, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_params`: ``[W b]`` as a (K+1, M) solution matrix."""
        weight = np.asarray(weight, dtype=np.float64)
        if self.op in ("Gemm", "MatMul"):
            w = weight if self.attrs.get("transB", 0) else weight.T  # (M, K)
        elif self.op == "Conv":
            w = weight.reshape(weight.shape[0], -1)
        else:
            w = _flip(np.swapaxes(weight, 0, 1)).reshape(weight.shape[1], -1)
        return np.concatenate([w.T, np.asarray(bias, dtype=np.float64).reshape(1, -1)], axis=0)

    def to_params(self, solved: np.ndarray, dtype, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w, b = solved[:-1].T, solved[-1]  # (M, K), (M,)
        if self.op in ("Gemm", "MatMul"):
            trans_b = self.attrs.get("transB", 0)
            weight = w if trans_b else w.T
        elif self.op == "Conv":
            weight = w.reshape(self.weight_shape)
        else:  # ConvTranspose: W[c, o, *k] = W_eq[o, c, *flipped k]
            c_in, m = self.weight_shape[0], self.weight_shape[1]
            weight = np.swapaxes(_flip(w.reshape((m, c_in) + self.kernel)), 0, 1)
        return weight.astype(dtype), b.reshape(bias.shape).astype(bias.dtype)


def _flip(weight: np.ndarray) -> np.ndarray:
    """Reverse every spatial axis of a (out, in, *kernel) weight."""
    return weight[(slice(None), slice(None)) + (slice(None, None, -1),) * (weight.ndim - 2)]


def _convtranspose_pads(spatial, kernel, strides, out_spatial, attrs) -> list[int]:
    """Begin pads of a ConvTranspose (dilation 1) that give ``out_spatial``, per ONNX's rules."""
    rank = len(kernel)
    out_pad = list(attrs.get("output_padding") or [0] * rank)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if attrs.get("output_shape") is None and auto_pad in ("NOTSET", "VALID"):
        pads = list(attrs.get("pads") or [0] * (2 * rank))
        return pads[:rank]
    begins = []
    for i in range(rank):
        total = strides[i] * (spatial[i] - 1) + out_pad[i] + kernel[i] - out_spatial[i]
        begins.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    return begins


def _params(node: ir.Node) -> tuple[ir.Value, ir.Value]:
    """Weight and bias values of a layer: inputs 1 and 2, or a MatMul's weight and its Add's bias."""
    if node.op_type == "MatMul":
        add, index = bias_add(node)
        return node.inputs[1], add.inputs[index]
    return node.inputs[1], node.inputs[2]


def _output(node: ir.Node) -> ir.Value:
    """The layer's output with its bias added (a MatMul's bias Add)."""
    if node.op_type == "MatMul":
        return bias_add(node)[0].outputs[0]
    return node.outputs[0]


def _ensure_bias(model: ir.Model, node: ir.Node) -> None:
    if node.op_type == "MatMul" or (len(node.inputs) > 2 and node.inputs[2] is not None):
        return
    weight = graph_io.const_array(node.inputs[1])
    trans_b = node.attributes.get("transB")
    if node.op_type == "Gemm":
        m = weight.shape[0] if trans_b is not None and trans_b.value else weight.shape[1]
    else:
        m = weight.shape[1] if node.op_type == "ConvTranspose" else weight.shape[0]
    value = graph_io.add_initializer(model.graph, f"{node.name or 'node'}_bias", np.zeros(m, dtype=weight.dtype))
    node.resize_inputs(3)
    node.replace_input_with(2, value)


def _with_weights_as_inputs(model: ir.Model, nodes: list[ir.Node]) -> tuple[ir.Model, dict[str, tuple[str, str]]]:
    """A clone whose weights and biases of ``nodes`` are graph inputs without initializers (fed at run time)."""
    clone = model.clone()
    by_name = {node.name: node for node in clone.graph}
    names = {}
    for node in nodes:
        twin = by_name[node.name]
        params = _params(twin)
        for value in params:
            clone.graph.initializers.pop(value.name, None)  # a plain input: onnxruntime feeds only those
            value.const_value = None
            if not value.is_graph_input():
                clone.graph.inputs.append(value)
        names[node.name] = (params[0].name, params[1].name)
    return clone, names


class _Segments:
    """The pruned model cut before each group's input into segments, run one after the other: the values a later
    segment reads are kept per batch, so over a whole re-fit every node runs once per batch, where a run of the whole
    model per layer costs as many runs of each node as there are layers downstream. A segment's session is opened
    when it first runs, with the weights fitted so far as constants (as deployed: onnxruntime folds and prepacks
    constant weights, not inputs).

    Needs the values read to be computed in graph order (their producers non-decreasing: :func:`reconstruct` sorts
    the layers so; the original's layer outputs may not be) and the values kept between segments to fit in
    ``limit_bytes``; else :class:`_Unsegmented` (``ValueError`` from the constructor)."""

    def __init__(self, model: ir.Model, reads: list[str], data: DataSource, samples: int, limit_bytes: int) -> None:
        ShapeInferencePass(strict_mode=False)(model)
        order = list(model.graph)
        position = {id(node): i for i, node in enumerate(order)}
        values = {v.name: v for node in order for v in node.outputs}
        values.update({v.name: v for v in model.graph.inputs})
        cuts = [_producer_position(values[r], position) for r in reads]
        if any(b < a for a, b in zip(cuts, cuts[1:], strict=False)):  # equal: two graph inputs (an empty segment)
            raise ValueError("the layers' inputs are not computed in graph order")
        self.model, self.reads, self.ranges, self.inputs, self.outputs, self.drop = model, reads, [], [], [], []
        self.session: tuple[int, Session | None] = (-1, None)
        last_use = last_uses(order)
        graph_inputs = {v.name for v in model.graph.inputs}
        live, per_sample_bytes = set(), 0
        start = 0
        for read, cut in zip(reads, cuts, strict=True):
            keep = order[start : cut + 1]
            produced = {v.name for node in keep for v in node.outputs}
            needed = {v.name for node in keep for v in node.inputs if v is not None and v.name}
            fed = sorted((needed - produced) & (live | graph_inputs))
            out = sorted({name for name in produced if last_use.get(name, -1) > cut} | ({read} & produced))
            self.inputs.append(fed)
            self.outputs.append(out)
            live = (live | set(out)) - {name for name in live | set(out) if last_use.get(name, -1) <= cut}
            self.drop.append(sorted(n for n in set(fed) | set(out) if n not in live and n != read))
            per_sample_bytes = max(per_sample_bytes, sum(bytes_per_sample(values[n]) for n in live))
            self.ranges.append((start, cut + 1) if keep else None)
            start = cut + 1
        self.kept_bytes = per_sample_bytes * samples
        if self.kept_bytes > limit_bytes:
            raise ValueError(f"the values kept between segments take {self.kept_bytes >> 20} MiB")
        self.state: dict[int, dict[str, np.ndarray]] = {}

    def run(self, step: int, index: int, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Group ``step``'s input for batch ``index`` (``feeds``: the batch and the current weights)."""
        state = self.state.setdefault(index, {})
        if self.ranges[step] is not None:
            if self.session[0] != step:  # built when first run: the layers fitted so far have their weights now
                self.session = (
                    step,
                    Session(segment(self.model, *self.ranges[step], self.outputs[step], feeds), optimize=True),
                )
            given = {name: state[name] if name in state else feeds[name] for name in self.inputs[step]}
            state.update(self.session[1].run(given, self.outputs[step]))
        x = state[self.reads[step]] if self.reads[step] in state else feeds[self.reads[step]]
        for name in self.drop[step]:
            state.pop(name, None)
        return x


class _Unsegmented:
    """The whole pruned model run for each group's input (any graph)."""

    def __init__(self, model: ir.Model, reads: list[str]) -> None:
        self.reads = reads
        self.session = Session(expose(model, sorted(set(reads))), optimize=True)

    def run(self, step: int, index: int, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        read = self.reads[step]
        return self.session.run(feeds, [read])[read]
