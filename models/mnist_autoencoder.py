"""Train the thesis's convolutional MNIST autoencoder (two encoder and two decoder blocks) and convert it to ONNX.

    python models/mnist_autoencoder.py --data DIR [--out models/mnist_autoencoder] [--quick]

Section 3.1.2 of the thesis (2.2.3 in the newer draft): two encoder blocks, each a convolution with kernel 3,
stride 2 and SAME padding, plus bias, batch normalization and ReLU; then two decoder blocks, each a deconvolution
(``Conv2DTranspose``) with kernel 3 and stride 2, plus bias, batch normalization and ReLU. Encoder 1, encoder 2
and decoder 1 output [32, 64, 32] channels; decoder 2 outputs the 28×28×1 image (Table 3.1). Shapes:
28×28×1 → 14×14×32 → 7×7×64 → 14×14×32 → 28×28×1. The deconvolutions use SAME padding too (the thesis names it
only for the convolutions; it is what doubles 7 → 14 → 28).

Deviation: decoder 2, the output layer, is the deconvolution plus bias with a sigmoid, without the block's
BatchNormalization and ReLU. Read literally, the thesis gives decoder 2 the full block (BN + ReLU on the single
output channel; ``--thesis-output`` builds that): it trains to a plateau at MSE 0.0142 from the third epoch on
(0.0144 on the test set after 8 epochs) because output pixels stuck at 0 behind the ReLU get no gradient, while
the sigmoid output reaches 6e-4 after 2 epochs (same seed, same schedule). Blocks encoder 1, encoder 2 and
decoder 1, the ones the thesis prunes, are exactly as described.

Not in the thesis, chosen here: MSE loss on pixel/255 images, Adam (Keras defaults, lr 1e-3), batch 128,
``EPOCHS`` = 5 epochs over the 60k training images (about 2-3 minutes on 2 CPU cores), Keras default
initializers, seed 0. The functional model ends in a ``Permute((3, 1, 2))`` so that its output is NCHW
[N, 1, 28, 28]: converted with ``nchw=True`` (input NCHW), the graph has no Transpose at all (tf2onnx turns the
1-channel layout transposes into identity Reshapes to [-1, 1, 28, 28] at the input and the output), and input and
output are both NCHW. The Keras model's output is [N, 1, 28, 28] too; its input stays NHWC [N, 28, 28, 1].

Writes to the out dir: ``mnist_autoencoder.onnx`` (input ``input`` [N,1,28,28], pixel/255), ``calib.npz``
(first 1000 train images, NCHW, no labels), ``eval.npz`` (first 2000 test images, NCHW, no labels; the target
is the input) and ``result.json`` (reconstruction MSE under onnxruntime on the 10k test images and on eval.npz).
``--quick`` (CI smoke test): one epoch over the first 25,600 training images, 200 steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    ROOT,
    convert_and_save,
    fail,
    load_mnist,
    onnx_input_name,
    onnx_mse,
    save_slices,
    seed_everything,
    write_result,
)

NAME = "mnist_autoencoder"
CHANNELS = (32, 64, 32)  # encoder 1, encoder 2, decoder 1; decoder 2 outputs the 1-channel image
BATCH = 128
EPOCHS = 5
N_CALIB = 1000
N_EVAL = 2000
DEFAULT_DATA = ROOT.parent.parent / "shared" / "data" / "mnist"


def build(thesis_output: bool = False):
    import keras
    from keras import layers

    def block(x, conv, channels: int, name: str):
        x = conv(channels, 3, strides=2, padding="same", use_bias=True, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inputs = keras.Input((28, 28, 1), name="input")
    x = block(inputs, layers.Conv2D, CHANNELS[0], "encoder1")
    x = block(x, layers.Conv2D, CHANNELS[1], "encoder2")
    x = block(x, layers.Conv2DTranspose, CHANNELS[2], "decoder1")
    if thesis_output:
        x = block(x, layers.Conv2DTranspose, 1, "decoder2")
    else:
        x = layers.Conv2DTranspose(
            1, 3, strides=2, padding="same", use_bias=True, activation="sigmoid", name="decoder2_conv"
        )(x)
    outputs = layers.Permute((3, 1, 2), name="to_nchw")(x)
    model = keras.Model(inputs, outputs, name=NAME)
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory with the four MNIST IDX .gz files")
    parser.add_argument("--out", type=Path, default=ROOT / NAME, help=f"output directory (default models/{NAME})")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: 1 epoch on 25,600 images (200 steps)")
    parser.add_argument(
        "--thesis-output", action="store_true", help="decoder 2 as a full block (BatchNorm + ReLU), as the thesis reads"
    )
    args = parser.parse_args(argv)

    train_x, _, test_x, _ = load_mnist(args.data)
    if train_x.shape[1:] != (28, 28) or len(train_x) < N_CALIB or len(test_x) < N_EVAL:
        fail(f"{args.data}: unexpected MNIST shapes {train_x.shape}, {test_x.shape}")
    seed_everything(0)
    model = build(args.thesis_output)
    fit_x, epochs = (train_x[: 200 * BATCH], 1) if args.quick else (train_x, EPOCHS)
    start = time.perf_counter()
    history = model.fit(
        fit_x[..., None], fit_x[:, None], batch_size=BATCH, epochs=epochs, shuffle=True, verbose=2
    )  # target NCHW, like the model's output
    seconds = time.perf_counter() - start
    loss = float(history.history["loss"][-1])
    if not np.isfinite(loss):
        fail(f"training diverged (loss {loss})")

    out_dir: Path = args.out
    path, converted = convert_and_save(model, NAME, out_dir, nchw=True)
    input_name = onnx_input_name(path)
    test_nchw = test_x[:, None]
    save_slices(out_dir, input_name, (train_x[:N_CALIB, None], None), (test_nchw[:N_EVAL], None))

    from onnxopt import graph

    onnx_model = graph.load(path)
    input_shape = [str(d) for d in graph.data_inputs(onnx_model)[0].shape]
    output_shape = [str(d) for d in onnx_model.graph.outputs[0].shape]
    keras_test = np.asarray(model.predict(test_x[..., None], batch_size=500, verbose=0))
    write_result(
        out_dir,
        name=NAME,
        architecture=(
            f"28x28x1 -> conv3/2 {CHANNELS[0]} -> conv3/2 {CHANNELS[1]} -> deconv3/2 {CHANNELS[2]} -> deconv3/2 1, "
            "each + bias, BatchNorm, ReLU"
            + (" (decoder 2 too)" if args.thesis_output else "; decoder 2: + bias, sigmoid (no BatchNorm, ReLU)")
            + "; output permuted to NCHW"
        ),
        params=int(model.count_params()),
        training=f"Adam lr 1e-3, MSE on pixel/255, batch {BATCH}, {epochs} epochs on {len(fit_x)} train images",
        quick=args.quick,
        train_seconds=round(seconds, 1),
        final_train_loss=loss,
        test_mse_onnx=onnx_mse(path, test_nchw, test_nchw),
        eval_mse_onnx=onnx_mse(path, test_nchw[:N_EVAL], test_nchw[:N_EVAL]),
        test_mse_keras=float(np.mean(np.square(keras_test - test_nchw))),
        input_name=input_name,
        input_shape=input_shape,
        output_shape=output_shape,
        conversion_max_error=converted.max_error,
        onnx_bytes=path.stat().st_size,
        calib=f"first {N_CALIB} train images, NCHW, no labels",
        eval=f"first {N_EVAL} test images, NCHW, no labels (target = input)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
