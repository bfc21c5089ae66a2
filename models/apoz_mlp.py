"""Train the deep fully connected networks of the APoZ node-pruning paper (MNIST, breast cancer) and export ONNX.

    python models/apoz_mlp.py --data /work/shared/data/mnist                  (both, into models/)
    python models/apoz_mlp.py --dataset breast_cancer
    python models/apoz_mlp.py --data /work/shared/data/mnist --quick --out /tmp/apoz_quick   (CI smoke test)

The paper (../shared/seeds/003_b41366218514f493.txt, "Proposed Method") uses five hidden ReLU layers, the
first with 550 neurons and the later ones with 375 each, trained "till the accuracy improving stopped", on
MNIST and on the Wisconsin breast-cancer data. Here that is a Keras Dense stack trained with Adam (batch
128) and early stopping on validation accuracy (patience 2, best weights restored), seed 0, op determinism:

    mnist_mlp          784 -> 550 -> 4 x 375 -> 10 logits. Input: flattened pixel/255 float32 [N, 784].
                       Trained on the first 55k MNIST training images, validated on the last 5k (max 15 epochs).
                       calib.npz: first 1000 training images; eval.npz: first 2000 test images.
    breast_cancer_mlp  30 -> 550 -> 4 x 375 -> 2 logits on sklearn's load_breast_cancer (569 x 30), stratified
                       80/20 split (random_state=0), validation = stratified 15% of the training part (max 50
                       epochs). Trained on standardized features (training split's mean/std); the
                       standardization is folded into the first Dense layer, so the ONNX model takes raw features.
                       calib.npz: the 455 training rows; eval.npz: the 114 test rows.

Each goes to ``<out>/<name>/`` (``<name>.onnx``, calib.npz, eval.npz, result.json) through models/_common.py.
``--quick`` trains MNIST on 3000 images for 1 epoch and the breast-cancer net for at most 5 epochs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from _common import (
    ROOT,
    convert_and_save,
    fail,
    load_mnist,
    onnx_accuracy,
    onnx_input_name,
    save_slices,
    seed_everything,
    write_result,
)

HIDDEN = [550, 375, 375, 375, 375]
BATCH = 128
PATIENCE = 2
SEED = 0


def build_mlp(n_in: int, n_out: int, name: str):
    """Input -> Dense 550 ReLU -> 4 x Dense 375 ReLU -> Dense ``n_out`` logits (functional: tf2onnx needs it)."""
    import keras

    inp = keras.Input((n_in,), name="input")
    x = inp
    for i, width in enumerate(HIDDEN, start=1):
        x = keras.layers.Dense(width, activation="relu", name=f"fc{i}")(x)
    out = keras.layers.Dense(n_out, name="logits")(x)
    return keras.Model(inp, out, name=name)


def train(model, x, y, validation, epochs: int) -> tuple[float, int, int]:
    """Adam + early stopping on val accuracy; returns (seconds, epochs run, best epoch)."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_accuracy", mode="max", patience=PATIENCE, restore_best_weights=True, verbose=1
    )
    start = time.perf_counter()
    history = model.fit(
        x, y, batch_size=BATCH, epochs=epochs, validation_data=validation, callbacks=[stop], shuffle=True, verbose=2
    )
    seconds = time.perf_counter() - start
    run = len(history.history["loss"])
    best = int(np.argmax(history.history["val_accuracy"])) + 1
    return seconds, run, best


def dense_counts(model) -> tuple[int, int]:
    """(all parameters, weights in Dense kernels = connections)."""
    connections = sum(int(np.prod(layer.kernel.shape)) for layer in model.layers if hasattr(layer, "kernel"))
    return int(model.count_params()), connections


def dir_size(out_dir: Path) -> int:
    return sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())


def keras_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    logits = model.predict(x, batch_size=1000, verbose=0)
    return 100.0 * float((logits.argmax(axis=1) == y).mean())


def run_mnist(args, out_root: Path, command: str) -> None:
    name = "mnist_mlp"
    train_x, train_y, test_x, test_y = load_mnist(args.data)
    train_x, test_x = train_x.reshape(len(train_x), -1), test_x.reshape(len(test_x), -1)
    fit_x, fit_y = train_x[:-5000], train_y[:-5000]
    val_x, val_y = train_x[-5000:], train_y[-5000:]
    epochs = 15
    if args.quick:
        fit_x, fit_y, epochs = fit_x[:3000], fit_y[:3000], 1

    seed_everything(SEED)
    model = build_mlp(784, 10, name)
    seconds, run, best = train(model, fit_x, fit_y, (val_x, val_y), epochs)
    keras_test = keras_accuracy(model, test_x, test_y)

    out_dir = out_root / name
    path, converted = convert_and_save(model, name, out_dir)
    input_name = onnx_input_name(path)
    save_slices(out_dir, input_name, (train_x[:1000], train_y[:1000]), (test_x[:2000], test_y[:2000]))
    acc_test = onnx_accuracy(path, test_x, test_y)
    acc_eval = onnx_accuracy(path, test_x[:2000], test_y[:2000])
    params, connections = dense_counts(model)
    write_result(
        out_dir,
        name=name,
        architecture="MLP 784-550-375-375-375-375-10 (Dense+ReLU x5, Dense logits), input pixel/255 [N,784]",
        params=params,
        connections=connections,
        accuracy_test=round(acc_test, 2),
        accuracy_eval_slice=round(acc_eval, 2),
        accuracy_test_keras=round(keras_test, 2),
        train_samples=len(fit_x),
        validation_samples=len(val_x),
        train_seconds=round(seconds, 1),
        epochs=run,
        best_epoch=best,
        max_epochs=epochs,
        conversion_max_error=float(f"{converted.max_error:.3g}"),
        command=command,
    )
    print(f"{out_dir}: {dir_size(out_dir) / 1e6:.2f} MB", flush=True)
    if not args.quick and acc_test < 98.0:
        fail(f"{name}: test accuracy {acc_test:.2f}% below the 98.0% target")


