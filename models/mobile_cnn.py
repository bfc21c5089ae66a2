"""Train a small MobileNetV2-style MNIST classifier with Keras and convert it to ONNX (NCHW input).

    python models/mobile_cnn.py --data ../shared/data/mnist [--out models/mobile_cnn] [--epochs 8] [--quick]

A functional Keras model built to exercise coupled channels (residual Add, depthwise convs, Concat,
BatchNormalization), on a 28×28×1 input:

- stem: Conv 3×3 stride 2, 16 ch + BN + ReLU (14×14);
- inverted residual: 1×1 expand 16→48 + BN + ReLU, depthwise 3×3 + BN + ReLU, 1×1 project 48→16 + BN,
  Add with the block input;
- inverted residual with stride 2, no shortcut: 1×1 expand 16→96 + BN + ReLU, depthwise 3×3 stride 2 +
  BN + ReLU, 1×1 project 96→32 + BN (7×7);
- two parallel branches concatenated along channels (32 + 32 = 64): a 1×1 conv 32→32 + BN + ReLU, and a
  depthwise 3×3 + BN + ReLU followed by a 1×1 conv 32→32 + BN + ReLU;
- global average pooling → Dense 10 (logits, no softmax).

Convolutions before a BatchNorm have no bias; BatchNorm momentum is 0.9. Trained on the 60,000 MNIST
training images (pixel/255) with Adam (learning rate 2e-3, cosine-decayed), batch 128, seed 0 and
TensorFlow's deterministic ops.
``--quick`` trains one epoch on the first 2,000 images (a CI smoke test) and still writes every artifact.

Writes into the out dir: ``mobile_cnn.onnx`` (converted by ``onnxopt.convert`` with ``nchw=True``, so the
input is float32 [N, 1, 28, 28] in [0, 1]; validated against Keras), ``calib.npz`` (the first 1,000 training
images + labels), ``eval.npz`` (the first 2,000 test images + labels), both NCHW and keyed by the ONNX input
name, and ``result.json`` (onnxruntime accuracy on the full 10,000-image test set and on the eval slice).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _common import finish_mnist_classifier, load_mnist, mnist_script_args, seed_everything

NAME = "mobile_cnn"
ARCHITECTURE = (
    "Conv3x3/16 s2-BN-ReLU -> IR block 16-48-16 (1x1-BN-ReLU, DW3x3-BN-ReLU, 1x1-BN) + Add -> "
    "IR block s2 16-96-32 (no shortcut) -> Concat[1x1/32-BN-ReLU, DW3x3-BN-ReLU-1x1/32-BN-ReLU] (64) -> "
    "GlobalAvgPool -> Dense10"
)
EPOCHS = 8
BATCH = 128
LEARNING_RATE = 2e-3
QUICK_SAMPLES = 2000
BN_MOMENTUM = 0.9  # Keras's 0.99 leaves the moving statistics near their initial values in --quick


def build():
    """The MobileNetV2-style classifier as a functional Keras model (logits out)."""
    import keras
    from keras import layers

    def conv_bn(x, filters: int, kernel: int, stride: int, relu: bool, name: str):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    def dw_bn(x, stride: int, name: str):
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inp = keras.Input((28, 28, 1), name="image")
    x = conv_bn(inp, 16, 3, 2, True, "stem")
    # inverted residual, 16 -> 48 -> 16, with the shortcut
    y = conv_bn(x, 48, 1, 1, True, "block1_expand")
    y = dw_bn(y, 1, "block1_dw")
    y = conv_bn(y, 16, 1, 1, False, "block1_project")
    x = layers.Add(name="block1_add")([x, y])
    # inverted residual with stride 2, 16 -> 96 -> 32, no shortcut
    x = conv_bn(x, 96, 1, 1, True, "block2_expand")
    x = dw_bn(x, 2, "block2_dw")
    x = conv_bn(x, 32, 1, 1, False, "block2_project")
    # two parallel branches concatenated along channels
    a = conv_bn(x, 32, 1, 1, True, "branch_a")
    b = dw_bn(x, 1, "branch_b_dw")
    b = conv_bn(b, 32, 1, 1, True, "branch_b")
    x = layers.Concatenate(axis=-1, name="concat")([a, b])
    x = layers.GlobalAveragePooling2D(name="gap")(x)
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
    steps = epochs * -(-len(fit_x) // BATCH)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps)),
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
