"""Which named summation orders reproduce TensorFlow bit for bit, layer by layer.

For ResNet50 and MobileNetV2 (keras.applications, weights=None, 224x224, seeded random input,
random BatchNormalization statistics) and for every Conv2D, DepthwiseConv2D and Dense layer,
this runs ``convdiff.api.compare`` (isolated mode) once per named order and records which
orders give ``max_ulp == 0``. Layers that no fixed order reproduces get a search over
``blocked:K`` (K a multiple of 8): candidate chunk sizes are tested on a sample of output
elements against TensorFlow's raw convolution / matmul, and each chunk size found is then
confirmed by ``compare`` on those layers. Each oneDNN setting runs in a subprocess, because
``TF_ENABLE_ONEDNN_OPTS`` must be set before TensorFlow is imported.

``--probe`` instead reveals the summation tree of one convolution directly (FPRev-style): all
inputs 1, all weights 1 except ``+2**40`` at reduction term ``i`` and ``-2**40`` at term ``j``
(one output channel per ``j``). A one added to a partial sum holding ``2**40`` vanishes, so
the output at an interior pixel counts the ones outside the smallest subtree holding both
terms; the runs of that subtree's size over ``j`` show where chains start and where partial
sums meet.

Usage:
    python benchmarks/reproduce_orders.py                      # both models, oneDNN on and off
    python benchmarks/reproduce_orders.py --models ResNet50 --onednn off --json out.json
    python benchmarks/reproduce_orders.py --probe 1,1,1024,256,14 --onednn on --term 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import numpy as np

CLASSES = ("Conv2D", "DepthwiseConv2D", "Dense")
AUTO_CLASSES = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense")
# "NAME/nofma": the order with multiply and add rounded apart (compare(..., fma=False)).
FIXED_ORDERS = (
    "sequential",
    "sequential/nofma",
    "eigen",
    "reverse",
    "pairwise",
    "kahan",
    "blas",
    "float64",
    "exact",
)
SEARCH_SAMPLES = 256


# --------------------------------------------------------------------------- worker side


# A Dense-heavy stand-in for a trained MLP: widths that are and are not multiples of the
# vector width, relu between layers, a linear head.
MLP_WIDTHS = (512, 300, 256, 100, 37, 10)
MLP_INPUT = 784


def build(model_name: str, size: int = 224) -> tuple[Any, np.ndarray]:
    """The model with random weights and random BatchNormalization statistics, and an input.

    ``model_name`` is a ``keras.applications`` name (built offline with ``weights=None`` at
    ``size`` x ``size``, the classifier left linear so that the whole Dense layer can read
    ``identical``) or ``MLP`` (:data:`MLP_WIDTHS`)."""
    import keras

    keras.utils.set_random_seed(0)
    if model_name == "MLP":
        layers = [keras.Input((MLP_INPUT,))]
        for i, width in enumerate(MLP_WIDTHS):
            last = i == len(MLP_WIDTHS) - 1
            layers.append(keras.layers.Dense(width, activation=None if last else "relu"))
        model = keras.Sequential(layers, name="MLP")
        x = np.random.default_rng(1).standard_normal((1, MLP_INPUT)).astype("float32")
        return model, x
    model = getattr(keras.applications, model_name)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = (w.shape for w in layer.get_weights())
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma).astype("float32"),
                    rng.normal(0.0, 0.2, beta).astype("float32"),
                    rng.normal(0.0, 0.2, mean).astype("float32"),
                    rng.uniform(0.5, 1.5, var).astype("float32"),
                ]
            )
    x = np.random.default_rng(1).standard_normal((1, size, size, 3)).astype("float32")
    return model, x


def compare_orders(model: Any, x: np.ndarray, orders: list[str], layers) -> dict:
    """``{layer: {"class": ..., "orders": {order: max_ulp}}}`` for each order."""
    from convdiff.api import compare

    table: dict[str, dict] = {}
    for order in orders:
        started = time.perf_counter()
        name, _, variant = order.partition("/")
        report = compare(model, x, order=name, fma=variant != "nofma", layers=layers)
        seconds = time.perf_counter() - started
        print(f"  {order:<14} {seconds:6.1f} s", file=sys.stderr, flush=True)
        for result in report.layers:
            if result.class_name not in CLASSES or result.comparison is None:
                continue
            row = table.setdefault(result.name, {"class": result.class_name, "orders": {}})
            row["orders"][order] = int(result.comparison.max_ulp)
    return table


class _Capture:
    """Runs a kernel with convdiff's rounded arithmetic and keeps its reduction operands."""

    def __init__(self, dtype: Any) -> None:
        from convdiff.numerics import Rounded

        outer = self

        class Capturing(Rounded):
            def dot(self, a, b=None, axes="k"):
                outer.operands = self._nest(a, b, axes)
                return super().dot(a, b, axes)

        self.nx = Capturing(dtype)
        self.operands: tuple[np.ndarray, np.ndarray | None] | None = None


