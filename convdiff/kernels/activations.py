"""Activation functions (as ``activation=`` and as layers). PLACEHOLDER being written."""

from __future__ import annotations

from typing import Any

from convdiff.kernels import Unsupported


def activate(activation: Any, x, nx):
    """Apply a Keras activation given as in a layer config (a name or a serialized dict)."""
    name = activation if isinstance(activation, str) else (activation or {}).get("config", {}).get("name", activation)
    if name in (None, "linear"):
        return x
    if name == "relu":
        return nx.maximum(x, 0.0)
    raise Unsupported(f"activation {name!r}")
