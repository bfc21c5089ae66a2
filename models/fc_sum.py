"""Train the thesis's fully connected "sum" network (2 → 1000 ReLU → 1, y = i₁ + i₂) in three variants.

    python models/fc_sum.py [--out models/fc_sum] [--quick]

Section 3.1.1 of the thesis (2.2.2 in the newer draft): two inputs i = (i₁, i₂), one fully connected hidden layer
of n = 1000 ReLU nodes, one linear output, target y = i₁ + i₂; mean squared error, "Momentum Optimizer" (here
``keras.optimizers.SGD``) with learning rate 0.01 and momentum 0.3, 1,000,000 samples, batch 1000, 10 epochs.
The thesis does not say how the inputs are drawn; its optimum (one hidden node, unit weights, zero biases) is
exact only for non-negative inputs, so they are uniform in [0, 1) here (numpy ``default_rng(0)``). Weights start
from Keras's defaults (Glorot-uniform kernels, zero biases), the same initial weights for all three variants.

Variants, written to ``<out>/fc_sum_<variant>.onnx`` (input ``input`` [N,2], output [N,1], MatMul/Add/Relu):

``vanilla``
    10 epochs of plain training, as in the thesis's set-up. Unlike the thesis ("the loss didn't converge to 0",
    about 950 of 1000 nodes pruned), it converges here (eval MSE 4e-6) and only 294 nodes are dead, 287 of them
    from initialization (both Glorot kernel weights ≤ 0 with a zero bias is never positive on [0, 1)²).
``distorted``
    "Distorted pruning": the 10 epochs run as 5 training cycles of 2 epochs, and between two cycles every
    weight tensor W (both kernels and both biases) is perturbed by ``W += U(-1, 1)·max(0, 1 − var(W))``. The
    thesis gives ``rand(weights.shape) * (1 - var(weights))`` and calls its random values "between -1 and 1",
    so the noise is uniform in [-1, 1) and var(W) is the variance over the elements of that tensor, applied at
    full (literal) amplitude. Interpretation: the factor is clipped at 0, because after the first distortion
    the hidden kernel and bias spread out (var > 1; biases down to about −38) and an unclipped 1 − var(W) would
    turn into noise of amplitude var(W) − 1 ≫ 1; so in practice the first distortion perturbs everything and the
    later ones only the output bias (a scalar, var 0). In the thesis the distortion runs between pruning cycles
    of a shrinking layer; here nothing is pruned (that is onnxopt's job on the exported model), the layer keeps
    its 1000 nodes, and the distortion kills most of them (about 940 never positive afterwards).
``l1``
    "Regularized distorted pruning" (the thesis's L1 variant builds on the distorted one): the distorted
    schedule plus an L1 penalty ``L1_WEIGHT`` = 1e-3 · Σ|w| on the kernels and biases of both layers, added to
    the loss; the thesis adds "an l1 regularizer to our loss" to push the large biases and the output weights
    w₂ towards 0, names no strength, and finds that "it doesn't really make any difference" with momentum SGD.
    Weight (not activity) regularization, since the thesis aims it at the biases and w₂. At lr 0.01 the penalty
    moves a weight by at most 1e-5 a step, so the dead nodes' large weights barely shrink: the reported
    training loss is dominated by the penalty (about 10), the data MSE is about 1e-4.

Each variant trains the thesis's full 10 × 1000 steps, about 1 to 1.5 minutes of CPU (2 cores). ``calib.npz`` holds
the first 2000 training inputs and ``eval.npz`` 2000 fresh inputs, with their targets i₁ + i₂ as ``labels``, shared
by the three variants. ``result.json`` has, per variant, the test MSE under onnxruntime, the number of hidden
neurons never positive on the calib inputs (dead, from the Keras hidden activations) and the training time.
``--quick`` (CI smoke test) trains on 100,000 samples for 2 epochs (2 cycles of 1 epoch): 200 steps a variant;
the distorted variants have not recovered from the distortion by then (eval MSE about 0.45).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, convert_and_save, fail, onnx_input_name, onnx_mse, save_slices, seed_everything, write_result

NAME = "fc_sum"
VARIANTS = ("vanilla", "distorted", "l1")
HIDDEN = 1000
LEARNING_RATE = 0.01
MOMENTUM = 0.3
BATCH = 1000
SAMPLES = 1_000_000
EPOCHS = 10
CYCLES = 5  # distorted / l1: EPOCHS split into CYCLES training cycles, distortion between two cycles
DISTORT_SCALE = 1.0  # amplitude of the distortion U(-1, 1)·max(0, 1 − var(W)); 1 is the thesis's formula
L1_WEIGHT = 1e-3
N_CALIB = 2000
N_EVAL = 2000


def make_data(samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training inputs, their targets i₁ + i₂, and fresh evaluation inputs, all uniform in [0, 1)."""
    rng = np.random.default_rng(0)
    x = rng.random((samples, 2), dtype=np.float32)
    y = x.sum(axis=1, keepdims=True)
    x_eval = rng.random((N_EVAL, 2), dtype=np.float32)
    return x, y, x_eval