def _raw_tensorflow(layer: Any, x: np.ndarray) -> np.ndarray:
    """TensorFlow's reduction alone (no bias, no activation), as the layer computes it."""
    import keras

    ops = keras.ops
    cfg = layer.get_config()
    if isinstance(layer, keras.layers.Dense):
        y = ops.matmul(x, layer.kernel)
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        y = ops.depthwise_conv(
            x,
            layer.kernel,
            cfg["strides"],
            cfg["padding"],
            cfg["data_format"],
            cfg["dilation_rate"],
        )
    else:
        y = ops.conv(
            x,
            layer.kernel,
            cfg["strides"],
            cfg["padding"],
            cfg["data_format"],
            cfg["dilation_rate"],
        )
    return np.asarray(ops.convert_to_numpy(y))


def _gather(x: np.ndarray, shape: tuple[int, ...], index: tuple[np.ndarray, ...]) -> np.ndarray:
    """The terms of the sampled output elements: ``(K, samples)`` from broadcasting ``x``."""
    tail = (1,) * (len(shape) + 1 - x.ndim) + x.shape[1:]
    x = x.reshape(x.shape[0], *tail)
    picks = tuple(np.zeros_like(i) if n == 1 else i for i, n in zip(index, tail, strict=True))
    return x[(slice(None), *picks)]


def search_reduction(model: Any, x: np.ndarray, names: list[str], orders: list[str]) -> dict:
    """For each layer, which orders reproduce TensorFlow's raw reduction (the convolution or
    matmul alone, before bias and activation): the fixed ``orders`` on every output element,
    and ``blocked:K`` for every K (a multiple of 8) on a sample of output elements."""
    import keras

    from convdiff.graph import layer_spec
    from convdiff.kernels import find_kernel
    from convdiff.orders import Order, parse_order, reduce_terms

    layers = [model.get_layer(name) for name in names]
    if not layers:
        return {}
    inputs = keras.Model(model.inputs, [layer.input for layer in layers])(x)
    inputs = inputs if isinstance(inputs, list) else [inputs]
    found: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    for layer, value in zip(layers, inputs, strict=True):
        value = np.asarray(value)
        spec = layer_spec(layer)
        capture = _Capture(spec.dtype)
        find_kernel(type(layer), vars(keras.layers))(spec, [value], capture.nx)
        a, b = capture.operands
        shape = np.broadcast_shapes(a.shape[1:], b.shape[1:])
        raw = _raw_tensorflow(layer, value)
        dtype = np.dtype(raw.dtype)
        fixed = []
        for order in orders:
            name, _, variant = order.partition("/")
            got = reduce_terms(a, b, parse_order(name, fma=variant != "nofma"), dtype)
            if np.array_equal(got.reshape(-1), raw.reshape(-1)):
                fixed.append(order)
        flat = rng.integers(0, raw.size, SEARCH_SAMPLES)
        index = np.unravel_index(flat, shape)
        ga, gb = _gather(a, shape, index), _gather(b, shape, index)
        want = raw.reshape(-1)[flat]
        blocks = [
            block
            for block in range(8, a.shape[0], 8)
            if np.array_equal(reduce_terms(ga, gb, Order(name="blocked", block=block), dtype), want)
        ]
        found[layer.name] = {"orders": fixed, "blocked": blocks[:8]}
        print(f"  search {layer.name}: {fixed} blocked {blocks[:8]}", file=sys.stderr, flush=True)
    return found


def worker(setting: str, models: list[str], orders: list[str]) -> dict:
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if setting == "on" else "0"
    from convdiff.runtime import configure_tensorflow

    configure_tensorflow()
    import tensorflow as tf

    out: dict[str, Any] = {"setting": setting, "tensorflow": tf.__version__, "models": {}}
    for model_name in models:
        print(f"{model_name} oneDNN {setting}", file=sys.stderr, flush=True)
        model, x = build(*model_size(model_name))
        present = sorted({type(layer).__name__ for layer in model.layers} & set(CLASSES))
        table = compare_orders(model, x, orders, present)
        unresolved = [n for n, row in table.items() if 0 not in row["orders"].values()]
        found = search_reduction(model, x, unresolved, orders)
        for name, hits in found.items():
            table[name]["reduction"] = hits
        firsts = {name: hits["blocked"][:1] for name, hits in found.items()}
        for block in sorted({k for first in firsts.values() for k in first}):
            wanted = [n for n, first in firsts.items() if first == [block]]
            extra = compare_orders(model, x, [f"blocked:{block}"], wanted)
            for name, row in extra.items():
                table[name]["orders"].update(row["orders"])
        out["models"][model_name] = table
    return out


