"""Train the thesis's Table 2.2 MNIST CNN with Keras and convert it to ONNX (NCHW input).

    python models/mnist_cnn.py --data ../shared/data/mnist [--out models/mnist_cnn] [--epochs 4] [--quick]

A functional Keras model: Input 28×28×1 → Conv 5×5, 32, SAME, ReLU → MaxPool 2×2 → Conv 5×5, 64, SAME,
ReLU → MaxPool 2×2 → Conv 7×7, 128, VALID, ReLU (a 1×1×128 feature map) → Flatten → Dense 10 (logits, no
softmax). Trained on the 60,000 MNIST training images (pixel/255, no other normalisation) with Adam
(learning rate 1e-3), batch 128, seed 0 and TensorFlow's deterministic ops. ``--quick`` trains one epoch on
the first 2,000 images (a CI smoke test) and still writes every artifact.

Writes into the out dir: ``mnist_cnn.onnx`` (converted by ``onnxopt.convert`` with ``nchw=True``, so the
input is float32 [N, 1, 28, 28] in [0, 1]; validated against Keras), ``calib.npz`` (the first 1,000 training
images + labels), ``eval.npz`` (the first 2,000 test images + labels), both NCHW and keyed by the ONNX input
name, and ``result.json`` (onnxruntime accuracy on the full 10,000-image test set and on the eval slice).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _common import finish_mnist_classifier, load_mnist, mnist_script_args, seed_everything

NAME = "mnist_cnn"
ARCHITECTURE = (
    "Conv5x5/32 SAME-ReLU-MaxPool2 -> Conv5x5/64 SAME-ReLU-MaxPool2 -> Conv7x7/128 VALID-ReLU -> Flatten -> Dense10"
)
EPOCHS = 4
BATCH = 128
LEARNING_RATE = 1e-3
QUICK_SAMPLES = 2000


def build():
    """The Table 2.2 classifier as a functional Keras model (logits out)."""
    import keras
    from keras import layers

    inp = keras.Input((28, 28, 1), name="image")
    x = layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1")(inp)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(128, 7, padding="valid", activation="relu", name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    out = layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name=NAME)


def main(argv: list[str] | None = None) -> int:
    args, command = mnist_script_args(NAME, EPOCHS, QUICK_SAMPLES, __doc__.splitlines()[0], argv)

    train_x, train_y, test_x, test_y = load_mnist(args.data)
    epochs = 1 if args.quick else args.epochs
    fit_x, fit_y = (train_x[:QUICK_SAMPLES], train_y[:QUICK_SAMPLES]) if args.quick else (train_x, train_y)

    import keras

    seed_everything(0)
    model = build()
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(fit_x[..., None], fit_y, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=2)
    train_seconds = time.perf_counter() - start

    finish_mnist_classifier(
        model, NAME, ARCHITECTURE, Path(args.out), (train_x, train_y, test_x, test_y),
        train_seconds=round(train_seconds, 1),
        epochs=epochs,
        command=command,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
