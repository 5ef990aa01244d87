"""How long naming a divergent layer's likely mistake takes, against one comparison of it.

    python benchmarks/explain_speed.py              # the one-layer example, 5 repeats
    python benchmarks/explain_speed.py --repeat 9

On the bundled one-layer example (the seed model: Conv2D, 32 filters 3x3 'same' ReLU on a
64x64x1 input), ``explain.likely_cause`` is given an output that no hypothesis explains
(standard-normal noise), so that every hypothesis runs. The baseline is one run of convdiff's
own kernel on the layer, with its rounding bound: in the BLAS order (the order the hypotheses
are evaluated in) and in the default order (what a comparison of the layer costs). Each figure
is the median of ``--repeat`` runs in this one process, printed in seconds and as a ratio to
the baselines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _median_seconds(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import keras
    import numpy as np

    from convdiff.evaluate import run_kernel
    from convdiff.explain import hypotheses, likely_cause
    from convdiff.graph import layer_spec
    from convdiff.kernels import find_kernel
    from convdiff.orders import Order

    model = keras.saving.load_model(ROOT / "examples" / "one_layer.keras", compile=False)
    x = np.load(ROOT / "examples" / "one_layer_input.npy")
    layer = model.layers[-1]
    spec = layer_spec(layer)
    kernel = find_kernel(type(layer), vars(keras.layers))
    garbage = np.random.default_rng(0).standard_normal(layer.compute_output_shape(x.shape))
    garbage = garbage.astype(np.float32)
    count = len(list(hypotheses(spec, [x])))

    def explain() -> None:
        assert likely_cause(kernel, spec, [x], garbage) is None, "garbage was explained"

    explain_s = _median_seconds(explain, args.repeat)
    blas_s = _median_seconds(lambda: run_kernel(kernel, spec, [x], Order(name="blas")), args.repeat)
    default_s = _median_seconds(lambda: run_kernel(kernel, spec, [x], Order()), args.repeat)
    print(f"layer: {layer.name} ({type(layer).__name__}), input {x.shape}, {count} hypotheses")
    print(f"kernel run, blas order:    {blas_s:8.3f} s")
    print(f"kernel run, default order: {default_s:8.3f} s")
    print(
        f"likely_cause, none fits:   {explain_s:8.3f} s  "
        f"= {explain_s / blas_s:.1f} x the blas run, {explain_s / default_s:.2f} x the default run"
    )


if __name__ == "__main__":
    main()
