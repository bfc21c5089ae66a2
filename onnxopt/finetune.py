"""Fine-tune an ONNX model's float weights in place, with PyTorch autograd, keeping the graph as it is.

The ``prune`` issue's iterative cycle, through the Python API: prune, fine-tune, prune again. onnxopt itself needs no
training framework; this module is the one place that uses one (``pip install onnxopt[torch]``), lazily.

The graph is evaluated node by node with ``torch`` functional ops; every float initializer of a weight-carrying op
(Conv, ConvTranspose, Gemm, MatMul, Add/Sub/Mul bias and scale constants, BatchNormalization scale and bias) becomes a
trainable parameter, and the trained values are written back under the same names. Nothing else changes: node
order, names, shapes and opsets stay, so a pruned model's structure and a later prune's channel grouping hold.
(onnx2torch, the library made for converting, rejects the ConvTranspose with asymmetric padding that tf2onnx emits
for Keras SAME deconvolutions, and exports a new graph rather than new weights for the old one.)

Supported ops: the ones the reference models and common CNN/MLP graphs use (``SUPPORTED``); any other op stops with
a clear error naming it, before training starts. BatchNormalization runs with its stored statistics (inference mode),
so the folded model onnxruntime runs is the model trained.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxopt import graph
from onnxopt._torch_ops_extra import EXTRA_OPS, extra_ops
from onnxopt.errors import OnnxoptError

# inputs of these ops that hold learnable float weights when they are initializers (index -> role)
_LEARNABLE = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "Add": (0, 1),
    "Sub": (0, 1),
    "Mul": (0, 1),
    "BatchNormalization": (1, 2),
    "PRelu": (1,),
    "LayerNormalization": (1, 2),
    "Gather": (0,),  # embedding tables
}


@dataclass
class FinetuneResult:
    """The fine-tuned model and the training loss per epoch (mean over its batches)."""

    model: ir.Model
    losses: list[float]
    parameters: int
    hidden: list[str] = field(default_factory=list)  # intermediate tensors matched (distill with ``hidden``)


def finetune(
    model: ir.Model,
    inputs: Mapping[str, np.ndarray],
    targets: np.ndarray,
    *,
    loss: str = "cross_entropy",
    output: str | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    temperature: float = 4.0,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Train ``model``'s float weights on ``inputs`` → ``targets`` with Adam; returns a new model.

    ``loss``: ``cross_entropy`` (``targets`` are class indices or one-hot rows; the output is read as logits, or as
    probabilities when the graph ends in Softmax, whose input is then used), ``mse`` (``targets`` have the
    output's shape) or ``distill`` (knowledge distillation, Hinton et al. 2015: ``targets`` are a teacher's logits,
    e.g. :func:`logits` of the unpruned model, and the loss is the KL divergence between the softened
    distributions at ``temperature``, times its square). ``output``: which graph output to train (default: the
    first).
    """
    torch = _torch()
    if loss not in ("cross_entropy", "mse", "distill"):
        raise OnnxoptError(f"unknown loss {loss!r}: use cross_entropy, mse or distill")
    if loss == "distill" and not temperature > 0:
        raise OnnxoptError(f"distillation temperature must be > 0, got {temperature}")
    proto = graph.to_proto(model)
    program = _Program(proto, output)
    names = list(inputs)
    count = len(next(iter(inputs.values())))
    if any(len(a) != count for a in inputs.values()) or len(targets) != count:
        raise OnnxoptError("inputs and targets must have the same number of samples")
    params = _parameters(torch, program, seed)
    optimizer = torch.optim.Adam(params.values(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    target_array = np.asarray(targets)
    if loss == "cross_entropy" and target_array.ndim == 2:
        target_array = target_array.argmax(axis=1)
    losses = []
    with torch.enable_grad():
        for epoch in range(epochs):
            order = rng.permutation(count)
            total, batches = 0.0, 0
            for start in range(0, count, batch_size):
                index = order[start : start + batch_size]
                feeds = {n: torch.from_numpy(np.ascontiguousarray(inputs[n][index])) for n in names}
                prediction = program.forward(feeds, params, logits=loss != "mse")
                target = torch.from_numpy(np.ascontiguousarray(target_array[index]))
                if loss == "cross_entropy":
                    value = torch.nn.functional.cross_entropy(prediction.reshape(len(index), -1), target.long())
                elif loss == "distill":
                    student = torch.log_softmax(prediction.reshape(len(index), -1) / temperature, dim=1)
                    teacher = torch.log_softmax(target.float().reshape(len(index), -1) / temperature, dim=1)
                    kl = torch.nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True)
                    value = kl * temperature**2
                else:
                    value = torch.nn.functional.mse_loss(prediction, target.float().reshape(prediction.shape))
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                total, batches = total + float(value.detach()), batches + 1
            losses.append(total / max(batches, 1))
            if log:
                log(f"fine-tune epoch {epoch + 1}/{epochs}: loss {losses[-1]:.6g}")
    return _write_back(proto, params, losses)


Pairs = Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]


