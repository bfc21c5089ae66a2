"""The MNIST protocol the bench scripts share: models, data splits, accuracy.

The MNIST models were trained on all or most of the 60,000 training images, so no training image is a fair
place to check an accuracy budget. The splits, the same for every tool:

- calibration (statistics, quantization ranges, Wanda activations): the first 1,000 *training* images;
- budget split: the first 5,000 *test* images; every tool's strength is chosen (or checked) against the
  accuracy budget on these;
- held-out split: the other 5,000 test images (5,000-9,999), where results are reported; the full-test
  accuracy is printed beside it for reference only (half of it was used to choose).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
CALIB = slice(0, 1000)  # training images
BUDGET = slice(0, 5000)  # test images
HELDOUT = slice(5000, 10000)  # test images
PROTOCOL = (
    "calibration on training images 0-999; accuracy budget checked on test images 0-4,999; "
    "accuracy reported on the held-out test images 5,000-9,999 (full test set for reference)"
)


def _flat(x):
    return x.reshape(len(x), 784)


def _nchw(x):
    return x.reshape(len(x), 1, 28, 28)


def _normalized(x):
    return (_nchw(x) - 0.1307) / 0.3081


def _raw255(x):
    return _nchw(x) * 255.0


# name -> (path relative to its root, preprocessing of images in [0, 1], root: "models" or "shared")
MODELS = {
    "tiny_mlp": ("tiny_mlp/tiny_mlp.onnx", _flat, "models"),
    "mnist_mlp": ("mnist_mlp/mnist_mlp.onnx", _flat, "models"),
    "mnist_cnn": ("mnist_cnn/mnist_cnn.onnx", _nchw, "models"),
    "mobile_cnn": ("mobile_cnn/mobile_cnn.onnx", _nchw, "models"),
    "lenet5": ("models/mnist/mnist_lenet5_ccoltong.onnx", _normalized, "shared"),
    "lenet5_bn": ("models/mnist/mnist_lenet5_bn_ccoltong.onnx", _nchw, "shared"),
    "mlp6": ("models/mnist/mnist_mlp6_ccoltong.onnx", _normalized, "shared"),
    "mnist8": ("models/mnist/mnist8_cntk_cnn.onnx", _raw255, "shared"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One MNIST model and its data, split by the protocol."""

    name: str
    path: Path
    input_name: str
    batch: int | None  # the model's fixed batch size, None when dynamic
    calib: dict[str, np.ndarray]  # {input name: x, "labels": y}, what onnxopt's --data takes
    budget: tuple[np.ndarray, np.ndarray]
    heldout: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]

    @property
    def budget_data(self) -> dict[str, np.ndarray]:
        """The budget split in onnxopt's data form (``eval_data``)."""
        return {self.input_name: self.budget[0], "labels": self.budget[1]}

    def calib_batches(self, size: int = 100) -> list[dict[str, np.ndarray]]:
        """The calibration images as feed dicts of the model's batch (``size`` when dynamic)."""
        x = self.calib[self.input_name]
        step = self.batch or size
        return [{self.input_name: x[i : i + step]} for i in range(0, len(x) - len(x) % step, step)]


def load(mnist_dir: str | Path):
    """MNIST as ``load_mnist`` gives it: (train_x, train_y, test_x, test_y), images in [0, 1]."""
    sys.path.insert(0, str(ROOT / "models"))
    from _common import load_mnist

    return load_mnist(mnist_dir)


def cases(mnist, shared: str | Path, only: str | None = None):
    """Yield a :class:`Case` per model of MODELS that exists (``only``: comma-separated names)."""
    train_x, train_y, test_x, test_y = mnist
    for name, (rel, prep, root) in MODELS.items():
        if only and name not in only.split(","):
            continue
        path = (ROOT / "models" / rel) if root == "models" else Path(shared) / rel
        if not path.exists():
            print(f"{name}: {path} missing, skipped", file=sys.stderr)
            continue
        graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
        dim = graph_input.type.tensor_type.shape.dim[0]
        x = prep(test_x).astype(np.float32)
        yield Case(
            name=name,
            path=path,
            input_name=graph_input.name,
            batch=dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None,
            calib={graph_input.name: prep(train_x[CALIB]).astype(np.float32), "labels": train_y[CALIB]},
            budget=(x[BUDGET], test_y[BUDGET]),
            heldout=(x[HELDOUT], test_y[HELDOUT]),
            test=(x, test_y),
        )


def accuracy(path, x, y) -> float:
    """Top-1 accuracy (%) under onnxruntime with its full graph optimizations, as the model is deployed."""
    from onnxopt.runtime import Session

    session = Session(path, optimize=True)
    name = session.input_names[0]
    fixed = session.inner.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else 500
    usable = len(x) - len(x) % step if isinstance(fixed, int) else len(x)  # a fixed batch drops the remainder
    correct = 0
    for start in range(0, usable, step):
        out = session.run({name: x[start : start + step].astype(np.float32)})[session.output_names[0]]
        correct += int((out.reshape(len(out), -1).argmax(1) == y[start : start + step]).sum())
    return 100.0 * correct / usable


def macs(path) -> int:
    from onnxopt import cost, graph

    return cost.estimate(graph.load(path)).macs