def build(l1: float):
    import keras

    reg = keras.regularizers.L1(l1) if l1 else None
    inputs = keras.Input((2,), name="input")
    hidden = keras.layers.Dense(HIDDEN, activation="relu", kernel_regularizer=reg, bias_regularizer=reg, name="hidden")(
        inputs
    )
    output = keras.layers.Dense(1, kernel_regularizer=reg, bias_regularizer=reg, name="output")(hidden)
    model = keras.Model(inputs, output, name=NAME)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE, momentum=MOMENTUM), loss="mse")
    return model


def distort(model, rng: np.random.Generator, scale: float) -> list[float]:
    """W += U(-1, 1)·max(0, 1 − var(W))·scale on every weight tensor; returns the factors used."""
    factors = []
    for variable in model.trainable_variables:
        w = np.asarray(variable.numpy())
        factor = max(0.0, 1.0 - float(w.var())) * scale
        variable.assign(w + rng.uniform(-1.0, 1.0, w.shape).astype(np.float32) * np.float32(factor))
        factors.append(factor)
    return factors


def train(variant: str, x: np.ndarray, y: np.ndarray, epochs: int, cycles: int):
    """A freshly seeded model trained as ``variant``; returns it, the training time and the last loss."""
    seed_everything(0)
    model = build(L1_WEIGHT if variant == "l1" else 0.0)
    rng = np.random.default_rng(1)
    per_cycle = [epochs // cycles + (1 if i < epochs % cycles else 0) for i in range(cycles)]
    if variant == "vanilla":
        per_cycle = [epochs]
    start = time.perf_counter()
    loss = float("nan")
    for cycle, cycle_epochs in enumerate(per_cycle):
        if cycle:
            factors = distort(model, rng, DISTORT_SCALE)
            print(f"  {variant}: distortion before cycle {cycle + 1}, factors {', '.join(f'{f:.3f}' for f in factors)}")
        history = model.fit(x, y, batch_size=BATCH, epochs=cycle_epochs, shuffle=True, verbose=0)
        loss = float(history.history["loss"][-1])
        print(f"  {variant}: cycle {cycle + 1}/{len(per_cycle)} ({cycle_epochs} epochs) loss {loss:.3g}", flush=True)
        if not np.isfinite(loss):
            fail(f"{variant}: training diverged (loss {loss}) in cycle {cycle + 1}")
    return model, time.perf_counter() - start, loss


def dead_neurons(model, x: np.ndarray) -> int:
    """Hidden neurons whose ReLU output is never positive on ``x``."""
    import keras

    hidden = keras.Model(model.inputs, model.get_layer("hidden").output)
    activations = np.asarray(hidden.predict(x, batch_size=N_CALIB, verbose=0))
    return int((~(activations > 0).any(axis=0)).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / NAME, help="output directory (default models/fc_sum)")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: 100k samples, 2 epochs a variant")
    args = parser.parse_args(argv)

    samples, epochs, cycles = (100_000, 2, 2) if args.quick else (SAMPLES, EPOCHS, CYCLES)
    x, y, x_eval = make_data(samples)
    x_calib = x[:N_CALIB]
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    figures: dict[str, object] = {
        "name": NAME,
        "architecture": f"2 -> {HIDDEN} ReLU -> 1, y = i1 + i2",
        "inputs": "uniform [0, 1), numpy default_rng(0)",
        "training": (
            f"SGD lr {LEARNING_RATE} momentum {MOMENTUM}, MSE, batch {BATCH}, {samples} samples, {epochs} epochs"
        ),
        "distortion": f"W += U(-1,1)*max(0, 1-var(W))*{DISTORT_SCALE} on all weight tensors between {cycles} cycles",
        "l1_regularization": f"L1 {L1_WEIGHT} on kernels and biases of both layers, plus the distortion",
        "quick": args.quick,
        "calib": f"first {N_CALIB} training inputs",
        "eval": f"{N_EVAL} fresh inputs, target i1 + i2",
    }
    input_name = None
    for variant in VARIANTS:
        model, seconds, loss = train(variant, x, y, epochs, cycles)
        path, converted = convert_and_save(model, f"{NAME}_{variant}", out_dir)
        name = onnx_input_name(path)
        if input_name is None:
            input_name = name
        elif name != input_name:
            fail(f"{path.name}: input {name!r} differs from {input_name!r}")
        keras_eval = np.asarray(model.predict(x_eval, batch_size=N_EVAL, verbose=0))
        figures[variant] = {
            "onnx": path.name,
            "params": int(model.count_params()),
            "train_seconds": round(seconds, 1),
            "final_train_loss": loss,
            "eval_mse_onnx": onnx_mse(path, x_eval, x_eval.sum(axis=1)),
            "eval_mse_keras": float(np.mean(np.square(keras_eval[:, 0] - x_eval.sum(axis=1)))),
            "dead_neurons_calib": dead_neurons(model, x_calib),
            "conversion_max_error": converted.max_error,
            "onnx_bytes": path.stat().st_size,
        }
    save_slices(
        out_dir, input_name, (x_calib, x_calib.sum(axis=1, keepdims=True)), (x_eval, x_eval.sum(axis=1, keepdims=True))
    )
    figures["input_name"] = input_name
    write_result(out_dir, **figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
