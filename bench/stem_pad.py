"""How much faster int8 models run when their first Conv reads 4 channels instead of 3 (or 1).

    python bench/stem_pad.py MODEL=DATA.npz [MODEL=DATA.npz ...] [--batches 1,16] [--rounds 21] [--out FILE]

onnxruntime's int8 Conv (QLinearConv, NHWC) runs a 3-channel image input through a slow path; the `quant` pass
therefore zero-pads the input channels of first-layer Convs to 4 (`onnxopt.quantize.pad_stem_channels`). For each
model this script quantizes the float model twice with onnxopt's static int8 (QDQ, uint8 activations, per-channel
int8 weights, calibrated on the first 64 samples of DATA): as it is, and with the stem padded. It times float, plain
int8 and padded int8 in interleaved rounds (onnxruntime, all optimizations, 1 intra-op thread, median and the
fastest/slowest round) at each batch (batch 1 only for models with a fixed batch of 1), and checks that both int8
models give the same top-1 class on those samples (the padding is exact in float; the int8 models differ only in
rounding order). Prints a table and writes it to ``--out``.
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


def measure(model_path: Path, data_path: Path, batches: list[int], rounds: int, work: Path) -> list[str]:
    from onnxopt import data as data_io
    from onnxopt import graph as graph_io
    from onnxopt import quantize as q
    from onnxopt import runtime

    stem = model_path.stem
    floats = q.prepare(model_path, work / f"{stem}.float.onnx")
    padded = graph_io.load(floats)
    pads = q.pad_stem_channels(padded)
    if not pads:
        return [f"| {stem} | — | no 3-channel first-layer Conv: nothing padded | | | | |"]
    padded_path = graph_io.save(padded, work / f"{stem}.padded.onnx")
    model = padded  # its inputs are the float model's: the pad sits behind them
    arrays = np.load(data_path)
    inputs = {k: arrays[k] for k in arrays.files if k != "labels"}
    first = next(iter(inputs.values()))
    fixed_one = any(spec.fixed_batch == 1 for spec in data_io.input_specs(model))
    calib = {k: v[:64] for k, v in inputs.items()}
    source = data_io.as_source(calib, model, batch_size=1 if fixed_one else 16, labels=False)
    plain_q = q.quantize_static(floats, work / f"{stem}.int8.onnx", source, unsigned_activations=True)
    padded_q = q.quantize_static(padded_path, work / f"{stem}.int8_pad.onnx", source, unsigned_activations=True,
                                 exclude=pads)  # fmt: skip
    agree = _agreement(plain_q, padded_q, inputs, 1 if fixed_one else 16, len(first[:64]))
    rows = []
    for batch in [1] if fixed_one else batches:
        feeds = {k: v[:batch].astype(np.float32) for k, v in inputs.items()}
        base, plain, pad = runtime.measure_latency([floats, plain_q, padded_q], feeds, rounds=rounds, threads=1)
        rows.append(f"| {stem} | {batch} | {base.median_us:.0f} | {_ratio(plain, base)} | {_ratio(pad, base)} | "
                    f"{pad.median_us / plain.median_us:.3f} | {agree} |")  # fmt: skip
    return rows


def _ratio(m, base) -> str:
    return f"{m.median_us / base.median_us:.3f} [{m.min_us / base.median_us:.3f}-{m.max_us / base.median_us:.3f}]"


def _agreement(a: Path, b: Path, inputs: dict, batch: int, count: int) -> str:
    from onnxopt.runtime import Session

    sa, sb = Session(a), Session(b)
    same = total = 0
    for start in range(0, count, batch):
        feeds = {k: v[start : start + batch].astype(np.float32) for k, v in inputs.items()}
        ya, yb = next(iter(sa.run(feeds).values())), next(iter(sb.run(feeds).values()))
        flat_a, flat_b = ya.reshape(len(ya), -1), yb.reshape(len(yb), -1)
        same += int(np.sum(flat_a.argmax(1) == flat_b.argmax(1)))
        total += len(ya)
    return f"{same}/{total}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="MODEL.onnx=DATA.npz")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "stem_pad.md"))
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    batches = [int(b) for b in args.batches.split(",")]
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            model, data = pair.split("=", 1)
            rows += measure(Path(model), Path(data), batches, args.rounds, Path(tmp))
            print(rows[-1], flush=True)
    import onnxruntime

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        f"Measured {date} with onnxruntime {onnxruntime.__version__}, load {load[0]:.2f} at the start and "
        f"{os.getloadavg()[0]:.2f} at the end: `python bench/stem_pad.py {' '.join(args.pairs)} --batches "
        f"{args.batches} --rounds {args.rounds}`",
        "",
        "Static int8 (QDQ, uint8 activations, per-channel int8 weights) as it is and with the first Conv's input "
        "channels zero-padded to 4; latency relative to float (median of the interleaved rounds, [fastest-slowest "
        "round]), 1 thread. The last column: how often the two int8 models agree on the argmax of the first output "
        "(top-1 for classifiers) on the first 64 calibration samples.",
        "",
        "| model | batch | float µs | int8 | int8, stem padded | padded / plain | top-1 agree |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]) + "\n"  # fmt: skip
    print(text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
