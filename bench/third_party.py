"""onnxopt's passes on the third-party models in ../shared/models (no labels: an output-similarity budget).

    python bench/third_party.py [--shared ../shared] [--passes split,svd] [--min-cosine 0.999]
                                [--images ../shared/data/images] [--out FILE]

Each model is calibrated and validated on the reference input of its ``.ref.npz`` (a real image or digit;
1-10 samples), under ``--min-cosine`` for every output. With ``--images``, real photographs are added: each
resized (random crops and flips, seeded) to the model's input and scaled per channel to the reference
input's mean and standard deviation (so they match its normalization without knowing it); calibration
gets 24 of them made from the first 8 photos, validation the reference input plus 12 made from the others.
A pass name may carry options: ``quant:objective=size``, ``prune:refit=1``. Printed per model and pass: what changed,
MACs and parameter ratios, onnxruntime latency ratio (1 thread, interleaved medians), the validation
figures and the wall time of the whole ``PassManager.run`` (statistics, search, validation; not the CLI's
start-up of about 1 s). Few samples make the budget a weak judge for detectors: read the cosine column with
that in mind.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from pathlib import Path

from _report import emit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = (
    "mnist/mnist_lenet5_ccoltong", "mnist/mnist_mlp6_ccoltong", "face/mtcnn_rnet_facenet_pytorch",
    "cifar10/cifar10_resnet20_akamaster_bn", "cifar10/cifar10_resnet56_akamaster_bn",
    "superres/super_resolution_core_224", "face/ultraface_version-RFB-320",
)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--passes", default="split,svd", help="comma-separated; each runs alone")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--min-cosine", type=float, default=0.999)
    parser.add_argument("--images", help="folder of photographs for calibration and validation")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from onnxopt import data, graph, registry
    from onnxopt.manager import PassManager
    from onnxopt.runtime import measure_latency
    from onnxopt.validate import Budget

    lines = [
        f"Measured {datetime.date.today()}: `python bench/third_party.py --passes {args.passes} "
        f"--min-cosine {args.min_cosine}" + (" --images DIR`" if args.images else "`"),
        "",
        "| model | pass | changed | MACs ratio | params ratio | size ratio | latency ratio | worst cosine | rel L2 "
        "| s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rel in args.models.split(","):
        path = Path(args.shared) / "models" / f"{rel}.onnx"
        ref = path.with_name(path.name.replace(".onnx", ".ref.npz"))
        if not path.exists():
            continue
        calib, held_out = ref, None
        if args.images:
            calib, held_out = photo_data(ref, Path(args.images))
        for spec in args.passes.split(","):
            name, _, text = spec.partition(":")
            options = {k: _value(v) for k, v in (item.split("=") for item in text.split(";") if item)}
            print(f"{path.stem} {spec} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                report = PassManager(
                    [registry.make_pass(name, **options)], data=calib, eval_data=held_out,
                    budget=Budget(min_cosine=args.min_cosine),
                ).run(path)  # fmt: skip
            except Exception as e:
                seconds = time.perf_counter() - start
                why = " ".join(str(e).split())[:70]
                lines.append(f"| {path.stem} | {spec} | failed: {why} | | | | | | | {seconds:.1f} |")
                continue
            seconds = time.perf_counter() - start
            record = next(r for r in report.passes if r.name == name)
            out = Path(f"/tmp/onnxopt-bench-{path.stem}-{name}.onnx")
            size = None
            graph.save(report.model, out)
            size = out.stat().st_size / path.stat().st_size
            feeds = next(iter(data.as_source(ref, graph.load(path)))).feeds
            before, after = measure_latency([path, out], feeds, rounds=9)
            diff = min(report.validation.outputs.values(), key=lambda d: d.cosine)
            macs = report.after.macs / max(report.before.macs, 1)
            params = report.after.params / report.before.params
            lines.append(
                f"| {path.stem} | {spec} | {len(record.changes)} sites, {len(record.skipped)} skipped | "
                f"{macs:.3f} | {params:.3f} | {size:.3f} | "
                f"{after.median_us / before.median_us:.2f} | {diff.cosine:.5f} | {diff.rel_l2:.3g} | {seconds:.1f} |"
            )
    emit("\n".join(lines), args.out)
    return 0


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def photo_data(ref: Path, images: Path, seed: int = 0) -> tuple[dict, dict]:
    """(calibration, validation) feeds made of photographs matched to the reference input (module docstring)."""
    import numpy as np
    from PIL import Image

    arrays = {k.removeprefix("input__"): v for k, v in np.load(ref).items() if k.startswith("input__")}
    (name, x), *others = arrays.items()
    if others or x.ndim != 4:
        return {name: x}, {name: x}
    nchw = x.shape[1] in (1, 3)
    channels, h, w = (x.shape[1], *x.shape[2:]) if nchw else (x.shape[3], *x.shape[1:3])
    axes = (0, 2, 3) if nchw else (0, 1, 2)
    mean, std = x.mean(axis=axes), x.std(axis=axes) + 1e-6
    rng = np.random.default_rng(seed)
    photos = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    def make(files, count):
        out = []
        for i in range(count):
            image = Image.open(files[i % len(files)]).convert("L" if channels == 1 else "RGB")
            scale = rng.uniform(0.6, 1.0)
            cw, ch = int(image.width * scale), int(image.height * scale)
            left, top = rng.integers(0, image.width - cw + 1), rng.integers(0, image.height - ch + 1)
            crop = image.crop((left, top, left + cw, top + ch)).resize((w, h))
            a = np.asarray(crop, dtype=np.float32).reshape(h, w, channels) / 255.0
            if rng.random() < 0.5:
                a = a[:, ::-1]
            a = (a - a.mean(axis=(0, 1))) / (a.std(axis=(0, 1)) + 1e-6)
            out.append(a.transpose(2, 0, 1) if nchw else a)
        batch = np.stack(out)
        shape = (1, -1, 1, 1) if nchw else (1, 1, 1, -1)
        return (batch * std.reshape(shape) + mean.reshape(shape)).astype(np.float32)

    calib = make(photos[:8], 24)
    held_out = np.concatenate([x, make(photos[8:], 12)])
    return {name: calib}, {name: held_out}


if __name__ == "__main__":
    sys.exit(main())
