"""onnxruntime.quantization behind one small interface (files in, file out), used by the `quant` pass.

onnxopt does not re-implement quantization: it prepares models so that onnxruntime's tools work on them
(opset ≥ 13 for per-axis QDQ, an IR version onnxruntime accepts), feeds calibration data from a
:class:`~onnxopt.data.DataSource`, and measures per-tensor quantization noise with onnxruntime's
``qdq_loss_debug`` so the pass can keep the worst layers in float.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx

from onnxopt import graph as graph_io
from onnxopt.data import DataSource

__all__ = [
    "MIN_QDQ_OPSET",
    "prepare",
    "quantize_static",
    "quantize_dynamic",
    "quantize_weight4",
    "gemm_to_matmul",
    "pad_stem_channels",
    "gather_stem_channels",
    "tensor_noise",
]

logger = logging.getLogger(__name__)

MIN_QDQ_OPSET = 13  # per-axis DequantizeLinear; below it onnxruntime's per-channel output fails to load
STEM_CHANNELS = 4  # int8 Conv input channels are padded to a multiple of this (see pad_stem_channels)
_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    """onnxruntime.quantization warns through the root logger ("Please consider pre-processing...")."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def prepare(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` with the default opset raised to 13 when lower (onnx's version converter)."""
    proto = onnx.load(str(src))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < MIN_QDQ_OPSET:
        proto = onnx.version_converter.convert_version(proto, MIN_QDQ_OPSET)
    _flatten_gemm_bias(proto)
    proto.ir_version = min(max(proto.ir_version, 7), graph_io.MAX_IR_VERSION)
    # stale or initializer value_info trips the quantizers' strict shape inference when they rewrite weights
    del proto.graph.value_info[:]
    if _large(proto):  # protobuf cannot serialize 2 GB: the weights go to <dst>.data
        onnx.save(proto, str(dst), save_as_external_data=True, location=Path(dst).name + ".data")
    else:
        onnx.save(proto, str(dst))
    return Path(dst)


def _large(proto: onnx.ModelProto) -> bool:
    try:
        return proto.ByteSize() > graph_io.EXTERNAL_DATA_THRESHOLD
    except Exception:  # noqa: BLE001 - protobuf's EncodeError: it cannot even size a message over 2 GB
        return True


def _external(path: str | os.PathLike) -> bool:
    """Whether the model file at ``path`` keeps its weights in external data (onnxruntime's quantizers must too)."""
    return bool(graph_io.external_data_files(path))


def _flatten_gemm_bias(proto: onnx.ModelProto) -> None:
    """A Gemm bias of shape (1, N) becomes (N,): onnxruntime's per-channel int32 bias adjustment indexes it per
    output channel and fails on the 2-D form ("truth value of an array ... is ambiguous", mnist8)."""
    from onnx import numpy_helper

    inits = {init.name: init for init in proto.graph.initializer}
    readers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for node in proto.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        init = inits[node.input[2]]
        if len(init.dims) == 2 and init.dims[0] == 1 and readers.get(init.name) == 1:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).reshape(-1), init.name))


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a DataSource (re-iterable).

    A last batch smaller than the first is left out: onnxruntime's histogram calibrators (entropy,
    percentile) stack the batches and fail on unequal shapes.
    """

    def __init__(self, data: DataSource, max_batches: int | None = None) -> None:
        self._data = data
        self._max = max_batches
        self.rewind()

    def get_next(self):
        if self._max is not None and self._count >= self._max:
            return None
        batch = next(self._iter, None)
        self._count += 1
        if batch is None:
            return None
        if self._size is None:
            self._size = batch.size
        elif batch.size != self._size:
            return None
        return dict(batch.feeds)

    def rewind(self) -> None:
        self._iter = iter(self._data)
        self._count = 0
        self._size = None

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def quantize_static(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    data: DataSource,
    *,
    per_channel: bool = True,
    method: str = "minmax",
    exclude: Sequence[str] = (),
    quantize_bias: bool = True,
    unsigned_activations: bool = False,
    quant_format: str = "qdq",
    calibration_cache: str | os.PathLike | None = None,
    unsigned_weights: bool = False,
    reduce_range: bool = False,
) -> Path:
    """Static int8 (signed activations and symmetric weights, per channel by default), calibrated on ``data``.

    ``unsigned_activations`` with ``per_channel=False`` is onnxruntime's own default recipe.
    ``quantize_bias=False`` keeps biases float: a smaller file (no int32 bias with its per-channel scale and
    zero point), which onnxruntime runs without its fused integer kernels. ``quant_format`` is ``"qdq"``
    (Quantize/Dequantize pairs around float ops) or ``"qoperator"`` (QLinearConv, QLinearMatMul, ...).
    ``calibration_cache``: a JSON file of activation ranges; written by the first call that names it and
    read by the next ones, so several recipes (and float fallbacks) of one model calibrate once. The ranges
    do not depend on the recipe: MinMax/entropy/percentile ranges of the float model, asymmetric.
    ``unsigned_weights`` (uint8 weights, zero point 128) and ``reduce_range`` (7-bit weights) avoid the int16
    saturation of onnxruntime's uint8 x int8 kernels on x86 CPUs without VNNI.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(data)
    with _quiet_root():
        ort_quantize_static(
            str(src), str(dst), reader, per_channel=per_channel,
            quant_format=QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ,
            activation_type=QuantType.QUInt8 if unsigned_activations else QuantType.QInt8,
            weight_type=QuantType.QUInt8 if unsigned_weights else QuantType.QInt8, reduce_range=reduce_range,
            calibrate_method=methods[method],
            nodes_to_exclude=list(exclude) or None,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "QuantizeBias": quantize_bias},
            calibration_cache_path=None if calibration_cache is None else str(calibration_cache),
            use_external_data_format=_external(src),
        )  # fmt: skip
    return Path(dst)


