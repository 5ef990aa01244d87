"""A user's own NumPy implementation of a layer, plugged in for convdiff's kernel.

``--impl KEY=path/to/file.py:function`` (or ``package.module:function``): ``KEY`` is a layer name
or a layer class name (globs allowed). The function is called as ``function(x, *weights)`` with
the layer's input (a list for a multi-input layer) and its weights in Keras order (kernel, bias,
...); if it accepts ``config=`` it also gets the layer's config dict. It returns the layer's whole
output, activation included.

Importing the named file runs it: it is the user's own code, named on the command line.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convdiff.errors import OptionError
from convdiff.graph import layer_matches


@dataclass(frozen=True)
class UserImpl:
    """A user's function standing in for convdiff's kernel on the layers ``key`` matches."""

    key: str
    function: Callable[..., Any]
    source: str

    @property
    def label(self) -> str:
        return f"your implementation {self.source}"

    @property
    def takes_config(self) -> bool:
        try:
            params = inspect.signature(self.function).parameters
        except (TypeError, ValueError):
            return False
        return "config" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def matches(self, layer_name: str, class_name: str) -> bool:
        return layer_matches(self.key, layer_name, class_name)

    def __call__(
        self, inputs: Sequence[np.ndarray], weights: Sequence[np.ndarray], config: dict[str, Any]
    ) -> Any:
        """Call the user's function and return what it returned (an array, or a list, a
        scalar...: the caller reads it as an array); any exception it raises becomes
        :class:`ImplFailure`."""
        x: Any = list(inputs) if len(inputs) != 1 else inputs[0]
        kwargs = {"config": config} if self.takes_config else {}
        try:
            return self.function(x, *weights, **kwargs)
        except Exception as exc:
            raise ImplFailure(self, exc) from exc


class ImplFailure(Exception):
    """The user's function raised; carries its own traceback frames, not convdiff's."""

    def __init__(self, impl: UserImpl, exc: BaseException) -> None:
        frames = [
            f for f in traceback.extract_tb(exc.__traceback__) if not _is_convdiff(f.filename)
        ]
        lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
        self.traceback = "".join(lines).rstrip()
        super().__init__(f"{impl.source} raised {type(exc).__name__}: {exc}")


def _is_convdiff(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)


def parse_impls(specs: Sequence[str] | Mapping[str, Any]) -> list[UserImpl]:
    """``KEY=file.py:function`` strings (or a ``{key: callable or "file.py:function"}`` mapping)
    -> :class:`UserImpl` objects.

    Raises:
        OptionError: malformed spec, missing file or module, no such function, not callable.
    """
    items = specs.items() if isinstance(specs, Mapping) else [_split_key(s) for s in specs]
    return [_resolve(key, target) for key, target in items]


def _split_key(spec: str) -> tuple[str, str]:
    key, sep, target = spec.partition("=")
    if not sep or not key or not target:
        raise OptionError(
            f"--impl expects KEY=path/to/file.py:function or KEY=package.module:function "
            f"(KEY a layer name or class); received {spec!r}"
        )
    return key.strip(), target.strip()


def _resolve(key: str, target: Any) -> UserImpl:
    if callable(target):
        return UserImpl(key, target, getattr(target, "__qualname__", repr(target)))
    location, sep, name = str(target).rpartition(":")
    if not sep or not location or not name:
        raise OptionError(f"--impl {key}={target!r}: expected file.py:function or module:function")
    module = _load_file(key, location) if location.endswith(".py") else _import(key, location)
    function = getattr(module, name, None)
    if function is None or not callable(function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise OptionError(
            f"--impl {key}: {location!r} has no function {name!r}; it defines {found or 'none'}"
        )
    return UserImpl(key, function, f"{location}:{name}")


def _load_file(key: str, location: str):
    path = Path(location)
    if not path.is_file():
        raise OptionError(f"--impl {key}: file {location!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"convdiff_impl_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as exc:
        raise OptionError(
            f"--impl {key}: importing {location!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    return module


def _import(key: str, name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise OptionError(f"--impl {key}: cannot import module {name!r} ({exc})") from None


def check_impls_match(impls: Sequence[UserImpl], layers: Sequence[tuple[str, str]]) -> None:
    """Every ``--impl`` key must match some layer (by name or class), else say which exist."""
    for impl in impls:
        if not any(impl.matches(name, cls) for name, cls in layers):
            names = ", ".join(name for name, _ in layers[:12]) + (
                " ..." if len(layers) > 12 else ""
            )
            raise OptionError(
                f"--impl key {impl.key!r} matches no layer name or class; layers are: {names}"
            )


def find_impl(impls: Sequence[UserImpl], layer_name: str, class_name: str) -> UserImpl | None:
    """The implementation for a layer: one keyed by its name wins over one keyed by class."""
    by_name = [i for i in impls if i.matches(layer_name, "\0")]
    by_class = [i for i in impls if i.matches("\0", class_name)]
    chosen = by_name or by_class
    return chosen[-1] if chosen else None
