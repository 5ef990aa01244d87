"""convdiff: layer-by-layer numerical diff of Keras models against independent NumPy kernels."""

__version__ = "0.2.0"


def compare(*args, **kwargs):
    """Compare every layer of a Keras model with convdiff's NumPy kernels; see
    :func:`convdiff.api.compare`. (Imported lazily: ``import convdiff`` stays light.)"""
    from convdiff.api import compare as _compare

    return _compare(*args, **kwargs)