def quantize_dynamic(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    per_channel: bool = False,
    exclude: Sequence[str] = (),
    unsigned_weights: bool | None = None,
) -> Path:
    """Dynamic quantization: int8 weights, activations quantized at run time (MatMul/Gemm/... ).

    The nodes named in ``exclude`` stay float. ``unsigned_weights``: uint8 (True) or int8 (False) weights; by
    default uint8 per tensor and int8 per channel.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    # unsigned weights: signed per-channel dynamic Conv is far slower here (../shared/FINDINGS.md)
    if unsigned_weights is None:
        unsigned_weights = not per_channel
    weight = QuantType.QUInt8 if unsigned_weights else QuantType.QInt8
    with _quiet_root():
        ort_quantize_dynamic(
            str(src), str(dst), per_channel=per_channel, weight_type=weight, nodes_to_exclude=list(exclude) or None,
            use_external_data_format=_external(src),
            # onnx's shape inference leaves the outputs of com.microsoft ops (`fuse`'s Attention, SkipLayerNorm...)
            # untyped; the quantizer refuses a MatMul reading one without a default type ("Unable to find data type")
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )  # fmt: skip
    return Path(dst)


def quantize_weight4(src: str | os.PathLike, dst: str | os.PathLike, *, block_size: int = 32) -> Path:
    """4-bit block-quantized MatMul weights (``MatMulNBits``); Gemm is rewritten to MatMul+Add first."""
    import onnx_ir as ir
    from onnx_ir.passes.common import ShapeInferencePass
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = graph_io.load(src)
    gemm_to_matmul(model)
    ShapeInferencePass(strict_mode=False)(model)  # the new MatMul/Add outputs get their shapes
    proto = ir.to_proto(model)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(proto, block_size=block_size, is_symmetric=True)
    with _quiet_root():
        quantizer.process()
    onnx.save(quantizer.model.model, str(dst))
    return Path(dst)


def gemm_to_matmul(model) -> int:
    """``Gemm(X, B, C)`` with a constant B and no transA → ``MatMul(X, alpha·B')`` [+ ``Add(beta·C)``].

    MatMulNBitsQuantizer only quantizes MatMul (onnxscript's Gemm rule only matches Reshape-Gemm-Reshape).
    """
    import onnx_ir as ir

    graph = model.graph
    count = 0
    for node in tuple(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        weight = graph_io.const_array(node.inputs[1])
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = graph_io.const_array(node.inputs[2]) if has_c else None
        if attrs.get("transA", 0) or weight is None or len(node.inputs[1].uses()) != 1 or (has_c and bias is None):
            continue
        w = (weight.T if attrs.get("transB", 0) else weight) * attrs.get("alpha", 1.0)
        w_value = graph_io.add_initializer(graph, f"{node.inputs[1].name}_matmul", w.astype(weight.dtype))
        matmul = ir.node("MatMul", [node.inputs[0], w_value], name=graph_io.fresh_name(graph, f"{node.name}_matmul"))
        graph_io.copy_dtype(node.outputs[0], matmul.outputs[0])
        graph.insert_before(node, matmul)
        result = matmul.outputs[0]
        if bias is not None:
            b_value = graph_io.add_initializer(
                graph, f"{node.name}_bias", (bias * attrs.get("beta", 1.0)).astype(bias.dtype)
            )
            add = ir.node("Add", [result, b_value], name=graph_io.fresh_name(graph, f"{node.name}_add"))
            graph_io.copy_dtype(node.outputs[0], add.outputs[0])
            graph.insert_before(node, add)
            result = add.outputs[0]
        name = node.outputs[0].name
        ir.convenience.replace_all_uses_with(node.outputs[0], result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        result.name = name
        count += 1
    return count


def pad_stem_channels(model, multiple: int = STEM_CHANNELS) -> list[str]:
    """Zero-pad the input channels of the model's 3-channel (RGB) first-layer Convs to ``multiple`` (4).

    onnxruntime's int8 Conv (QLinearConv, NHWC) runs a 3-channel input through a slow path: MobileNetV2's
    stem takes 382 us at batch 1 on 3 channels and 186 us on 4 (AVX-512 VNNI), so the whole int8 model runs
    6% faster at batch 1 and 4% at batch 16; ResNet-20, EfficientNet-Lite0 and Ultraface gain 1.5-6%
    (``bench/results/stem_pad.md``). A 1-channel input gains nothing (super-resolution: 1.007, noise) for 4x
    the input bytes, so only 3-channel inputs are padded. The float model computes the same:
    the new channel is zero in the input (a ``Pad``) and in the weight. A first-layer Conv is one that no
    Conv, Gemm or MatMul feeds (its input is the float model input, perhaps normalized or transposed), so the
    ``Pad`` sits before the input's quantization; the names of the ``Pad`` nodes are returned, to be kept
    float. Grouped Convs and weights shared with other nodes are left alone.
    """
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    added = []
    for node in tuple(graph):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = graph_io.const_array(node.inputs[1])
        group = node.attributes.get("group")
        if weight is None or weight.ndim < 3 or (group is not None and group.value != 1):
            continue
        channels = weight.shape[1]
        if channels != multiple - 1 or len(node.inputs[1].uses()) != 1 or _computed(node.inputs[0]):
            continue
        padded = np.zeros((weight.shape[0], multiple, *weight.shape[2:]), dtype=weight.dtype)
        padded[:, :channels] = weight
        pads = np.zeros(2 * weight.ndim, dtype=np.int64)
        pads[weight.ndim + 1] = multiple - channels  # the end of axis 1
        base = node.name or "stem"
        pad = ir.node(
            "Pad", [node.inputs[0], graph_io.add_initializer(graph, f"{base}_channel_pads", pads)],
            name=graph_io.fresh_name(graph, f"{base}_channel_pad"),
        )  # fmt: skip
        graph_io.copy_dtype(node.inputs[0], pad.outputs[0])
        pad.outputs[0].name = graph_io.fresh_name(graph, f"{base}_channel_padded")
        graph.insert_before(node, pad)
        node.replace_input_with(0, pad.outputs[0])
        original = node.inputs[1]
        node.replace_input_with(1, graph_io.add_initializer(graph, f"{original.name}_padded", padded))
        if not original.uses() and original not in graph.inputs:
            graph.initializers.pop(original.name, None)
        added.append(pad.name)
    return added


def gather_stem_channels(model, pads: Sequence[str]) -> list[str]:
    """After quantization: pad the stem's input in uint8 instead of float. Each ``Pad`` named in ``pads`` (from
    :func:`pad_stem_channels`) that feeds only a ``QuantizeLinear`` goes, and a ``Gather`` of channels
    ``0, 1, 2, 0`` on that quantization's uint8 output takes its place::

        x -> Pad(float, 4th channel 0) -> QuantizeLinear -> DequantizeLinear / QLinearConv
        x -> QuantizeLinear -> Gather(uint8, channels 0,1,2,0) -> DequantizeLinear / QLinearConv

    The stem Conv's weights of the 4th channel are zero, so what that channel holds changes nothing (onnxruntime's
    int8 kernels and its float simulation give the same outputs to the bit), and the scale is the same: the
    calibration range always includes 0. onnxruntime's float ``Pad`` is its slowest copy: MobileNetV2 at batch 16
    spent 1.2 ms in it and 0.57 ms quantizing 4 channels, against 0.5 ms quantizing 3 and 0.2 ms gathering uint8
    (onnxruntime 1.31, AVX-512). Returns the names of the ``Pad`` nodes replaced.
    """
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    by_name = {node.name: node for node in graph}
    done = []
    for name in pads:
        pad = by_name.get(name)
        if pad is None or pad.op_type != "Pad" or pad.outputs[0].is_graph_output():
            continue
        uses = list(pad.outputs[0].uses())
        quant = uses[0].node if len(uses) == 1 else None
        if quant is None or quant.op_type != "QuantizeLinear" or quant.outputs[0].is_graph_output():
            continue
        added = graph_io.const_array(pad.inputs[1]) if len(pad.inputs) > 1 else None
        end = None if added is None or added.ndim != 1 or added.size < 4 else added.size // 2 + 1
        mode = pad.attributes.get("mode")
        constant = mode is None or mode.value == "constant"
        if (
            end is None
            or np.flatnonzero(added).tolist() != [end]
            or added[end] != 1
            or len(pad.inputs) > 2
            or not constant
        ):
            continue  # not one zero channel added at the end of axis 1 (as pad_stem_channels adds it)
        indices = np.array([*range(STEM_CHANNELS - 1), 0], dtype=np.int64)
        quantized = quant.outputs[0]
        readers = list(quantized.uses())
        gather = ir.node(
            "Gather", [quantized, graph_io.add_initializer(graph, f"{name}_channels", indices)],
            attributes={"axis": 1}, name=graph_io.fresh_name(graph, f"{name}_gather"),
        )  # fmt: skip
        graph_io.copy_dtype(quantized, gather.outputs[0])
        if quantized.dtype is not None:  # a shape without a type is not written
            gather.outputs[0].shape = quantized.shape
        quantized.shape = None  # 3 channels now (onnxruntime infers it)
        gather.outputs[0].name = graph_io.fresh_name(graph, f"{quantized.name}_gathered")
        graph.insert_after(quant, gather)
        for reader, index in readers:
            reader.replace_input_with(index, gather.outputs[0])
        quant.replace_input_with(0, pad.inputs[0])
        pads_value = pad.inputs[1]
        graph.remove(pad, safe=True)
        if not pads_value.uses() and pads_value.is_initializer():
            graph.initializers.pop(pads_value.name, None)
        done.append(name)
    return done


def _computed(value) -> bool:
    """Whether a Conv, Gemm or MatMul is among the nodes ``value`` is computed from."""
    seen, todo = set(), [value]
    while todo:
        producer = todo.pop().producer()
        if producer is None or id(producer) in seen:
            continue
        if producer.op_type in _COMPUTE_OPS:
            return True
        seen.add(id(producer))
        todo.extend(v for v in producer.inputs if v is not None)
    return False


def _first(data: DataSource, count: int) -> Iterator:
    for index, batch in enumerate(data):
        if index >= count:
            return
        yield batch


def tensor_noise(float_path: str | os.PathLike, data: DataSource, batches: int = 4) -> dict[str, float]:
    """Per activation of the float model, the SQNR (dB) of int8 quantization of that tensor *alone*.

    Each tensor is quantized as onnxruntime's MinMax calibration would (per tensor, asymmetric, range from
    the same batches) and compared with its float value, with no error carried in from earlier layers, so
    a low SQNR marks a tensor whose range int8 cannot hold (outlier channels). ``{tensor name: sqnr_db}``.
    """
    import numpy as np
    from onnx_ir.passes.common import ShapeInferencePass

    from onnxopt.runtime import Session

    model = graph_io.load(float_path)
    ShapeInferencePass(strict_mode=False)(model)
    outputs = {v.name for v in model.graph.outputs}
    names = []
    for node in model.graph:
        for value in node.outputs:
            if value.name and value.dtype is not None and value.dtype.is_floating_point():
                names.append(value.name)
                if value.name not in outputs:
                    model.graph.outputs.append(value)
    session = Session(model)
    # two streamed passes (ranges, then errors): keeping every activation of every batch does not fit in
    # memory on ImageNet-sized models (MobileNetV2, 4 batches of 16: over 11 GB)
    low = dict.fromkeys(names, 0.0)
    high = dict.fromkeys(names, 0.0)
    seen: set[str] = set()
    for batch in _first(data, batches):
        result = session.run(batch.feeds, names)
        for name in names:
            values = result[name]
            if values.size:
                low[name] = min(low[name], float(values.min()))
                high[name] = max(high[name], float(values.max()))
                seen.add(name)
    error = dict.fromkeys(names, 0.0)
    signal = dict.fromkeys(names, 0.0)
    for batch in _first(data, batches):
        result = session.run(batch.feeds, names)
        for name in names:
            values = result[name].astype(np.float64).reshape(-1)
            scale = (high[name] - low[name]) / 255.0 or 1.0
            zero = np.round(-low[name] / scale) - 128
            dequant = (np.clip(np.round(values / scale) + zero, -128, 127) - zero) * scale
            error[name] += float(np.sum((values - dequant) ** 2))
            signal[name] += float(np.sum(values**2))
    noise = {}
    for name in names:
        if name not in seen:
            continue
        err, sig = error[name], signal[name]
        noise[name] = 10 * np.log10(sig / err) if err > 0 and sig > 0 else float("inf")
    return noise
