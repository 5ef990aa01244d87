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


class OutputError(ConvdiffError):
    """An output path (--json, --junit, --save-outputs) cannot be written."""
