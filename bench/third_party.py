"""onnxopt's passes on the third-party models in ../shared/models (no labels: an output-similarity budget).

    python bench/third_party.py [--shared ../shared] [--passes split,svd] [--min-cosine 0.999] [--out FILE]

Each model is calibrated and validated on the one reference input of its ``.ref.npz`` (a real image or
digit; 1-10 samples), under ``--min-cosine`` for every output. Printed per model and pass: what changed,
MACs and parameter ratios, onnxruntime latency ratio (1 thread, interleaved medians) and the validation
figures. Few samples make the budget a weak judge for detectors: read the cosine column with that in mind.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
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
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from onnxopt import data, graph
    from onnxopt.manager import PassManager
    from onnxopt.runtime import measure_latency
    from onnxopt.validate import Budget

    lines = [
        f"Measured {datetime.date.today()}: `python bench/third_party.py --passes {args.passes} "
        f"--min-cosine {args.min_cosine}`",
        "",
        "| model | pass | changed | MACs ratio | params ratio | latency ratio | worst cosine | rel L2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rel in args.models.split(","):
        path = Path(args.shared) / "models" / f"{rel}.onnx"
        ref = path.with_name(path.name.replace(".onnx", ".ref.npz"))
        if not path.exists():
            continue
        for name in args.passes.split(","):
            print(f"{path.stem} {name} ...", file=sys.stderr, flush=True)
            try:
                report = PassManager([name], data=ref, budget=Budget(min_cosine=args.min_cosine)).run(path)
            except Exception as e:
                lines.append(f"| {path.stem} | {name} | failed: {' '.join(str(e).split())[:70]} | | | | | |")
                continue
            record = next(r for r in report.passes if r.name == name)
            out = Path(f"/tmp/onnxopt-bench-{path.stem}-{name}.onnx")
            graph.save(report.model, out)
            feeds = next(iter(data.as_source(ref, graph.load(path)))).feeds
            before, after = measure_latency([path, out], feeds, rounds=9)
            diff = min(report.validation.outputs.values(), key=lambda d: d.cosine)
            macs = report.after.macs / max(report.before.macs, 1)
            params = report.after.params / report.before.params
            lines.append(
                f"| {path.stem} | {name} | {len(record.changes)} sites, {len(record.skipped)} skipped | "
                f"{macs:.3f} | {params:.3f} | "
                f"{after.median_us / before.median_us:.2f} | {diff.cosine:.5f} | {diff.rel_l2:.3g} |"
            )
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
