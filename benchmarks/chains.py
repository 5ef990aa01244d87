"""The default order's chains of fused multiply-adds on ResNet50's convolution shapes: the NumPy
engine against the compiled register tiles on one thread and on every core, in one process.

    python benchmarks/chains.py              # batch 1
    python benchmarks/chains.py --batch 8 --no-numpy   # the compiled engine only

Each figure is the best of --repeat runs of ``orders.reduce_terms`` (sequential, FMA, float32)
on ReLU-like patches (non-negative, half of them zero) and small weights; every run's bits are
checked equal to the NumPy engine's (or the first run's). Printed: seconds and picoseconds per
multiply-add.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from convdiff import accel
from convdiff.orders import parse_order, reduce_terms

# (terms, output positions per image, output channels): 3x3 and 1x1 convolutions of the four
# stages, the 7x7 stem, and the classifier
SHAPES = {
    "conv1 7x7x3 -> 64 @112": (147, 112 * 112, 64),
    "3x3x64 -> 64 @56": (576, 56 * 56, 64),
    "1x1 256 -> 64 @56": (256, 56 * 56, 64),
    "3x3x128 -> 128 @28": (1152, 28 * 28, 128),
    "1x1 1024 -> 256 @14": (1024, 14 * 14, 256),
    "3x3x512 -> 512 @7": (4608, 7 * 7, 512),
    "dense 2048 -> 1000": (2048, 1, 1000),
}


def _time(run, args: tuple, repeat: int) -> tuple[float, np.ndarray]:
    """The best wall time of ``run(*args)`` and its result (the same bits every time)."""
    best, first = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = run(*args)
        best = min(best, time.perf_counter() - start)
        if first is None:
            first = out
        assert np.array_equal(first.view(np.uint32), out.view(np.uint32))
    return best, first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-numpy", action="store_true", help="skip the NumPy engine")
    args = parser.parse_args()
    if not accel.enabled():
        raise SystemExit("numba is not installed (pip install 'convdiff[fast]')")
    rng = np.random.default_rng(0)
    order = parse_order("sequential")
    cores = accel._threads()
    print(f"batch {args.batch}, {cores} cores; best of {args.repeat}")
    for label, (terms, positions, channels) in SHAPES.items():
        positions *= args.batch
        a = np.maximum(rng.standard_normal((terms, positions, 1)), 0).astype(np.float32)
        b = (rng.standard_normal((terms, 1, channels)) * 0.05).astype(np.float32)
        steps = terms * positions * channels

        kinds = {"compiled, 1 thread": ("numba", 1), f"compiled, {cores} threads": ("numba", 0)}
        if not args.no_numpy:
            kinds = {"NumPy engine": ("numpy", 0), **kinds}
        figures, outputs = [], []
        for name, (engine, threads) in kinds.items():
            seconds, out = _time(_run, (a, b, order, engine, threads), args.repeat)
            outputs.append(out)
            figures.append(f"{name} {seconds:7.3f} s ({seconds / steps * 1e12:5.0f} ps)")
        assert all(np.array_equal(outputs[0].view(np.uint32), o.view(np.uint32)) for o in outputs)
        print(f"{label:24s} {steps / 1e9:6.2f} G | " + " | ".join(figures), flush=True)
    os.environ.pop("CONVDIFF_NUMBA", None)


def _run(a: np.ndarray, b: np.ndarray, order, engine: str, threads: int) -> np.ndarray:
    """One reduction on the NumPy engine or compiled, on ``threads`` threads (0: every core)."""
    os.environ["CONVDIFF_NUMBA"] = "0" if engine == "numpy" else "1"
    accel._threads = (lambda: threads) if threads else _cores
    return reduce_terms(a, b, order, np.dtype(np.float32))


_cores = accel._threads

if __name__ == "__main__":
    main()
