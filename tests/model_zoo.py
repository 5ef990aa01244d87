"""Small real models covering the graph shapes convdiff must walk, written by Keras 3 and by
Keras 2 (tf-keras, in a subprocess so the two Keras versions never share a process).

Each builder takes the Keras module (``keras`` or ``tf_keras``) so the same architecture is
written by both versions.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np


def _bn_stats(model, seed: int) -> None:
    """Random moving statistics: the defaults (mean 0, variance 1) hide formula errors."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            weights = layer.get_weights()
            n = weights[0].shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n).astype("float32"),
                    rng.normal(0, 0.5, n).astype("float32"),
                    rng.normal(0, 0.5, n).astype("float32"),
                    rng.uniform(0.2, 2.0, n).astype("float32"),
                ]
            )


def sequential_cnn(k):
    L = k.layers
    return k.Sequential(
        [
            k.Input((16, 16, 3)),
            L.Conv2D(8, 3, padding="same", activation="relu"),
            L.BatchNormalization(),
            L.MaxPooling2D(2),
            L.DepthwiseConv2D(3, padding="same"),
            L.SeparableConv2D(12, 3, strides=2, activation="tanh"),
            L.GlobalAveragePooling2D(),
            L.Dropout(0.5),
            L.Dense(10, activation="softmax"),
        ],
        name="sequential_cnn",
    )


def functional_branches(k):
    L = k.layers
    x = k.Input((12, 12, 4), name="image")
    y = L.Conv2D(6, 3, padding="same", activation="relu", name="stem")(x)
    a = L.Conv2D(6, 3, padding="same", activation="relu", name="branch_a")(y)
    b = L.Conv2D(6, 1, activation="sigmoid", name="branch_b")(y)
    s = L.Add(name="sum")([a, b, y])
    c = L.Concatenate(name="concat")([s, b])
    c = L.AveragePooling2D(2, name="avgpool")(c)
    f = L.Flatten(name="flatten")(c)
    out = L.Dense(5, name="logits")(f)
    return k.Model(x, out, name="functional_branches")


def multi_io(k):
    L = k.layers
    img = k.Input((8, 8, 2), name="img")
    vec = k.Input((5,), name="vec")
    h = L.Conv2D(4, 3, activation="elu", name="conv")(img)
    h = L.GlobalMaxPooling2D(name="gmp")(h)
    v = L.Dense(4, activation="relu", name="vec_dense")(vec)
    m = L.Multiply(name="mul")([h, v])
    out1 = L.Dense(3, name="head1")(m)
    out2 = L.Dense(2, activation="sigmoid", name="head2")(L.Concatenate(name="cat")([h, v]))
    return k.Model([img, vec], [out1, out2], name="multi_io")


def nested(k):
    L = k.layers
    block = k.Sequential(
        [
            k.Input((10, 10, 3)),
            L.Conv2D(4, 3, padding="same", activation="relu", name="inner_conv"),
            L.BatchNormalization(name="inner_bn"),
        ],
        name="block",
    )
    x = k.Input((10, 10, 3), name="x")
    y = block(x)
    shared = L.Dense(6, activation="relu", name="shared")
    p = shared(L.Flatten(name="flat_a")(y))
    q = shared(L.Flatten(name="flat_b")(L.Conv2D(4, 1, padding="same", name="side")(x)))
    out = L.Subtract(name="diff")([p, q])
    model = k.Model(x, out, name="nested")
    _bn_stats(block, 3)
    return model


BUILDERS = {f.__name__: f for f in (sequential_cnn, functional_branches, multi_io, nested)}


def build(name: str, k):
    k.utils.set_random_seed(7)
    model = BUILDERS[name](k)
    _bn_stats(model, 5)
    return model


def save_keras3(directory: Path) -> dict[str, Path]:
    """Every zoo model saved by Keras 3 as .h5 and .keras; returns paths by 'name.ext'."""
    import keras

    paths = {}
    for name in BUILDERS:
        model = build(name, keras)
        for ext in ("h5", "keras"):
            path = directory / f"{name}.k3.{ext}"
            model.save(path)
            paths[f"{name}.{ext}"] = path
    return paths


def save_keras2(directory: Path) -> dict[str, Path]:
    """Every zoo model saved by Keras 2 (tf-keras) as .h5, in a subprocess."""
    script = textwrap.dedent(
        f"""
        import os, sys
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import tf_keras
        import model_zoo
        for name in model_zoo.BUILDERS:
            model_zoo.build(name, tf_keras).save(os.path.join({str(directory)!r}, name + ".k2.h5"))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    return {f"{name}.k2.h5": directory / f"{name}.k2.h5" for name in BUILDERS}
