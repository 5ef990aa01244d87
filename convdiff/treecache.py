"""On-disk cache of revealed summation trees (``--order auto``).

A revealed tree holds for one layer problem on one machine and software stack, so the key is
everything that can change it: the CPU (model and instruction-set flags), the machine type,
the Keras backend and its version, Keras's version, whether oneDNN is on, the thread counts,
the device the backend runs on (with TF32 and op determinism), convdiff's own version (a
later version may reveal more), and the layer problem itself (class, configuration, input and
kernel shapes, dtype). Each
entry is one small JSON file named by the SHA-256 of its key, in the ``trees`` directory of
convdiff's user cache (:mod:`convdiff.cachedir`: ``$CONVDIFF_CACHE_DIR``, else
``$XDG_CACHE_HOME/convdiff``, else ``~/.cache/convdiff``; never inside the installed package).
A missing, unreadable or foreign entry is a miss; a cache that cannot be written is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from convdiff.cachedir import cache_dir

# Bumped whenever the meaning of a stored entry changes.
FORMAT = 1
_SUBDIRECTORY = "trees"

# Config entries that cannot change the summation order (names, initial values, penalties).
_IGNORED_CONFIG = ("name", "trainable", "initializer", "regularizer", "constraint", "seed")


def layer_key(
    class_name: str,
    config: dict[str, Any],
    input_shapes: list[tuple[int, ...]],
    weight_shapes: dict[str, tuple[int, ...]],
    dtype: str,
) -> dict[str, Any]:
    """The layer problem part of a key."""
    kept = {
        k: v for k, v in sorted(config.items()) if not any(word in k for word in _IGNORED_CONFIG)
    }
    return {
        "class": class_name,
        "config": kept,
        "inputs": [list(s) for s in input_shapes],
        "weights": {k: list(v) for k, v in sorted(weight_shapes.items())},
        "dtype": dtype,
    }


def full_key(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer key with the machine and software it was revealed on."""
    return {"format": FORMAT, "machine": machine_key(), "layer": layer}


def digest(key: dict[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def load(key: dict[str, Any]) -> dict[str, Any] | None:
    """The entry stored under ``key``, or None."""
    directory = cache_dir(_SUBDIRECTORY)
    if directory is None:
        return None
    path = directory / f"{digest(key)}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key, default=str)):
        return None  # a hash collision or a hand-edited file: not this problem's entry
    return data


def store(key: dict[str, Any], value: dict[str, Any]) -> bool:
    """Write an entry (atomically); False where the cache directory cannot be written."""
    directory = cache_dir(_SUBDIRECTORY)
    if directory is None:
        return False
    data = json.dumps({"key": key, **value}, default=str, indent=1)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tree-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, directory / f"{digest(key)}.json")
    except OSError:
        return False
    return True


def machine_key() -> dict[str, Any]:
    """The machine, the software stack and the runtime the backend runs under now (device,
    TF32, op determinism), as far as they can change a backend's order."""
    from convdiff.runtime import current_runtime

    runtime = current_runtime()
    return {
        **_stack_key(),
        "device": runtime.device,
        "tf32": runtime.tf32,
        "deterministic": runtime.deterministic,
    }


@cache
def _stack_key() -> dict[str, Any]:
    """What stays fixed for the process: CPU, versions, oneDNN, threads."""
    import keras

    from convdiff import __version__
    from convdiff.runtime import environment

    env = environment()
    backend = keras.backend.backend()
    return {
        "convdiff": __version__,
        "cpu": env["cpu"],
        "cpu_flags": _cpu_flags(),
        "machine": platform.machine(),
        "backend": backend,
        "backend_version": _version(backend),
        "keras": env["keras"],
        "onednn": env["onednn"],
        "intra_op_threads": env["intra_op_threads"],
        "inter_op_threads": env["inter_op_threads"],
        "cpu_count": os.cpu_count(),
    }


def _version(backend: str) -> str | None:
    import importlib.metadata

    package = {"tensorflow": "tensorflow", "jax": "jaxlib", "torch": "torch"}.get(backend, backend)
    for name in (package, f"{package}-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_flags() -> str:
    """The instruction-set flags of the first CPU (AVX2, AVX-512, AMX... decide a backend's
    kernels), as a digest; the platform's processor string where /proc is not there."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                return hashlib.sha256(flags.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor() or "unknown"
