"""Build the examples: the one-layer model of the classic question (a NumPy Conv2D that agrees
with Keras to 7 digits) and an 8-layer stack, with inputs.

python examples/make_examples.py          # writes examples/*.h5, *.keras, *.npy
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

HERE = Path(__file__).resolve().parent


def one_layer() -> keras.Model:
    """Conv2D, 32 filters 3x3 'same', relu, on 64x64x1: the model of the user's question."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((64, 64, 1)), keras.layers.Conv2D(32, 3, padding="same", activation="relu")],
        name="one_layer",
    )


def deep() -> keras.Model:
    """Eight 3x3 convolutions with ReLU: differences that grow with depth (propagated mode)."""
    keras.utils.set_random_seed(1)
    layers = [keras.Input((32, 32, 3))]
    for i in range(8):
        layers.append(
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name=f"conv{i}")
        )
    return keras.Sequential(layers, name="deep8")


def with_random_biases(model: keras.Model, seed: int) -> keras.Model:
    """Keras initialises biases to zero; small random ones make a missing or misplaced bias a
    visible mistake."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            shape = tuple(layer.bias.shape)
            layer.bias.assign(rng.uniform(-0.1, 0.1, shape).astype("float32"))
    return model


def main() -> None:
    rng = np.random.default_rng(0)
    model = with_random_biases(one_layer(), 10)
    model.save(HERE / "one_layer.h5")
    model.save(HERE / "one_layer.keras")
    np.save(HERE / "one_layer_input.npy", rng.standard_normal((1, 64, 64, 1)).astype("float32"))
    model = with_random_biases(deep(), 11)
    model.save(HERE / "deep8.keras")
    np.save(HERE / "deep8_input.npy", rng.standard_normal((1, 32, 32, 3)).astype("float32"))


if __name__ == "__main__":
    main()