def probe(setting: str, geometry: str, term: int) -> list[list[int]]:
    """Sizes of the smallest subtree holding reduction terms ``term`` and ``j``, for every
    ``j``, as runs ``(first j, last j, first size, last size)``: constant, or growing by one
    per term (a chain: ``j`` added in order to a running sum that holds ``term``)."""
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if setting == "on" else "0"
    from convdiff.runtime import configure_tensorflow

    configure_tensorflow()
    import keras

    kh, kw, cin, cout, size, *stride = (int(v) for v in geometry.split(","))
    n = kh * kw * cin
    layer = keras.layers.Conv2D(cout, (kh, kw), strides=stride or 1, padding="same", use_bias=False)
    x = np.ones((1, size, size, cin), np.float32)
    layer.build(x.shape)
    pixel = layer.compute_output_shape(x.shape)[1] // 2  # interior: every tap sees a 1
    others = [j for j in range(n) if j != term]
    sizes: dict[int, int] = {}
    for start in range(0, len(others), cout):
        chunk = others[start : start + cout]
        w = np.ones((n, cout), np.float32)
        w[term, :] = 2.0**40
        w[chunk, range(len(chunk))] = -(2.0**40)
        layer.kernel.assign(w.reshape(kh, kw, cin, cout))
        y = np.asarray(layer(x))[0, pixel, pixel]
        sizes.update({j: n - int(y[c]) for c, j in enumerate(chunk)})
    runs: list[list[int]] = []  # [first j, last j, first size, last size]
    for j in others:
        if runs and j == runs[-1][1] + 1:
            first, last, lo, hi = runs[-1]
            growth = sizes[j] - hi
            if growth in (0, 1) and (last == first or growth == (hi > lo)):
                runs[-1][1:] = [j, lo, sizes[j]]
                continue
        runs.append([j, j, sizes[j], sizes[j]])
    return runs


def model_size(spec: str) -> tuple[str, int]:
    """``Name`` or ``Name:SIZE`` (the input's height and width; 224 by default)."""
    name, _, size = spec.partition(":")
    return name, int(size or 224)


def auto_worker(setting: str, models: list[str], batches: list[int]) -> dict:
    """``--order auto`` (no cache) on every Conv2D, DepthwiseConv2D, SeparableConv2D and Dense
    layer of each model and batch size: which layers it reproduces bit for bit, what it found
    for the others, its probe calls and its time."""
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if setting == "on" else "0"
    from convdiff.api import compare
    from convdiff.runtime import configure_tensorflow

    configure_tensorflow()
    import tensorflow as tf

    out: dict[str, Any] = {"setting": setting, "tensorflow": tf.__version__, "runs": []}
    for spec in models:
        model_name, size = model_size(spec)
        model, x1 = build(model_name, size)
        classes = sorted({type(layer).__name__ for layer in model.layers} & set(AUTO_CLASSES))
        for batch in batches:
            x = np.random.default_rng(1).standard_normal((batch, *x1.shape[1:])).astype("float32")
            started = time.perf_counter()
            report = compare(model, x, order="auto", cache=False, layers=classes)
            seconds = time.perf_counter() - started
            rows = [
                {
                    "name": r.name,
                    "class": r.class_name,
                    "status": r.status,
                    "max_ulp": None if r.comparison is None else int(r.comparison.max_ulp),
                    "found": r.order_found,
                }
                for r in report.layers
            ]
            calls = sum(r["found"]["probe_calls"] for r in rows if r["found"])
            print(
                f"  {spec} batch {batch}: {seconds:.1f} s, {calls} probe calls",
                file=sys.stderr,
                flush=True,
            )
            out["runs"].append({"model": spec, "batch": batch, "seconds": seconds, "layers": rows})
    return out


