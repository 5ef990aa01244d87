"""convdiff: layer-by-layer numerical diff of Keras models against independent NumPy kernels."""

__version__ = "0.1.0"
