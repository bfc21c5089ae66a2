"""Train the thesis's convolutional MNIST autoencoder (two encoder and two decoder blocks) and convert it to ONNX.

    python models/mnist_autoencoder.py --data DIR [--out models/mnist_autoencoder] [--quick]
    python models/mnist_autoencoder.py --data DIR --slim L1 [--slim-activity L1] [--epochs N]   # network slimming

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
(first 1000 train images, NCHW) and ``eval.npz`` (first 2000 test images, NCHW), both with
``labels=np.array("input")``: the target is the input, which onnxopt's data loader resolves for task-MSE
validation (``--max-mse-increase``); and ``result.json`` (reconstruction MSE under onnxruntime on the 10k test
images and on eval.npz). ``--quick`` (CI smoke test): one epoch over the first 25,600 training images, 200 steps.

``--slim L1`` (``mnist_autoencoder_slim``, written to models/mnist_autoencoder_slim/): sparsity-inducing training
for the thesis's "regularized pruning", in the form of network slimming (Liu et al. 2017): an L1 penalty of weight
L1 on the BatchNormalization scales (gamma) of encoder 1, encoder 2 and decoder 1, plus (``--slim-activity``,
default ``SLIM_ACTIVITY``) an L1 penalty on those blocks' ReLU outputs, summed per sample. The gamma penalty makes
unneeded channels constant after BN; the activity penalty drives those constants below zero, so the channels die
behind the ReLU. Only dead channels can be removed exactly here: every consumer (a SAME-padded Conv, the
stride-2 ConvTranspose layers) spreads a constant input unevenly over the output (borders, overlapping taps), so
a non-zero constant cannot be folded into the next bias. ``SLIM_EPOCHS`` epochs by default; the network is
otherwise the same, and is rebuilt without the regularizers (same weights) for the conversion.
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
SLIM_NAME = "mnist_autoencoder_slim"
CHANNELS = (32, 64, 32)  # encoder 1, encoder 2, decoder 1; decoder 2 outputs the 1-channel image
BATCH = 128
EPOCHS = 5
SLIM_EPOCHS = 8
SLIM_ACTIVITY = 1e-6
N_CALIB = 1000
N_EVAL = 2000
DEFAULT_DATA = ROOT.parent.parent / "shared" / "data" / "mnist"


def build(thesis_output: bool = False, slim: float | None = None, slim_activity: float = 0.0, name: str = NAME):
    """The autoencoder; ``slim`` puts an L1 penalty of that weight on the pruned blocks' BatchNorm scales, and
    ``slim_activity`` one on their ReLU outputs (summed per sample)."""
    import keras
    from keras import layers

    def block(x, conv, channels: int, name: str, slim: float | None = None):
        x = conv(channels, 3, strides=2, padding="same", use_bias=True, name=f"{name}_conv")(x)
        regularizer = keras.regularizers.l1(slim) if slim else None
        x = layers.BatchNormalization(gamma_regularizer=regularizer, name=f"{name}_bn")(x)
        activity = keras.regularizers.l1(slim_activity) if slim and slim_activity else None
        return layers.ReLU(activity_regularizer=activity, name=f"{name}_relu")(x)

    inputs = keras.Input((28, 28, 1), name="input")
    x = block(inputs, layers.Conv2D, CHANNELS[0], "encoder1", slim)
    x = block(x, layers.Conv2D, CHANNELS[1], "encoder2", slim)
    x = block(x, layers.Conv2DTranspose, CHANNELS[2], "decoder1", slim)
    if thesis_output:
        x = block(x, layers.Conv2DTranspose, 1, "decoder2")
    else:
        x = layers.Conv2DTranspose(
            1, 3, strides=2, padding="same", use_bias=True, activation="sigmoid", name="decoder2_conv"
        )(x)
    outputs = layers.Permute((3, 1, 2), name="to_nchw")(x)
    model = keras.Model(inputs, outputs, name=name)
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory with the four MNIST IDX .gz files")
    parser.add_argument(
        "--out", type=Path, help=f"output directory (default models/{NAME}, with --slim models/{SLIM_NAME})"
    )
    parser.add_argument("--quick", action="store_true", help="CI smoke test: 1 epoch on 25,600 images (200 steps)")
    parser.add_argument(
        "--thesis-output", action="store_true", help="decoder 2 as a full block (BatchNorm + ReLU), as the thesis reads"
    )
    parser.add_argument(
        "--slim",
        type=float,
        metavar="L1",
        help=f"network slimming: L1 penalty of this weight on the BatchNorm scales of the pruned blocks ({SLIM_NAME})",
    )
    parser.add_argument(
        "--slim-activity",
        type=float,
        default=SLIM_ACTIVITY,
        metavar="L1",
        help=f"with --slim: L1 penalty on the pruned blocks' ReLU outputs (default {SLIM_ACTIVITY:g})",
    )
    parser.add_argument(
        "--epochs", type=int, help=f"training epochs (default {EPOCHS}, with --slim {SLIM_EPOCHS}; --quick: 1)"
    )
    args = parser.parse_args(argv)
    name = SLIM_NAME if args.slim else NAME

    train_x, _, test_x, _ = load_mnist(args.data)
    if train_x.shape[1:] != (28, 28) or len(train_x) < N_CALIB or len(test_x) < N_EVAL:
        fail(f"{args.data}: unexpected MNIST shapes {train_x.shape}, {test_x.shape}")
    seed_everything(0)
    model = build(args.thesis_output, args.slim, args.slim_activity, name)
    default_epochs = 1 if args.quick else SLIM_EPOCHS if args.slim else EPOCHS
    epochs = args.epochs or default_epochs
    fit_x = train_x[: 200 * BATCH] if args.quick else train_x
    start = time.perf_counter()
    history = model.fit(
        fit_x[..., None], fit_x[:, None], batch_size=BATCH, epochs=epochs, shuffle=True, verbose=2
    )  # target NCHW, like the model's output
    seconds = time.perf_counter() - start
    loss = float(history.history["loss"][-1])  # with --slim: MSE + the L1 penalty
    if not np.isfinite(loss):
        fail(f"training diverged (loss {loss})")

    out_dir: Path = args.out or ROOT / name
    if args.slim:  # the same network without the regularizers (an activity regularizer breaks the conversion)
        trained, model = model, build(args.thesis_output, name=name)
        model.set_weights(trained.get_weights())
    path, converted = convert_and_save(model, name, out_dir, nchw=True)
    input_name = onnx_input_name(path)
    test_nchw = test_x[:, None]
    # labels = the input's name: the reconstruction target is the input itself (onnxopt resolves it for task MSE)
    save_slices(out_dir, input_name, (train_x[:N_CALIB, None], input_name), (test_nchw[:N_EVAL], input_name))

    from onnxopt import graph

    onnx_model = graph.load(path)
    input_shape = [str(d) for d in graph.data_inputs(onnx_model)[0].shape]
    output_shape = [str(d) for d in onnx_model.graph.outputs[0].shape]
    keras_test = np.asarray(model.predict(test_x[..., None], batch_size=500, verbose=0))
    slimming = {}
    if args.slim:
        gammas = {b: np.abs(model.get_layer(f"{b}_bn").gamma.numpy()) for b in ("encoder1", "encoder2", "decoder1")}
        small = {b: int((g < 1e-2).sum()) for b, g in gammas.items()}
        slimming = {"slim_l1": args.slim, "slim_activity_l1": args.slim_activity, "slim_gammas_below_0.01": small}
    write_result(
        out_dir,
        name=name,
        architecture=(
            f"28x28x1 -> conv3/2 {CHANNELS[0]} -> conv3/2 {CHANNELS[1]} -> deconv3/2 {CHANNELS[2]} -> deconv3/2 1, "
            "each + bias, BatchNorm, ReLU"
            + (" (decoder 2 too)" if args.thesis_output else "; decoder 2: + bias, sigmoid (no BatchNorm, ReLU)")
            + "; output permuted to NCHW"
        ),
        params=int(model.count_params()),
        training=f"Adam lr 1e-3, MSE on pixel/255, batch {BATCH}, {epochs} epochs on {len(fit_x)} train images"
        + (
            f"; L1 {args.slim:g} on the BatchNorm gammas and {args.slim_activity:g} on the ReLU outputs (summed per"
            " sample) of encoder1, encoder2, decoder1"
            if args.slim
            else ""
        ),
        **slimming,
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
        calib=f"first {N_CALIB} train images, NCHW, labels='{input_name}' (target = input)",
        eval=f"first {N_EVAL} test images, NCHW, labels='{input_name}' (target = input)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