def distill(
    model: ir.Model,
    batches: Pairs | Callable[[int], Pairs],
    *,
    outputs: Sequence[str] | None = None,
    epochs: int = 2,
    lr: float = 1e-4,
    temperature: float = 2.0,
    hidden: Sequence[str] = (),
    hidden_weight: float = 1.0,
    seed: int = 0,
    threads: int = 1,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Train ``model``'s float weights to reproduce a teacher's outputs (knowledge distillation, no labels).

    ``batches`` holds ``(feeds, teacher_outputs)`` pairs, e.g. the calibration data and the *original* model's outputs
    on it; batches may differ in shape (token sequences of different lengths). ``batches`` may also be a function of
    the epoch (0, 1, ...) giving that epoch's pairs: new augmented views of the data each epoch, with the teacher's
    outputs on them. Each epoch visits its batches in a seeded random order, one Adam step per batch; the optimizer's
    state carries over from epoch to epoch. The loss sums over ``outputs`` (default: every float graph output the
    teacher gives): for class-score outputs (2-D, at least two columns) the KL divergence between the softened
    distributions at ``temperature`` times its square (Hinton et al. 2015; a Softmax output is compared through its log,
    which is a logit up to a constant); for any other output the squared error relative to the teacher's mean square,
    so outputs of different scales weigh alike. ``hidden``: intermediate tensors of the student matched too (FitNets,
    Romero et al. 2015; TinyBERT's hidden-state loss, Jiao et al. 2020), each by the same relative squared error
    times ``hidden_weight``, where a batch's teacher outputs hold a tensor of that name *and the same shape* (a
    pruned layer's narrower tensor is skipped); ``FinetuneResult.hidden`` names the ones matched. ``threads``:
    torch's intra-op threads while training (one by default: small per-node kernels run up to 20x slower when two
    threads contend on a busy 2-core machine).
    """
    torch = _torch()
    epoch_batches = batches if callable(batches) else (lambda _epoch: batches)
    batches = epoch_batches(0)
    if not batches:
        raise OnnxoptError("distillation needs at least one batch")
    if not temperature > 0:
        raise OnnxoptError(f"distillation temperature must be > 0, got {temperature}")
    if not hidden_weight >= 0:
        raise OnnxoptError(f"distillation hidden_weight must be >= 0, got {hidden_weight}")
    proto = graph.to_proto(model)
    program = _Program(proto, None)
    first = batches[0][1]  # the teacher's outputs on the first batch (made on access when batches are lazy views)
    names = list(outputs) if outputs is not None else [n for n in program.outputs if n in first]
    missing = [n for n in names if n not in program.outputs or n not in first]
    if missing or not names:
        raise OnnxoptError(f"no teacher output to distill from (asked: {', '.join(missing) or 'none'})")
    params = _parameters(torch, program, seed)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    rng = np.random.default_rng(seed)
    softmax = {n for n in names if program.producer.get(n) is not None and program.producer[n].op_type == "Softmax"}
    inner = [n for n in dict.fromkeys(hidden) if n not in names and n in program.producer] if hidden_weight else []
    matched: set[str] = set()
    losses = []
    with torch.enable_grad(), _threads(torch, threads):
        for epoch in range(epochs):
            total = 0.0
            batches = batches if epoch == 0 else epoch_batches(epoch)
            for index in rng.permutation(len(batches)):
                feeds, teacher = batches[index]
                values = program.run({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feeds.items()}, params)
                value = sum(
                    _distill_loss(values[n], torch.from_numpy(np.asarray(teacher[n])), temperature, n in softmax)
                    for n in names
                )
                for n in inner:
                    if n in teacher and n in values and tuple(values[n].shape) == np.shape(teacher[n]):
                        target = torch.from_numpy(np.asarray(teacher[n]))
                        value = value + hidden_weight * _relative_mse(values[n], target)
                        matched.add(n)
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                total += float(value.detach())
            losses.append(total / len(batches))
            if log:
                log(f"distill epoch {epoch + 1}/{epochs}: loss {losses[-1]:.6g}")
    result = _write_back(proto, params, losses)
    result.hidden = [n for n in inner if n in matched]
    return result


@contextlib.contextmanager
def _threads(torch, count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _distill_loss(student, teacher, temperature: float, probabilities: bool):
    import torch

    teacher = teacher.to(student.dtype).reshape(student.shape)
    if student.dim() == 2 and student.shape[1] >= 2:
        if probabilities:
            student, teacher = torch.log(student.clamp_min(1e-12)), torch.log(teacher.clamp_min(1e-12))
        s = torch.log_softmax(student / temperature, dim=1)
        t = torch.log_softmax(teacher / temperature, dim=1)
        return torch.nn.functional.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2
    return _relative_mse(student, teacher)


def _relative_mse(student, teacher):
    """Mean squared error relative to the teacher's mean square: scale-free, so tensors of any scale weigh alike."""
    import torch

    teacher = teacher.to(student.dtype).reshape(student.shape)
    scale = teacher.pow(2).mean().clamp_min(1e-12)
    return torch.nn.functional.mse_loss(student, teacher) / scale


def _parameters(torch, program: _Program, seed: int) -> dict:
    """The program's learnable float weights as float32 torch parameters, after seeding torch."""
    torch.manual_seed(seed)
    return {name: torch.nn.Parameter(torch.from_numpy(np.array(array, dtype=np.float32)))
            for name, array in program.learnable.items()}  # fmt: skip


def _write_back(proto: onnx.ModelProto, params, losses: list[float]) -> FinetuneResult:
    """The trained parameters written back into ``proto`` under their names, in their original dtype."""
    by_name = {init.name: init for init in proto.graph.initializer}
    for name, param in params.items():
        array = param.detach().numpy().astype(numpy_helper.to_array(by_name[name]).dtype)
        by_name[name].CopyFrom(numpy_helper.from_array(array, name))
    return FinetuneResult(graph.from_proto(proto), losses, sum(int(p.numel()) for p in params.values()))


def logits(
    model: ir.Model, inputs: Mapping[str, np.ndarray], *, output: str | None = None, batch_size: int = 1000
) -> np.ndarray:
    """The output's logits (the Softmax input when the graph ends in Softmax) for ``inputs``: distillation targets."""
    torch = _torch()

    program = _Program(graph.to_proto(model), output)
    count = len(next(iter(inputs.values())))
    parts = []
    with torch.no_grad():
        for start in range(0, count, batch_size):
            feeds = {
                n: torch.from_numpy(np.ascontiguousarray(a[start : start + batch_size])) for n, a in inputs.items()
            }
            parts.append(program.forward(feeds, {}, logits=True).numpy())
    return np.concatenate(parts)


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise OnnxoptError("fine-tuning needs PyTorch: pip install 'onnxopt[torch]'") from e
    return torch


SUPPORTED = (
    frozenset(
        "Conv ConvTranspose Gemm MatMul Add Sub Mul Div Relu LeakyRelu PRelu Sigmoid Tanh Softmax Clip HardSigmoid "
        "HardSwish Reshape Flatten Transpose Squeeze Unsqueeze Concat Identity Dropout MaxPool AveragePool "
        "GlobalAveragePool GlobalMaxPool BatchNormalization Pad Constant".split()
    )
    | EXTRA_OPS
)


class _Program:
    """The graph's nodes as a list of torch calls over a value table."""

    def __init__(self, proto: onnx.ModelProto, output: str | None):
        g = proto.graph
        unsupported = sorted(
            {n.op_type for n in g.node if n.op_type not in SUPPORTED or n.domain not in ("", "ai.onnx")}
        )
        if unsupported:
            raise OnnxoptError(f"fine-tuning does not support op(s) {', '.join(unsupported)}")
        outputs = [o.name for o in g.output]
        self.outputs = outputs
        if output is not None and output not in outputs:
            raise OnnxoptError(f"no graph output named {output!r} (outputs: {', '.join(outputs)})")
        self.output = output or outputs[0]
        self.nodes = list(g.node)
        self.constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.learnable: dict[str, np.ndarray] = {}
        for node in self.nodes:
            for index in _LEARNABLE.get(node.op_type, ()):
                if index < len(node.input) and node.input[index] in self.constants:
                    array = self.constants[node.input[index]]
                    if array.dtype in (np.float32, np.float16, np.float64) and array.size > 1:
                        self.learnable[node.input[index]] = array
        self.producer = {o: n for n in self.nodes for o in n.output}

    def run(self, feeds, params) -> dict:
        """Every value of the graph for ``feeds`` (all nodes run), by name."""
        values = self._values(feeds, params)
        for node in self.nodes:
            values[node.output[0]] = _call(node, values)
        return values

    def _values(self, feeds, params) -> dict:
        import torch

        values = {name: torch.from_numpy(np.array(a)) for name, a in self.constants.items() if name not in params}
        values.update(params)
        values.update(feeds)
        return values

    def forward(self, feeds, params, *, logits: bool):
        values = self._values(feeds, params)
        target = self.output
        if logits and self.producer.get(target) is not None and self.producer[target].op_type == "Softmax":
            target = self.producer[target].input[0]
        for node in self.nodes:
            result = _call(node, values)
            values[node.output[0]] = result
            if node.output[0] == target:
                return result
        return values[target]


def _call(node: onnx.NodeProto, values: dict):
    args = [values[name] if name else None for name in node.input]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return _OPS[node.op_type](args, attrs)


def _conv(args, attrs):
    import torch.nn.functional as F

    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    dims = w.dim() - 2
    strides = attrs.get("strides", [1] * dims)
    dilations = attrs.get("dilations", [1] * dims)
    group = attrs.get("group", 1)
    pads = _pads(attrs, x.shape[2:], w.shape[2:], strides, dilations)
    x = F.pad(x, [p for d in reversed(range(dims)) for p in (pads[d], pads[d + dims])])
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return fn(x, w, b, stride=strides, dilation=dilations, groups=group)


def _pads(attrs, spatial, kernel, strides, dilations):
    dims = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * dims)
        for d in range(dims):
            out = math.ceil(spatial[d] / strides[d])
            total = max(0, (out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 - spatial[d])
            small, big = total // 2, total - total // 2
            pads[d], pads[d + dims] = (small, big) if auto == "SAME_UPPER" else (big, small)
        return pads
    return list(attrs.get("pads", [0] * (2 * dims)))


def _conv_transpose(args, attrs):
    """ConvTranspose per ONNX: full transposed convolution plus output_padding, then the pads cropped off."""
    import torch.nn.functional as F

    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    dims = w.dim() - 2
    strides = list(attrs.get("strides", [1] * dims))
    dilations = list(attrs.get("dilations", [1] * dims))
    out_pad = list(attrs.get("output_padding", [0] * dims))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    kernel = [(w.shape[2 + d] - 1) * dilations[d] + 1 for d in range(dims)]
    size = [(x.shape[2 + d] - 1) * strides[d] + kernel[d] + out_pad[d] for d in range(dims)]
    if "output_shape" in attrs or auto in ("SAME_UPPER", "SAME_LOWER"):
        if "output_shape" in attrs:
            shape = list(attrs["output_shape"])[-dims:]
        else:
            shape = [x.shape[2 + d] * strides[d] for d in range(dims)]
        begin = []
        for d in range(dims):
            total = size[d] - shape[d]
            begin.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
        end = [size[d] - shape[d] - begin[d] for d in range(dims)]
    else:
        pads = list(attrs.get("pads", [0] * (2 * dims)))
        begin, end = pads[:dims], pads[dims:]
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    # torch's output_padding must be smaller than stride or dilation; pad the rest with the bias by hand
    y = fn(x, w, None, stride=strides, dilation=dilations, groups=attrs.get("group", 1))
    y = F.pad(y, [p for d in reversed(range(dims)) for p in (0, out_pad[d])])
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * dims))
    index = [slice(None), slice(None)] + [slice(begin[d], size[d] - end[d]) for d in range(dims)]
    return y[tuple(index)]


