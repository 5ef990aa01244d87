"""Kernel registry: a Keras layer class -> its pure-NumPy kernel.

A kernel is a pure function ``kernel(spec, inputs, nx) -> output`` of the layer's
:class:`LayerSpec` (config and weights), its input values and the arithmetic ``nx`` (any
:class:`~convdiff.numerics.Arithmetic`: :class:`~convdiff.numerics.Rounded` or
:class:`~convdiff.numerics.Bounded`). It never imports
TensorFlow, Keras, JAX or SciPy: it is a second, independent implementation.

Classes are matched exactly, never through subclasses, so a subclass does not inherit the wrong
maths: a user's ``class MyConv(Conv2D)`` that overrides ``call`` has no kernel until one is
registered for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from convdiff.numerics import Arithmetic

_FAMILIES = (
    "activations",
    "applications",
    "conv",
    "dense",
    "merging",
    "normalization",
    "operations",
    "pooling",
    "preprocessing",
    "reshaping",
)


@dataclass(frozen=True)
class LayerSpec:
    """What a kernel may know about a layer: its class, config, weights and dtypes.

    Attributes:
        name: the layer's name.
        class_name: the Keras class name, e.g. ``Conv2D``.
        config: ``layer.get_config()``.
        weights: the layer's weights by short name (``kernel``, ``bias``, ``gamma``...), in
            Keras order, as stored (variable dtype).
        dtype: the layer's compute dtype name (``float32``, ``float16``...).
    """

    name: str
    class_name: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    dtype: str = "float32"

    def weight(self, name: str) -> np.ndarray | None:
        """The weight called ``name``, or None when the layer has none (e.g. no bias)."""
        return self.weights.get(name)


Kernel = Callable[[LayerSpec, list[Any], "Arithmetic"], Any]
REGISTRY: dict[str, Kernel] = {}


def register(*keys: str) -> Callable[[Kernel], Kernel]:
    """Register a kernel for Keras classes, by public name (``"Conv2D"``, matched against
    ``keras.layers``) or by dotted path (``"keras.src.applications.convnext.LayerScale"``)."""

    def decorate(fn: Kernel) -> Kernel:
        for key in keys:
            if key in REGISTRY:
                raise RuntimeError(f"two kernels registered for {key}")
            REGISTRY[key] = fn
        return fn

    return decorate


def _load_families() -> None:
    for family in _FAMILIES:
        importlib.import_module(f"convdiff.kernels.{family}")


def registry() -> dict[str, Kernel]:
    """All registered kernels, by key (loads every kernel family once)."""
    _load_families()
    return REGISTRY


def find_kernel(layer_class: type, public_classes: dict[str, type]) -> Kernel | None:
    """The kernel for exactly ``layer_class``, or None.

    Args:
        layer_class: ``type(layer)``.
        public_classes: Keras's public layer classes by name (``vars(keras.layers)``), so a
            name key only matches Keras's own class of that name.
    """
    kernels = registry()
    dotted = f"{layer_class.__module__}.{layer_class.__qualname__}"
    if dotted in kernels:
        return kernels[dotted]
    name = layer_class.__name__
    if name in kernels and public_classes.get(name) is layer_class:
        return kernels[name]
    return None


class Unsupported(Exception):
    """Raised by a kernel for a configuration it does not implement; the layer is skipped
    with this message as its reason (never approximated)."""


def supported_layers_markdown() -> str:
    """The README's list of supported layers, generated from the registry."""
    names = sorted(registry(), key=lambda k: (k.count("."), k.lower()))
    lines = [f"- `{name}`" for name in names]
    return "\n".join(lines) + "\n"
