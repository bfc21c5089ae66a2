"""Top-1 accuracy of the ../shared image classifiers on their image folders through onnxopt.images.

Checks that the preprocessing presets reproduce the figures in ../shared/models/README.md (MobileNetV2 79.69%
and EfficientNet-Lite0 82.38% on imagenet/val1300, ResNet-20 81.35% on cifar10/test2000), reading the folders
lazily with :func:`onnxopt.images.image_source` exactly as ``onnxopt run --data DIR --preprocess SPEC`` does.

    python bench/image_accuracy.py --shared ../shared --out bench/results/image_accuracy.md
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime as ort  # noqa: E402

from bench._report import emit  # noqa: E402
from onnxopt import graph, images  # noqa: E402

CIFAR = "none,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"
CASES = [
    # model, folder, --preprocess, the figure in ../shared/models/README.md
    ("imagenet/mobilenet_v2_torchvision.onnx", "imagenet/val1300", "imagenet", 79.69),
    ("imagenet/efficientnet_lite0.onnx", "imagenet/val1300", "tf", 82.38),
    ("cifar10/cifar10_resnet20_akamaster_bn.onnx", "cifar10/test2000", CIFAR, 81.35),
]


def top1(model_path: Path, folder: Path, spec: str, batch_size: int) -> tuple[int, int, float]:
    """(correct, images, seconds) of ``model_path`` on ``folder`` preprocessed by ``spec``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name
    source = images.image_source(folder, images.parse_preprocess(spec), graph.load(model_path), batch_size=batch_size)
    start = time.perf_counter()
    correct = total = 0
    for batch in source:
        logits = session.run([output], batch.feeds)[0]
        correct += int((logits.argmax(1) == batch.labels).sum())
        total += len(batch.labels)
    return correct, total, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared", help="the shared folder with models/ and data/")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    shared = Path(args.shared)
    rows = [
        "| model | images | --preprocess | top-1 % | README % | seconds |",
        "|---|---|---|---:|---:|---:|",
    ]
    for model, folder, spec, expected in CASES:
        correct, total, seconds = top1(shared / "models" / model, shared / "data" / folder, spec, args.batch_size)
        accuracy = 100 * correct / total
        rows.append(
            f"| {Path(model).stem} | {folder} ({total}) | `{spec}` | {accuracy:.2f} ({correct}/{total}) "
            f"| {expected:.2f} | {seconds:.1f} |"
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    emit(
        "# Image folders through onnxopt.images: top-1 on the shared sets\n\n"
        "`python bench/image_accuracy.py --shared ../shared` (batches of "
        f"{args.batch_size}, read lazily; onnxruntime 2 threads; peak RSS of the script {peak_mb:.0f} MB)\n\n"
        + "\n".join(rows),
        args.out,
    )


if __name__ == "__main__":
    main()
