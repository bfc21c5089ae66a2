"""Write the tf2onnx-converted Keras CNN with BatchNormalization used by the simplify tests.

    python models/keras_bn_fixture.py -o tests/data/keras_bn_tf2onnx.onnx      (needs the `tf` extra)

A functional Keras model (tf2onnx 1.17 cannot convert Keras 3 Sequential models): Conv2D+BN+ReLU,
Conv2DTranspose+BN+ReLU, global average pooling, Dense+BN, Dense. BatchNorm statistics are randomized
(seeded) so that folding them is visible in the numbers. tf2onnx folds the first BatchNorm into its Conv
itself and writes the others as per-channel Mul + Add, after the ConvTranspose and after a MatMul.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def build():
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=True)(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2DTranspose(4, 2, strides=2)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(6)(x)
    x = keras.layers.BatchNormalization()(x)
    out = keras.layers.Dense(3, name="scores")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            layer.set_weights([1 + 0.3 * rng.random(n), 0.2 * rng.standard_normal(n),
                               0.2 * rng.standard_normal(n), 1 + rng.random(n)])  # fmt: skip
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, 16, 16, 3), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(build(), input_signature=spec, opset=17, output_path=args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
