"""Train a small MNIST MLP with plain numpy and export it as ONNX.

Usage:
    python models/tiny_mlp.py --data DIR [--out models/tiny_mlp]

DIR must hold the four original MNIST IDX gz files. The script is deterministic
(fixed seed, float32 math) and offline. It writes into the out dir:

    tiny_mlp.onnx  784 -> 256 -> 128 -> 10 MLP (Gemm/Relu), input "input" [N,784], output "logits" [N,10]
    calib.npz       "input": first 1000 train images (float32 [1000,784], pixel/255), "labels": int64
    eval.npz        "input": first 2000 test images (float32 [2000,784], pixel/255), "labels": int64
    README.md       provenance, accuracy, sizes
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
SIZES = [784, 256, 128, 10]
EPOCHS = 10
BATCH = 128
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
OPSET = 17
IR_VERSION = 10  # onnx's default IR version may be newer than onnxruntime accepts


def load_images(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        buf = f.read()
    magic, n, rows, cols = np.frombuffer(buf, dtype=">u4", count=4)
    if magic != 2051:
        raise ValueError(f"{path}: bad IDX image magic {magic}")
    x = np.frombuffer(buf, dtype=np.uint8, offset=16).reshape(int(n), int(rows) * int(cols))
    return x.astype(np.float32) / np.float32(255.0)


def load_labels(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        buf = f.read()
    magic, n = np.frombuffer(buf, dtype=">u4", count=2)
    if magic != 2049:
        raise ValueError(f"{path}: bad IDX label magic {magic}")
    y = np.frombuffer(buf, dtype=np.uint8, offset=8)
    if y.shape[0] != n:
        raise ValueError(f"{path}: expected {n} labels, got {y.shape[0]}")
    return y.astype(np.int64)


def init_params(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """He-normal init; weights stored as (out, in) to match Gemm transB=1."""
    params = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:], strict=True):
        w = (rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = np.zeros(fan_out, dtype=np.float32)
        params.append((w, b))
    return params


def forward(params, x: np.ndarray) -> np.ndarray:
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w.T + b
        if i < len(params) - 1:
            h = np.maximum(h, 0)
    return h


def predict(params, x: np.ndarray, chunk: int = 2000) -> np.ndarray:
    return np.concatenate([forward(params, x[i : i + chunk]).argmax(1) for i in range(0, len(x), chunk)])


def train(params, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> float:
    n = x.shape[0]
    steps_per_epoch = (n + BATCH - 1) // BATCH
    total_steps = EPOCHS * steps_per_epoch
    vel = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    step = 0
    for epoch in range(EPOCHS):
        perm = rng.permutation(n)
        loss_sum = np.float64(0.0)
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH : (s + 1) * BATCH]
            xb, yb = x[idx], y[idx]
            m = xb.shape[0]
            # forward, keeping activations
            acts = [xb]
            h = xb
            for i, (w, b) in enumerate(params):
                h = h @ w.T + b
                if i < len(params) - 1:
                    h = np.maximum(h, 0)
                acts.append(h)
            logits = acts[-1]
            z = logits - logits.max(1, keepdims=True)
            ez = np.exp(z)
            sum_ez = ez.sum(1, keepdims=True)
            probs = ez / sum_ez
            loss_sum += float(-(z[np.arange(m), yb] - np.log(sum_ez[:, 0])).mean())
            # backward
            g = probs
            g[np.arange(m), yb] -= 1.0
            g /= np.float32(m)
            grads = [None] * len(params)
            for i in range(len(params) - 1, -1, -1):
                w, _ = params[i]
                gw = g.T @ acts[i]
                gb = g.sum(0)
                if i > 0:
                    g = (g @ w) * (acts[i] > 0)
                grads[i] = (gw, gb)
            # SGD with momentum, cosine-decayed learning rate, L2 on weights
            lr = np.float32(LR * 0.5 * (1.0 + np.cos(np.pi * step / total_steps)))
            for (w, b), (gw, gb), (vw, vb) in zip(params, grads, vel, strict=True):
                gw = gw + np.float32(WEIGHT_DECAY) * w
                vw *= np.float32(MOMENTUM)
                vw += gw
                vb *= np.float32(MOMENTUM)
                vb += gb
                w -= lr * vw
                b -= lr * vb
            step += 1
        print(f"epoch {epoch + 1:2d}/{EPOCHS}  loss {loss_sum / steps_per_epoch:.4f}", flush=True)
    return step


def build_onnx(params, doc: str) -> onnx.ModelProto:
    names = ["fc1", "fc2", "fc3"]
    inits, nodes = [], []
    cur = "input"
    for i, ((w, b), name) in enumerate(zip(params, names, strict=True)):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"{name}.bias"))
        out = "logits" if i == len(params) - 1 else f"{name}_out"
        nodes.append(
            helper.make_node(
                "Gemm", [cur, f"{name}.weight", f"{name}.bias"], [out], name=name, alpha=1.0, beta=1.0, transB=1
            )
        )
        cur = out
        if i < len(params) - 1:
            relu_out = f"relu{i + 1}_out"
            nodes.append(helper.make_node("Relu", [cur], [relu_out], name=f"relu{i + 1}"))
            cur = relu_out
    graph = helper.make_graph(
        nodes,
        "tiny_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnxopt-models/tiny_mlp.py",
        doc_string=doc,
    )
    return model


def dir_size(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f))
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dir with the four MNIST IDX .gz files")
    ap.add_argument("--out", default="models/tiny_mlp", help="output dir (default: models/tiny_mlp)")
    args = ap.parse_args(argv)

    paths = {k: os.path.join(args.data, v) for k, v in FILES.items()}
    missing = [v for k, v in FILES.items() if not os.path.isfile(paths[k])]
    if missing:
        print(f"error: missing MNIST file(s) in {args.data}: {', '.join(missing)}", file=sys.stderr)
        return 2

    train_x, train_y = load_images(paths["train_x"]), load_labels(paths["train_y"])
    test_x, test_y = load_images(paths["test_x"]), load_labels(paths["test_y"])
    assert train_x.shape == (60000, 784) and test_x.shape == (10000, 784), (train_x.shape, test_x.shape)
    assert train_y.shape == (60000,) and test_y.shape == (10000,)

    rng = np.random.default_rng(0)
    params = init_params(rng)
    t0 = time.perf_counter()
    train(params, train_x, train_y, rng)
    train_time = time.perf_counter() - t0

    np_acc = float((predict(params, test_x) == test_y).mean())
    n_params = sum(w.size + b.size for w, b in params)

    # ONNX export + checks
    doc = (
        f"MNIST MLP 784-256-128-10 (Gemm/Relu), trained with numpy by models/tiny_mlp.py "
        f"(SGD momentum {MOMENTUM}, {EPOCHS} epochs, batch {BATCH}, seed 0). "
        f"Input: pixel/255 float32 [N,784]. Test accuracy (10k, numpy): {np_acc:.4f}"
    )
    model = build_onnx(params, doc)
    onnx.checker.check_model(model, full_check=True)

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": test_x})[0]
    ort_acc = float((ort_logits.argmax(1) == test_y).mean())
    max_diff = float(np.abs(ort_logits - forward(params, test_x)).max())
    print(f"test accuracy numpy: {np_acc:.4f}  onnxruntime: {ort_acc:.4f}  (max |logit diff| {max_diff:.2e})")
    if ort_acc != np_acc:
        print("error: onnxruntime accuracy differs from numpy accuracy", file=sys.stderr)
        return 1
    model.doc_string = doc.replace("(10k, numpy)", "(10k, numpy == onnxruntime)")
    onnx.checker.check_model(model, full_check=True)

    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "tiny_mlp.onnx")
    onnx.save_model(model, onnx_path)
    np.savez_compressed(os.path.join(args.out, "calib.npz"), input=train_x[:1000].copy(), labels=train_y[:1000].copy())
    np.savez_compressed(os.path.join(args.out, "eval.npz"), input=test_x[:2000].copy(), labels=test_y[:2000].copy())

    sizes = {f: os.path.getsize(os.path.join(args.out, f)) for f in ("tiny_mlp.onnx", "calib.npz", "eval.npz")}
    kib = {f: f"{s / 1024:.0f} KiB" for f, s in sizes.items()}
    readme_lines = [
        "# tiny_mlp",
        "",
        "Small MNIST multilayer perceptron (784 -> 256 -> 128 -> 10, Gemm/Relu/Gemm/Relu/Gemm), "
        "trained with plain numpy; a test model for onnxopt.",
        f"Made with `python models/tiny_mlp.py --data <MNIST dir> --out {args.out}` (deterministic: seed 0, "
        f"SGD momentum {MOMENTUM}, cosine LR {LR}, {EPOCHS} epochs, batch {BATCH}, float32).",
        f"Input `input` float32 [N,784] = pixel/255 (no other normalisation); output `logits` float32 [N,10]; "
        f"opset {OPSET}, IR version {IR_VERSION}.",
        f"Test accuracy on the full 10k MNIST test set (onnxruntime CPUExecutionProvider): {ort_acc:.4f} "
        f"(numpy forward: {np_acc:.4f}).",
        f"Parameters: {n_params:,} float32 (fc1 784x256, fc2 256x128, fc3 128x10; "
        "weights stored (out,in) with Gemm transB=1).",
        f"Files: `tiny_mlp.onnx` {kib['tiny_mlp.onnx']}; `calib.npz` {kib['calib.npz']} "
        f"(first 1000 train images + int64 labels); `eval.npz` {kib['eval.npz']} "
        "(first 2000 test images + int64 labels).",
    ]
    readme = "\n".join(readme_lines) + "\n"
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(readme)

    total = dir_size(args.out)
    print(f"train time: {train_time:.1f} s")
    print(f"test accuracy (10k): numpy {np_acc:.4f}, onnxruntime {ort_acc:.4f}")
    print(f"params: {n_params:,}")
    for f, s in sizes.items():
        print(f"  {f}: {s / 1024:.1f} KiB")
    print(f"out dir {args.out}: {total / 1024:.1f} KiB total")
    if total > 3 * 1024 * 1024:
        print("warning: out dir exceeds 3 MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