def summarize_auto(result: dict) -> str:
    """A table of layers ``identical`` (whole layer, bias and activation included) out of
    each class's count, and a line for every other layer."""
    lines = [f"## `--order auto`, oneDNN {result['setting']} (TensorFlow {result['tensorflow']})"]
    lines.append("\n| model | batch | " + " | ".join(AUTO_CLASSES) + " | probe calls | time |")
    lines.append("|---" * (len(AUTO_CLASSES) + 4) + "|")
    misses = []
    for run in result["runs"]:
        cells = []
        for cls in AUTO_CLASSES:
            rows = [r for r in run["layers"] if r["class"] == cls]
            same = sum(r["status"] == "identical" for r in rows)
            cells.append(f"{same}/{len(rows)}" if rows else "-")
            misses += [(run, r) for r in rows if r["status"] != "identical"]
        calls = sum(r["found"]["probe_calls"] for r in run["layers"] if r["found"])
        lines.append(
            f"| {run['model']} | {run['batch']} | {' | '.join(cells)} | {calls} | "
            f"{run['seconds']:.0f} s |"
        )
    for run, r in misses:
        found = r["found"] or {}
        lines.append(
            f"- {run['model']} batch {run['batch']} {r['name']} ({r['class']}): {r['status']}, "
            f"max {r['max_ulp']} ULP; {found.get('status')}: {found.get('description')}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- report side


def run_setting(setting: str, models: list[str], orders: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", setting, "--models", ",".join(models)]
    cmd += ["--orders", ",".join(orders)]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout)


def summarize(result: dict) -> str:
    lines = [f"## oneDNN {result['setting']} (TensorFlow {result['tensorflow']})"]
    for model_name, table in result["models"].items():
        classes = Counter(row["class"] for row in table.values())
        orders: list[str] = []
        for row in table.values():
            orders += [o for o in row["orders"] if o not in orders]
        lines.append(f"\n### {model_name}\n")
        header = " | ".join(f"{c} ({n})" for c, n in classes.items())
        lines.append(f"| order | {header} |")
        lines.append("|---" * (len(classes) + 1) + "|")
        for order in orders:
            counts = Counter(
                row["class"] for row in table.values() if row["orders"].get(order) == 0
            )
            cells = " | ".join(str(counts.get(c, 0)) for c in classes)
            lines.append(f"| {order} | {cells} |")
        some = Counter(row["class"] for row in table.values() if 0 in row["orders"].values())
        cells = " | ".join(f"**{some.get(c, 0)}**" for c in classes)
        lines.append(f"| some named order | {cells} |")
        lines.append("")
        for name, row in table.items():
            exact = [o for o, ulp in row["orders"].items() if ulp == 0]
            if "sequential" in exact:
                continue
            line = f"- {name} ({row['class']}): {', '.join(exact) or 'none'}"
            alone = row.get("reduction", {})
            alone = alone.get("orders", []) + [f"blocked:{k}" for k in alone.get("blocked", [])[:1]]
            if not exact and alone:
                # e.g. a softmax after the matmul differs while the reduction itself matches
                line += f" (its reduction alone: {', '.join(alone)})"
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ResNet50,MobileNetV2")
    parser.add_argument("--onednn", default="on,off", help="settings to run: on, off or both")
    parser.add_argument("--orders", default=",".join(FIXED_ORDERS))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--probe", default=None, help="KH,KW,CIN,COUT,SIZE[,STRIDE]: probe")
    parser.add_argument("--term", type=int, default=0, help="the probe's fixed term i")
    parser.add_argument("--auto", action="store_true", help="check --order auto instead")
    parser.add_argument("--batches", default="1,8", help="batch sizes for --auto")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.auto:
        return _run_auto(args)
    if args.probe:
        for first, last, lo, hi in probe(args.onednn.split(",")[0], args.probe, args.term):
            sizes = f"{lo}" if lo == hi else f"{lo}..{hi} (a chain)"
            print(f"j = {first}..{last}: subtree size {sizes}")
        return 0
    models = args.models.split(",")
    orders = args.orders.split(",")
    if args.worker:
        print(json.dumps(worker(args.worker, models, orders)))
        return 0
    results = [run_setting(s, models, orders) for s in args.onednn.split(",")]
    for result in results:
        print(summarize(result), "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _run_auto(args: argparse.Namespace) -> int:
    models, batches = args.models.split(","), [int(b) for b in args.batches.split(",")]
    if args.worker:
        print(json.dumps(auto_worker(args.worker, models, batches)))
        return 0
    results = []
    for setting in args.onednn.split(","):
        cmd = [sys.executable, __file__, "--auto", "--worker", setting, "--models", args.models]
        cmd += ["--batches", args.batches]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout))
        print(summarize_auto(results[-1]), "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
