"""TensorFlow's CPU library functions as Eigen computes them, step for step, in NumPy.

convdiff's NumPy side normally rounds a library function's exact value once (``exp``,
``sigmoid``...). TensorFlow's CPU kernels instead run Eigen's own approximations, which can
differ from the correctly rounded value by a few ULPs. Where such an algorithm is public and
deterministic, it can be followed operation by operation in float32, each step rounded as
the machine rounds it; ``--order auto`` uses such a model only after checking it bit for bit
against TensorFlow on the machine at hand (:func:`convdiff.autoorder.modelled_functions`),
because the result depends on how TensorFlow was compiled.

Modelled: Eigen's float32 logistic (``tf.math.sigmoid``; ``tf.nn.silu`` multiplies it by its
input). Eigen evaluates an elementwise op over the flattened tensor in packets of
:data:`PACKET` floats (the AVX build of the TensorFlow wheels), then the last ``n % PACKET``
elements one by one with the scalar form of the function. The two forms differ:

- packets (``scalar_logistic_op<float>::packetOp``): ``x`` clamped above at 16.6355324,
  halved, ``exp(x/2)`` by Cephes-style range reduction (``m = floor(x/2 * log2(e) + 1/2)``,
  ``r`` from two subtractions of ``m * ln 2``) and a degree-5 polynomial, scaled by
  ``2**m``, squared, then ``e / (1 + e)``; 0 below -104. Every ``pmadd`` is a product
  rounded, then a sum rounded: the wheels are built without FMA for Eigen's own code
  (TensorFlow says so at start-up: "rebuild TensorFlow with ... AVX2 FMA").
- the scalar tail (``operator()``): ``e = exp(min(x, 16.6355324))`` from the C library's
  ``expf``, then ``e / (1 + e)``. The C library's ``expf`` is called here too (through
  ctypes): its last bit is the library's, not a formula's.

TensorFlow's CPU threads flush subnormal results to zero and read subnormal inputs as zero;
so does this model, at every step.

Never imports TensorFlow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import numpy as np

# Floats per Eigen packet in the TensorFlow wheels (AVX: 256-bit registers).
PACKET = 8

_F = np.float32
_TINY = np.finfo(np.float32).tiny

# scalar_logistic_op<float>'s constants, as float32 (Eigen writes them as float literals).
_EXP_HI = _F(16.6355324)
_EXP_LO = _F(-104.0)
_LOG2E = _F(1.44269504088896341)
_LN2_HI = _F(-0.693359375)  # Cephes' two-part ln 2: m * C1 + m * C2 = m * ln 2
_LN2_LO = _F(2.12194440e-4)
_P2 = _F(0.49999141693115234375)
_P3 = _F(0.16666877269744873046875)
_P4 = _F(4.1898667812347412109375e-2)
_P5 = _F(8.33471305668354034423828125e-3)


def _flushed(v: np.ndarray) -> np.ndarray:
    """Subnormal float32 values flushed to a zero of their sign (the CPU's FTZ/DAZ modes)."""
    v = np.asarray(v, _F)
    return np.where(np.abs(v) < _TINY, np.copysign(_F(0), v), v).astype(_F)


def _mul(a, b) -> np.ndarray:
    return _flushed(np.multiply(a, b, dtype=_F))


def _add(a, b) -> np.ndarray:
    return _flushed(np.add(a, b, dtype=_F))


def _madd(a, b, c) -> np.ndarray:
    """Eigen's ``pmadd(a, b, c)`` built without FMA: ``a * b`` rounded, then ``+ c``."""
    return _add(_mul(a, b), c)


def logistic_packet(x: np.ndarray) -> np.ndarray:
    """``scalar_logistic_op<float>::packetOp``, elementwise (lanes do not interact)."""
    x = _flushed(x)
    below = x < _EXP_LO
    with np.errstate(all="ignore"):
        h = _mul(np.minimum(x, _EXP_HI), _F(0.5))  # exp(x) = exp(x/2)**2: no subnormal 2**m
        m = np.floor(_madd(h, _LOG2E, _F(0.5)))
        r = _madd(m, _LN2_HI, h)
        r = _madd(m, _LN2_LO, r)
        r2 = _mul(r, r)
        p_even = _madd(r2, _P4, _P2)
        p_odd = _madd(r2, _P5, _P3)
        p = _madd(r, p_odd, p_even)
        p = _madd(r2, p, _add(r, _F(1)))
        # pldexp_fast: p * 2**m, exact (m >= -76 keeps 2**m and the product normal)
        e = _flushed((p.astype(np.float64) * np.exp2(m.astype(np.float64))).astype(_F))
        e = _mul(e, e)
        s = _flushed(np.divide(e, _add(_F(1), e), dtype=_F))
    return np.where(below, _F(0), s).astype(_F)


@functools.lru_cache(maxsize=1)
def _c_expf() -> Callable[[float], float] | None:
    """The C library's ``expf``, or None where it cannot be loaded."""
    name = ctypes.util.find_library("m")
    try:
        libm = ctypes.CDLL(name)
        fn = libm.expf
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return fn


def logistic_scalar(x: np.ndarray) -> np.ndarray:
    """``scalar_logistic_op<float>::operator()``: ``e / (1 + e)``, ``e = expf(min(x, hi))``.

    Raises:
        RuntimeError: the C library's ``expf`` cannot be loaded.
    """
    expf = _c_expf()
    if expf is None:
        raise RuntimeError("the C library's expf is not available")
    x = np.minimum(_flushed(x), _EXP_HI)
    e = _flushed(np.array([expf(float(v)) for v in x.reshape(-1)], _F).reshape(x.shape))
    with np.errstate(all="ignore"):
        return _flushed(np.divide(e, _add(_F(1), e), dtype=_F))


def logistic(x: np.ndarray) -> np.ndarray:
    """``tf.math.sigmoid`` of a float32 tensor on TensorFlow's CPU: packets over the
    flattened tensor (C order), the last ``size % PACKET`` elements by the scalar form."""
    flat = np.asarray(x, _F).reshape(-1)
    cut = flat.size - flat.size % PACKET
    out = np.empty_like(flat)
    out[:cut] = logistic_packet(flat[:cut])
    if cut < flat.size:
        out[cut:] = logistic_scalar(flat[cut:])
    return out.reshape(np.shape(x))


def available() -> bool:
    """Whether every part of the models can run here (the C library's ``expf``)."""
    return _c_expf() is not None


# Library functions modelled, by the name :data:`convdiff.numerics.FUNCTIONS` gives them:
# float32 in, float32 out.
MODELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"sigmoid": logistic}
