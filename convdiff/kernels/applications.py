"""Kernels for the Keras-internal layers of ``keras.applications``.

These classes are not in ``keras.layers``; they are registered by their dotted path
(``module.qualname``), which is also what a model loaded from a .keras or .h5 file holds:

- ConvNeXt's ``LayerScale``: ``x * gamma`` (gamma per channel, the last axis), one rounding.
- ConvNeXt's ``StochasticDepth``: the input unchanged at inference.
- InceptionResNetV2's ``CustomScaleLayer``: ``inputs[0] + inputs[1] * scale``; TensorFlow runs
  the product and the sum as two ops (``Mul`` then ``AddV2``), two roundings, no FMA.

None of them reduces anything, so no summation order applies.
"""

from __future__ import annotations

from typing import Any

from convdiff.kernels import LayerSpec, Unsupported, register


@register("keras.src.applications.convnext.LayerScale")
def layer_scale(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """LayerScale: ``x * gamma``, gamma broadcast along the last axis; one rounding."""
    # ``build`` adds gamma without a name: Keras calls the variable ``variable``.
    weights = list(spec.weights.values())
    if len(weights) != 1:
        raise Unsupported(f"LayerScale with {len(weights)} weights (expected gamma alone)")
    gamma = weights[0]
    return nx.mul(inputs[0], nx.const(gamma))


@register("keras.src.applications.convnext.StochasticDepth")
def stochastic_depth(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """StochasticDepth: drops residual paths only in training; the identity at inference."""
    return inputs[0]


@register("keras.src.applications.inception_resnet_v2.CustomScaleLayer")
def custom_scale_layer(spec: LayerSpec, inputs: list, nx: Any) -> Any:
    """CustomScaleLayer: ``x + r * scale``: the product rounded (the Python float ``scale``
    converted to the compute dtype first), then the sum rounded."""
    if len(inputs) != 2:
        raise Unsupported(f"CustomScaleLayer on {len(inputs)} inputs (Keras takes 2)")
    shortcut, residual = inputs
    scaled = nx.mul(residual, nx.const(float(spec.config["scale"])))
    return nx.add(shortcut, scaled)