def _gemm(args, attrs):
    a, b = args[0], args[1]
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        y = y + attrs.get("beta", 1.0) * args[2]
    return y


def _reshape(args, attrs):
    shape = [int(s) for s in args[1].tolist()]
    x = args[0]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _squeeze(args, attrs):
    x = args[0]
    axes = args[1].tolist() if len(args) > 1 and args[1] is not None else attrs.get("axes")
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(args, attrs):
    x = args[0]
    axes = args[1].tolist() if len(args) > 1 and args[1] is not None else attrs["axes"]
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _pool(kind):
    def run(args, attrs):
        import torch.nn.functional as F

        x = args[0]
        kernel = list(attrs["kernel_shape"])
        dims = len(kernel)
        strides = attrs.get("strides", [1] * dims)
        pads = _pads(attrs, x.shape[2:], kernel, strides, [1] * dims)
        value = float("-inf") if kind == "max" else 0.0
        x = F.pad(x, [p for d in reversed(range(dims)) for p in (pads[d], pads[d + dims])], value=value)
        if attrs.get("ceil_mode", 0):
            raise OnnxoptError("fine-tuning does not support pools with ceil_mode")
        if kind == "max":
            return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims](x, kernel, strides)
        if any(pads) and not attrs.get("count_include_pad", 0):
            raise OnnxoptError("fine-tuning does not support padded AveragePool without count_include_pad")
        return {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims](x, kernel, strides)

    return run


