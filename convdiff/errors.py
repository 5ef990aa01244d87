"""Errors a user can cause. The CLI shows them as one ``Error: ...`` line and exits 2.

Anything that is not a :class:`ConvdiffError` is a bug in convdiff and keeps its traceback.
"""

from __future__ import annotations


class ConvdiffError(Exception):
    """Base class: a run that could not be made because of what the user gave us."""


class ModelLoadError(ConvdiffError):
    """The model file is missing, unreadable, unsafe to load, or not a Keras model."""


class InputError(ConvdiffError):
    """The input file is unreadable or does not fit the model's inputs."""


class OptionError(ConvdiffError):
    """An option value is invalid or options contradict each other."""


class ResourceError(ConvdiffError):
    """The run needs more memory than is available (a smaller batch or fewer layers fit)."""


class BackendError(ConvdiffError):
    """Keras's backend cannot run a layer of the model on this machine (e.g. TensorFlow's CPU
    kernels without oneDNN take channels_last data only)."""


class OutputError(ConvdiffError):
    """An output path (--json, --junit, --save-outputs) cannot be written."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (for an ``Error:`` line), cut at ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