def fold_standardization(trained, mean: np.ndarray, std: np.ndarray, name: str):
    """A copy of ``trained`` that takes raw features: fc1(x) = fc1((x - mean) / std) with W/std, b - (mean/std) W."""
    model = build_mlp(len(mean), trained.output_shape[-1], name)
    weights = [w.copy() for w in trained.get_weights()]
    kernel, bias = weights[0].astype(np.float64), weights[1].astype(np.float64)
    weights[0] = (kernel / std[:, None]).astype(np.float32)
    weights[1] = (bias - (mean / std) @ kernel).astype(np.float32)
    model.set_weights(weights)
    return model


def run_breast_cancer(args, out_root: Path, command: str) -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    name = "breast_cancer_mlp"
    data = load_breast_cancer()
    x, y = data.data.astype(np.float64), data.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.15, stratify=train_y, random_state=0)
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def standardize(a: np.ndarray) -> np.ndarray:
        return ((a - mean) / std).astype(np.float32)

    epochs = 5 if args.quick else 50
    seed_everything(SEED)
    trained = build_mlp(x.shape[1], 2, name)
    seconds, run, best = train(trained, standardize(fit_x), fit_y, (standardize(val_x), val_y), epochs)
    keras_test = keras_accuracy(trained, standardize(test_x), test_y)

    model = fold_standardization(trained, mean, std, name)
    raw_test = test_x.astype(np.float32)
    folded = trained.predict(standardize(test_x), verbose=0)
    diff = float(np.abs(model.predict(raw_test, verbose=0) - folded).max() / max(1.0, np.abs(folded).max()))
    if diff > 1e-4:
        fail(f"{name}: folded standardization differs from the trained model by {diff:.2e}")

    out_dir = out_root / name
    path, converted = convert_and_save(model, name, out_dir)
    input_name = onnx_input_name(path)
    save_slices(out_dir, input_name, (train_x, train_y), (test_x, test_y))
    acc_test = onnx_accuracy(path, raw_test, test_y)
    evaluation = np.load(out_dir / "eval.npz")
    acc_eval = onnx_accuracy(path, evaluation[input_name], evaluation["labels"])
    params, connections = dense_counts(model)
    write_result(
        out_dir,
        name=name,
        architecture=(
            "MLP 30-550-375-375-375-375-2 (Dense+ReLU x5, Dense logits), input raw features [N,30] "
            "(training-split standardization folded into fc1)"
        ),
        params=params,
        connections=connections,
        accuracy_test=round(acc_test, 2),
        accuracy_eval_slice=round(acc_eval, 2),
        accuracy_test_keras=round(keras_test, 2),
        train_samples=len(fit_x),
        validation_samples=len(val_x),
        test_samples=len(test_x),
        fold_max_error=float(f"{diff:.3g}"),
        train_seconds=round(seconds, 1),
        epochs=run,
        best_epoch=best,
        max_epochs=epochs,
        conversion_max_error=float(f"{converted.max_error:.3g}"),
        command=command,
    )
    print(f"{out_dir}: {dir_size(out_dir) / 1e6:.2f} MB", flush=True)
    if not args.quick and acc_test < 95.0:
        fail(f"{name}: test accuracy {acc_test:.2f}% below the 95% target")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["mnist", "breast_cancer", "both"], default="both")
    parser.add_argument("--data", help="dir with the four MNIST IDX .gz files (needed for mnist)")
    parser.add_argument("--out", default=str(ROOT), help="parent dir of mnist_mlp/ and breast_cancer_mlp/ (models/)")
    parser.add_argument("--quick", action="store_true", help="smoke test: MNIST 3000 images x 1 epoch, cancer 5 epochs")
    args = parser.parse_args(argv)
    if args.dataset in ("mnist", "both") and not args.data:
        fail("--data DIR (the MNIST IDX files) is needed for the mnist model")
    command = shlex.join(["python", "models/apoz_mlp.py", *(sys.argv[1:] if argv is None else argv)])
    out_root = Path(args.out)
    if args.dataset in ("mnist", "both"):
        run_mnist(args, out_root, command)
    if args.dataset in ("breast_cancer", "both"):
        run_breast_cancer(args, out_root, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