def _batch_norm(args, attrs):
    import torch.nn.functional as F

    x, scale, bias, mean, var = args[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=attrs.get("epsilon", 1e-5))


def _clip(args, attrs):
    import torch

    low = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min")
    high = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max")
    x = args[0]
    if low is not None:
        x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype))
    if high is not None:
        x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype))
    return x


def _pad(args, attrs):
    import torch.nn.functional as F

    x = args[0]
    pads = args[1].tolist() if len(args) > 1 else list(attrs["pads"])
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant" or (len(args) > 3 and args[3] is not None):
        raise OnnxoptError("fine-tuning supports only constant Pad over all axes")
    value = float(args[2]) if len(args) > 2 and args[2] is not None else 0.0
    rank = x.dim()
    return F.pad(x, [p for d in reversed(range(rank)) for p in (pads[d], pads[d + rank])], value=value)


def _ops():
    import torch
    import torch.nn.functional as F

    def softmax(args, attrs):
        return F.softmax(args[0], dim=attrs.get("axis", -1))

    return {
        "Conv": _conv,
        "ConvTranspose": _conv_transpose,
        "Gemm": _gemm,
        "MatMul": lambda a, _: a[0] @ a[1],
        "Add": lambda a, _: a[0] + a[1],
        "Sub": lambda a, _: a[0] - a[1],
        "Mul": lambda a, _: a[0] * a[1],
        "Div": lambda a, _: a[0] / a[1],
        "Relu": lambda a, _: F.relu(a[0]),
        "LeakyRelu": lambda a, at: F.leaky_relu(a[0], at.get("alpha", 0.01)),
        "PRelu": lambda a, _: torch.where(a[0] >= 0, a[0], a[0] * a[1]),
        "Sigmoid": lambda a, _: torch.sigmoid(a[0]),
        "Tanh": lambda a, _: torch.tanh(a[0]),
        "HardSigmoid": lambda a, at: torch.clamp(at.get("alpha", 0.2) * a[0] + at.get("beta", 0.5), 0, 1),
        "HardSwish": lambda a, _: F.hardswish(a[0]),
        "Softmax": softmax,
        "Clip": _clip,
        "Reshape": _reshape,
        "Flatten": lambda a, at: a[0].reshape(
            int(np.prod(a[0].shape[: at.get("axis", 1) % max(a[0].dim(), 1)] or [1])), -1
        ),
        "Transpose": lambda a, at: a[0].permute(*(at.get("perm") or reversed(range(a[0].dim())))),
        "Squeeze": _squeeze,
        "Unsqueeze": _unsqueeze,
        "Concat": lambda a, at: torch.cat([t for t in a if t is not None], dim=at["axis"]),
        "Identity": lambda a, _: a[0],
        "Dropout": lambda a, _: a[0],
        "MaxPool": _pool("max"),
        "AveragePool": _pool("avg"),
        "GlobalAveragePool": lambda a, _: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
        "GlobalMaxPool": lambda a, _: a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True),
        "BatchNormalization": _batch_norm,
        "Pad": _pad,
        "Constant": lambda _, at: torch.from_numpy(np.array(numpy_helper.to_array(at["value"]))),
    }


class _LazyOps(dict):
    def __missing__(self, key):
        self.update(extra_ops())
        self.update(_ops())
        return self[key]


_OPS = _LazyOps()
