"""onnxopt `quant` outputs against onnxruntime's quantize_static (QDQ, U8S8 per-channel) or quantize_dynamic.

    python bench/quant_recipes.py MODEL.onnx --calib CALIB.npz --eval EVAL.npz OPT1.onnx [OPT2.onnx ...]
                                  [--batches 1,16] [--rounds 15] [--eval-samples 600] [--peer static|dynamic]

The reference recipe is made here from MODEL with onnxruntime's own ``quantize_static`` calibrated on all of
CALIB (the recipe onnxruntime documents as the fast one on x86). Every model (float, the reference, each
onnxopt output) is scored on EVAL (top-1 in % when EVAL has class ``labels``, else the worst per-sample cosine
to the float model's first output), and timed at each batch size with onnxopt's interleaved timer
(onnxruntime full optimizations, 1 intra-op thread; median of ``--rounds`` rounds, with the fastest and slowest
round). Prints one markdown row per model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _reference(model: Path, calib: dict[str, np.ndarray], dst: Path, peer: str) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if peer == "dynamic":
        quantize_dynamic(str(model), str(dst), weight_type=QuantType.QInt8)
        return dst

    names = [k.removeprefix("input__") for k in calib if k != "labels"]
    total = len(calib[next(iter(calib))])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{n: calib[n][i : i + 16] for n in names} for i in range(0, total - 15, 16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(model), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return dst


def _outputs(path: Path, feeds: dict[str, np.ndarray], output: str | None, batch: int = 16) -> np.ndarray:
    from onnxopt.runtime import Session

    session = Session(path, optimize=True)
    total = len(next(iter(feeds.values())))
    name = output or session.output_names[0]
    parts = [session.run({k: v[i : i + batch] for k, v in feeds.items()}, [name])[name]
             for i in range(0, total, batch)]  # fmt: skip
    return np.concatenate(parts)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end - 1) / 2
            start = end
    return ranks


def _spearman(tokens: np.ndarray, mask: np.ndarray | None, gold: np.ndarray) -> float:
    """100 x Spearman between gold scores and the cosine of mean-pooled embeddings of rows 2k and 2k+1."""
    weights = np.ones(tokens.shape[:2]) if mask is None else mask[: len(tokens)].astype(np.float64)
    pooled = (tokens * weights[..., None]).sum(1) / np.maximum(weights.sum(1, keepdims=True), 1e-9)
    a, b = pooled[0::2], pooled[1::2]
    cosine = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return 100 * float(np.corrcoef(_ranks(cosine), _ranks(gold[: len(cosine)].astype(np.float64)))[0, 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("optimized", nargs="*")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--eval-samples", type=int, default=600)
    parser.add_argument("--output", help="the output to score (default: the first)")
    parser.add_argument(
        "--peer",
        choices=("static", "dynamic"),
        default="static",
        help="onnxruntime's quantize_static U8S8 per-channel, or quantize_dynamic (S8 weights)",
    )
    args = parser.parse_intermixed_args(argv)

    from onnxopt.runtime import measure_latency

    calib = dict(np.load(args.calib))
    evaluation = dict(np.load(args.eval))
    labels = evaluation.pop("labels", None)
    evaluation = {k.removeprefix("input__"): v[: args.eval_samples] for k, v in evaluation.items()}
    if labels is not None and labels.dtype.kind == "f":
        labels = labels[: args.eval_samples // 2]  # one gold score per pair of rows
    with tempfile.TemporaryDirectory() as tmp:
        reference = _reference(Path(args.model), calib, Path(tmp) / "ort_reference.onnx", args.peer)
        peer = "quantize_static U8S8 per-channel" if args.peer == "static" else "quantize_dynamic S8 weights"
        models = {"float": Path(args.model), f"onnxruntime {peer}": reference}
        models.update({Path(p).name: Path(p) for p in args.optimized})
        scores = {}
        base = None
        for name, path in models.items():
            out = _outputs(path, evaluation, args.output)
            if labels is not None and labels.dtype.kind == "f":  # STS-B pairs: Spearman of pooled cosines
                scores[name] = f"Spearman {_spearman(out, evaluation.get('attention_mask'), labels):.2f}"
            elif labels is not None:
                scores[name] = f"{100 * np.mean(out.argmax(1) == labels[: len(out)]):.2f}%"
            else:
                flat, ref = out.reshape(len(out), -1), (base if base is not None else out).reshape(len(out), -1)
                cos = np.sum(flat * ref, 1) / np.linalg.norm(flat, axis=1) / np.linalg.norm(ref, axis=1)
                scores[name] = f"cosine {cos.min():.5f}"
            base = out if base is None else base
        latency = {}
        for batch in (int(b) for b in args.batches.split(",")):
            feeds = {k: v[:batch] for k, v in evaluation.items()}
            measured = measure_latency(list(models.values()), feeds, rounds=args.rounds)
            latency[batch] = measured
        heads = " | ".join(f"batch {b}: × fp32 (median µs, rounds min-max)" for b in latency)
        print(f"| model | metric | {heads} |")
        print("|---|---|" + "---|" * len(latency))
        for index, name in enumerate(models):
            cells = []
            for measured in latency.values():
                m, f = measured[index], measured[0]
                cells.append(f"{m.median_us / f.median_us:.2f} ({m.median_us:.0f}, {m.min_us:.0f}-{m.max_us:.0f})")
            print(f"| {name} | {scores[name]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
