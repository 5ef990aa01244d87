"""Small real models covering the graph shapes convdiff must walk, written by Keras 3 and by
Keras 2 (tf-keras, in a subprocess so the two Keras versions never share a process).

Each builder takes the Keras module (``keras`` or ``tf_keras``) so the same architecture is
written by both versions.
"""

from __future__ import annotations

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


# Keras 2 cases for tests/test_compat.py, each needing one of convdiff.compat's fix-ups (or
# refused by name): a tf-keras model builder (``k`` is tf_keras, ``L`` its layers), run in the
# subprocess below. Weights are random (normal around 0.5), so that no weight can be silently
# left at its initial value.
KERAS2_CASES = r"""
def seq(shape, *layers):
    return k.Sequential([k.Input(shape)] + list(layers))

def mixed_float16():
    k.mixed_precision.set_global_policy("mixed_float16")
    try:
        return seq((6, 6, 3), L.Conv2D(4, 3), L.BatchNormalization(), L.Dense(3),
                   L.Activation("softmax", dtype="float32"))
    finally:
        k.mixed_precision.set_global_policy("float32")

def nested_sequential_output():
    x = k.Input((5,), name="x")
    inner = k.Sequential([k.Input((5,)), L.Dense(4, name="inner_dense")], name="inner")
    return k.Model(x, [inner(x), L.Dense(2, name="side")(x)])

def nested_functional_shared():
    # called twice (Keras 2 nodes 1 and 2); the second call is also a model output
    x = k.Input((5,), name="x")
    i = k.Input((5,))
    inner = k.Model(i, L.Dense(5, name="inner_dense")(i), name="inner")
    twice = inner(inner(x))
    return k.Model(x, [L.Dense(2, name="after")(twice), twice])

def functional_in_sequential():
    i = k.Input((5,))
    inner = k.Model(i, L.Dense(4, name="inner_dense")(i), name="inner")
    return seq((5,), inner, L.Dense(2, name="after"))

CASES = {
    "depthwise_transpose": lambda: seq(
        (8, 8, 3), L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
        L.Conv2DTranspose(4, 3, strides=2), L.Reshape((17 * 17, 4)), L.DepthwiseConv1D(3)),
    "separable": lambda: seq((8, 8, 3), L.SeparableConv2D(5, 3, depth_multiplier=2)),
    "mixed_float16": mixed_float16,
    "thresholded_relu": lambda: seq((6,), L.Dense(8), L.ThresholdedReLU(theta=0.3)),
    "lstm": lambda: seq((4, 3), L.LSTM(2)),
    "spatial_dropout": lambda: seq((6, 6, 2), L.Conv2D(3, 3), L.SpatialDropout2D(0.5)),
    "leaky_relu": lambda: seq((6,), L.LeakyReLU(alpha=0.1)),
    "nested_sequential_output": nested_sequential_output,
    "nested_functional_shared": nested_functional_shared,
    "functional_in_sequential": functional_in_sequential,
    "hard_sigmoid": lambda: seq((6,), L.Dense(4, activation="hard_sigmoid")),
    "virtual_batch": lambda: seq((4, 3), L.BatchNormalization(virtual_batch_size=2)),
    "lambda": lambda: seq((6,), L.Lambda(lambda t: t * 2.0)),
}
"""

# Writes every Keras 2 case and every zoo model (as ``zoo_NAME``) as .h5, each with its input
# and tf-keras's output on it (``NAME.npz``: ``x0...``, ``y0...``).
_KERAS2_SCRIPT = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tf_keras as k
L = k.layers
out, tests = sys.argv[1], sys.argv[2]
sys.path.insert(0, tests)
import model_zoo
exec(CASES_SOURCE)
builders = dict(CASES)
for zoo_name in model_zoo.BUILDERS:
    builders["zoo_" + zoo_name] = lambda zoo_name=zoo_name: model_zoo.build(zoo_name, k)
for name, build in builders.items():
    k.utils.set_random_seed(3)
    model = build()
    rng = np.random.default_rng(11)
    if not name.startswith("zoo_"):  # the zoo sets its own weights
        for layer in model.layers:
            weights = layer.get_weights()
            if weights:
                layer.set_weights([rng.normal(0.5, 0.3, w.shape).astype(w.dtype) for w in weights])
    xs = [rng.standard_normal((2, *t.shape[1:])).astype("float32") for t in model.inputs]
    ys = model(xs if len(xs) > 1 else xs[0], training=False)
    ys = ys if isinstance(ys, (list, tuple)) else [ys]
    model.save(os.path.join(out, name + ".h5"))
    np.savez(os.path.join(out, name + ".npz"),
             **{f"x{i}": x for i, x in enumerate(xs)},
             **{f"y{i}": np.asarray(y, dtype="float32") for i, y in enumerate(ys)})
"""

# The script above with the cases in it: tests/test_compat.py and tests/test_end_to_end.py
# register it as the Keras 2 writer "zoo" (support.keras2_writer).
KERAS2_SCRIPT = _KERAS2_SCRIPT.replace("exec(CASES_SOURCE)", textwrap.dedent(KERAS2_CASES))
