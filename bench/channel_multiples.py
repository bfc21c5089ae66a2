"""Which channel counts onnxruntime's convolution kernels run fast on this CPU, in float and in int8.

    python bench/channel_multiples.py [--counts 96-136] [--rounds 15] [--out bench/results/channel_multiples.md]

Pruning leaves arbitrary channel counts; the kernels work in blocks (float NCHWc blocks of 8 or 16 channels, int8
GEMM panels), so a count just past a block boundary can cost as much as the next block. For each layer kind of a
MobileNetV2-style network (a 1×1 expansion with ``c`` output channels, a 3×3 depthwise over ``c`` channels, a 1×1
projection reading ``c`` channels), one-layer models at every count in ``--counts`` are built, quantized with
onnxruntime's ``quantize_static`` (QDQ, U8S8, per-channel: the fast recipe on x86), and timed with onnxopt's
interleaved timer (onnxruntime, all optimizations, 1 intra-op thread, batch 1, median of ``--rounds``). Prints and
writes each count's median, and for each multiple m the mean cost of a count that is not a multiple of m relative to
the next multiple of m above it (> 1: rounding up to the multiple would be faster despite the extra channels).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (spatial size, fixed other side, builder args) -- shapes of MobileNetV2's 14x14 stage
KINDS = {
    "expand 1x1 (384 -> c), 14x14": dict(size=14, kind="expand", other=384),
    "depthwise 3x3 (c), 28x28": dict(size=28, kind="depthwise", other=0),
    "project 1x1 (c -> 64), 14x14": dict(size=14, kind="project", other=64),
}


def _layer(kind: str, c: int, other: int, size: int, seed: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    if kind == "expand":
        cin, cout, k, group = other, c, 1, 1
    elif kind == "project":
        cin, cout, k, group = c, other, 1, 1
    else:
        cin, cout, k, group = c, c, 3, c
    w = rng.normal(0, (2 / (cin // group * k * k)) ** 0.5, (cout, cin // group, k, k)).astype(np.float32)
    b = rng.normal(0, 0.1, cout).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y0"], group=group, kernel_shape=[k, k], pads=[k // 2] * 4)
    relu = helper.make_node("Relu", ["y0"], ["y"])
    graph = helper.make_graph(
        [conv, relu], kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, size, size])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), cin, onnx


def _quantize(src: Path, dst: Path, x: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x}])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip


def measure(counts: list[int], rounds: int, work: Path) -> dict[tuple[str, str], dict[int, float]]:
    from onnxopt import runtime

    results: dict[tuple[str, str], dict[int, float]] = {}
    for label, spec in KINDS.items():
        paths: dict[tuple[str, int], Path] = {}
        feeds = None
        for c in counts:
            model, cin, onnx = _layer(spec["kind"], c, spec["other"], spec["size"], seed=c)
            x = np.abs(np.random.default_rng(0).normal(size=(1, cin, spec["size"], spec["size"]))).astype(np.float32)
            f32 = work / f"{spec['kind']}_{c}.onnx"
            onnx.save(model, f32)
            q8 = work / f"{spec['kind']}_{c}_int8.onnx"
            _quantize(f32, q8, x)
            paths[("float", c)], paths[("int8", c)] = f32, q8
            feeds = {"x": x} if spec["kind"] == "expand" else None
        # every model of a kind has its own input width unless the input side is fixed: time each count's pair
        # (float, int8) in one interleaved call, and all counts of a fixed-input kind together
        if feeds is not None:
            order = list(paths)
            figures = runtime.measure_latency([paths[k] for k in order], feeds, rounds=rounds, threads=1)
            for key, m in zip(order, figures, strict=True):
                results.setdefault((label, key[0]), {})[key[1]] = m.median_us
        else:
            for _ in range(2):  # two passes over the counts, interleaving drift
                for c in counts:
                    cin = c
                    x = np.abs(np.random.default_rng(0).normal(size=(1, cin, spec["size"], spec["size"])))
                    figures = runtime.measure_latency(
                        [paths[("float", c)], paths[("int8", c)]], {"x": x.astype(np.float32)}, rounds=rounds,
                        threads=1,
                    )  # fmt: skip
                    for dtype, m in zip(("float", "int8"), figures, strict=True):
                        old = results.setdefault((label, dtype), {}).get(c)
                        results[(label, dtype)][c] = m.median_us if old is None else min(old, m.median_us)
        print(f"measured {label}", flush=True)
    return results


def summary(times: dict[int, float], multiple: int, of: int = 1) -> float | None:
    """Mean of time(c) / time(next multiple of ``multiple`` ≥ c) over the counts that are multiples of ``of`` but
    not of ``multiple``."""
    ratios = []
    for c, t in times.items():
        up = -(-c // multiple) * multiple
        if c % multiple and c % of == 0 and up in times:
            ratios.append(t / times[up])
    return float(np.mean(ratios)) if ratios else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="96-136", help="first-last channel count")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "channel_multiples.md"))
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice, once per model
    first, last = map(int, args.counts.split("-"))
    counts = list(range(first, last + 1))
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(counts, args.rounds, Path(tmp))
    import onnxruntime

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = _cpu()
    lines = [
        f"Measured {date}: `python bench/channel_multiples.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
        f"on {cpu}, onnxruntime {onnxruntime.__version__}, load {load[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end. Batch 1, 1 thread, median of {args.rounds} interleaved rounds, µs.",
        "",
        "Mean of time(c) / time(the next multiple of m above c) over the counts c that are not multiples of m "
        "(above 1: the count costs more than the larger multiple); the last column over the multiples of 8 that are "
        "not multiples of 16 only:",
        "",
        "| layer | dtype | " + " | ".join(f"m={m}" for m in (4, 8, 16, 32)) + " | 8, not 16 |",
        "|---|---|" + "---|" * 5,
    ]
    for (label, dtype), times in results.items():
        cells = [summary(times, m) for m in (4, 8, 16, 32)] + [summary(times, 16, of=8)]
        lines.append(f"| {label} | {dtype} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in cells) + " |")
    lines += ["", "| c | " + " | ".join(f"{label} {dtype}" for label, dtype in results) + " |",
              "|---|" + "---|" * len(results)]  # fmt: skip
    for c in counts:
        lines.append(f"| {c} | " + " | ".join(f"{times[c]:.1f}" for times in results.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "this CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    vnni = "AVX-512 VNNI" if "avx512_vnni" in flags else ("AVX-VNNI" if "avx_vnni" in flags else "no VNNI")
    return f"{name} ({vnni})"


if __name__ == "__main__":
    sys.exit(main())
