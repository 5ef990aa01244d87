"""How much a layer-by-layer diff costs compared with running the model: one run, one machine.

    python benchmarks/speed.py              # all cases (several minutes on 2 cores)
    python benchmarks/speed.py --quick      # the one-layer example and MobileNetV2 only
    python benchmarks/speed.py --case ResNet50:8 --html   # one case, and the cost of --html
    python benchmarks/speed.py --case ResNet50:1 --auto     # auto's first run, and sequential
    python benchmarks/speed.py --profile    # also convdiff's seconds per phase (its --profile)

For each case, in separate processes (so peak memory is each one's own):
  baseline  import TensorFlow, load the saved model, one forward pass returning every layer's
            output (a Keras model whose outputs are all layer outputs);
  convdiff  the same model and input through convdiff with default settings (the order
            auto, reading the trees the untimed first run below revealed, as a user's every
            run after the first), and with --order blas (and on ResNet50 batch 1 with
            --order all: every candidate order on every layer);
  html      (with --html) default settings writing the --html report, whose size is printed.
  auto      (with --auto) auto's first run, from an empty cache of revealed trees, and a run
            in the sequential order (no revealing; the default before 0.3): the cost of
            revealing, and of adding in the trees found.
Before a case's measurements one untimed convdiff run of each kind compiles what the cache of
compiled kernels (the user's) lacks for it, so that no timed run includes the compiler (a
once-per-installation cost), and the default one reveals the model's trees into a tree cache
of this benchmark's own.
Each measurement runs --repeat times (default 3), the kinds interleaved, and the median wall
time and the largest peak resident memory are printed, with each convdiff figure as a ratio
to the baseline. With --profile each convdiff run also reports its seconds per phase (convdiff's
own --profile), printed as medians under the case's line.

The convdiff measured is this checkout's. Its bytecode is written first, as pip writes an
installed package's: without it (PYTHONDONTWRITEBYTECODE set) every run compiles convdiff's
modules from source, some 0.12 s that no installed copy spends.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convdiff.cachedir import cache_dir  # noqa: E402

BUILD = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    name, batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    keras.utils.set_random_seed(0)
    if name == "one_layer":
        model = keras.saving.load_model(os.path.join(%(root)r, "examples", "one_layer.keras"))
        shape = (64, 64, 1)
    else:
        model = getattr(keras.applications, name)(weights=None, input_shape=(224, 224, 3))
        shape = (224, 224, 3)
        rng = np.random.default_rng(1)
        for layer in model.layers:
            if type(layer).__name__ == "BatchNormalization":
                w = layer.get_weights()
                n = w[0].shape[0]
                layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n),
                                   rng.normal(0, 0.2, n), rng.uniform(0.5, 2, n)])
    model.save(out + ".keras")
    np.save(out + ".npy", np.random.default_rng(0).standard_normal((batch, *shape)).astype("f4"))
    """
) % {"root": str(ROOT)}

BASELINE = textwrap.dedent(
    """
    import os, resource, sys, time
    t0 = time.perf_counter()
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    model = keras.saving.load_model(sys.argv[1])
    x = np.load(sys.argv[2])
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    taps = keras.Model(model.inputs, [l.output for l in layers])
    outputs = [np.asarray(o) for o in taps(x, training=False)]
    seconds = time.perf_counter() - t0
    print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """
)

# The console command's own entry (cli.main, as `convdiff` runs it), timed up to its atexit
# functions: it then ends the process without the interpreter's teardown.
CONVDIFF = textwrap.dedent(
    """
    import atexit, resource, sys, time
    t0 = time.perf_counter()
    def done():
        seconds = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(seconds, rss, file=sys.stderr)
    atexit.register(done)
    from convdiff.cli import main
    main(sys.argv[1:] + ["--quiet"])
    """
)


def measure(code: str, *args: str, stream: str = "stdout") -> tuple[float, int, dict]:
    """Wall seconds, peak resident bytes and (with --profile) convdiff's seconds per phase."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=ROOT,  # this checkout's convdiff (first on a -c run's path)
    )
    if proc.returncode not in (0, 1):  # 1: a layer diverged or went over budget, still timed
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    line = (proc.stdout if stream == "stdout" else proc.stderr).strip().splitlines()[-1]
    seconds, rss = line.split()
    profile = re.search(r"^Profile \(seconds\): (.*)$", proc.stderr, re.MULTILINE)
    phases = {} if profile is None else dict(re.findall(r"(\w+) (\d+\.\d+)", profile[1]))
    return float(seconds), int(rss), {name: float(s) for name, s in phases.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each measurement, interleaved; the median is reported (default 3)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--case",
        action="append",
        metavar="MODEL:BATCH",
        help="only these cases (repeatable), e.g. ResNet50:8",
    )
    parser.add_argument("--html", action="store_true", help="also time writing --html")
    parser.add_argument(
        "--auto",
        action="store_true",
        help="also time auto's first run (no revealed trees cached) and --order sequential",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print convdiff's median seconds per phase"
    )
    args = parser.parse_args()
    cases = [("one_layer", 1), ("MobileNetV2", 1)]
    if not args.quick:
        cases += [("ResNet50", 1), ("ResNet50", 8)]
    if args.case:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.case]
    compileall.compile_dir(str(ROOT / "convdiff"), quiet=1)  # as pip does at install
    with tempfile.TemporaryDirectory() as tmp:
        page = os.path.join(tmp, "report.html")
        profile = ["--profile"] if args.profile else []
        runs = {
            "baseline": (BASELINE, [], "stdout"),
            "default": (CONVDIFF, profile, "stderr"),
            "blas": (CONVDIFF, ["--order", "blas", *profile], "stderr"),
            "all": (CONVDIFF, ["--order", "all", *profile], "stderr"),
        }
        if args.html:
            runs["html"] = (CONVDIFF, ["--html", page, *profile], "stderr")
        if args.auto:
            # "auto_first" starts each time from an empty tree cache (the compiled chains'
            # own cache stays); the default runs after it read what it stored
            runs["auto_first"] = (CONVDIFF, profile, "stderr")
            runs["sequential"] = (CONVDIFF, ["--order", "sequential", *profile], "stderr")
        # compiled code as a user has it after the first run (the compiled kernels' machine
        # code in the user's cache directory, warmed below); revealed trees in a cache of this
        # run's own
        numba_cache = cache_dir("numba")
        if numba_cache is not None:
            os.environ.setdefault("NUMBA_CACHE_DIR", str(numba_cache))
        os.environ["CONVDIFF_CACHE_DIR"] = os.path.join(tmp, "cache")
        rows = [_case(name, batch, runs, args.repeat, tmp, page) for name, batch in cases]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _case(name: str, batch: int, runs: dict, repeat: int, tmp: str, page: str) -> dict:
    """Build the case's model and input, measure every run kind, print one line (and the
    phases' medians under it)."""
    # --order all (every candidate order on every layer) on ResNet50 batch 1 only
    runs = {k: v for k, v in runs.items() if k != "all" or (name, batch) == ("ResNet50", 1)}
    stem = os.path.join(tmp, f"{name}_{batch}")
    subprocess.run([sys.executable, "-c", BUILD, name, str(batch), stem], check=True)
    model, inputs = stem + ".keras", stem + ".npy"
    # One untimed run of each kind first: it compiles whatever the compiled code's cache
    # lacks for that kind (once per installation: each order and option calls compiled code
    # of its own, and a measured run would time numba's compiler, not convdiff); the default
    # run reveals the trees the later default runs read.
    for label, (code, extra, stream) in runs.items():
        if code is CONVDIFF and label != "auto_first":
            measure(code, model, inputs, *extra, stream=stream)
    # Interleaved rounds: a slow spell of a shared machine hits every label alike.
    samples: dict[str, list[tuple[float, int, dict]]] = {label: [] for label in runs}
    for _ in range(repeat):
        for label, (code, extra, stream) in runs.items():
            if label == "auto_first":
                shutil.rmtree(os.path.join(tmp, "cache", "trees"), ignore_errors=True)
            samples[label].append(measure(code, model, inputs, *extra, stream=stream))
    row: dict = {"model": name, "batch": batch, "repeat": repeat}
    for label, values in samples.items():
        row[f"{label}_s"] = statistics.median(s for s, _, _ in values)
        row[f"{label}_rss"] = max(rss for _, rss, _ in values)
        if values[0][2]:
            row[f"{label}_phases"] = {
                phase: statistics.median(p[phase] for _, _, p in values) for phase in values[0][2]
            }
    base_s, base_rss = row["baseline_s"], row["baseline_rss"]
    line = (
        f"{name:12s} batch {batch}: baseline {base_s:6.1f} s {base_rss / 2**30:5.2f} GiB | "
        f"convdiff {row['default_s']:6.1f} s (x{row['default_s'] / base_s:4.2f}) "
        f"{row['default_rss'] / 2**30:5.2f} GiB (x{row['default_rss'] / base_rss:3.1f}) | "
        f"--order blas {row['blas_s']:6.1f} s (x{row['blas_s'] / base_s:4.2f}) "
        f"{row['blas_rss'] / 2**30:5.2f} GiB (x{row['blas_rss'] / base_rss:3.1f})"
    )
    if "all" in runs:
        line += (
            f" | --order all {row['all_s']:6.1f} s (x{row['all_s'] / base_s:4.2f}) "
            f"{row['all_rss'] / 2**30:5.2f} GiB (x{row['all_rss'] / base_rss:3.1f})"
        )
    if "html" in runs:
        row["html_page_bytes"] = os.path.getsize(page)
        line += (
            f" | --html {row['html_s']:6.1f} s (x{row['html_s'] / row['default_s']:4.2f} of "
            f"default) {row['html_rss'] / 2**30:5.2f} GiB, page "
            f"{row['html_page_bytes'] / 2**20:.2f} MiB"
        )
    print(line, flush=True)
    if "auto_first" in runs:
        print(_auto_line(row), flush=True)
    for label in runs:
        if f"{label}_phases" in row:
            text = ", ".join(f"{p} {s:.1f}" for p, s in row[f"{label}_phases"].items())
            print(f"    {label} seconds: {text}", flush=True)
    return row


def _auto_line(row: dict) -> str:
    """The order auto's figures, first run and cached (the default run), against the baseline
    and against a run in the sequential order."""
    base_s, sequential_s = row["baseline_s"], row["sequential_s"]
    parts = [f"--order sequential {sequential_s:6.1f} s (x{sequential_s / base_s:4.2f})"]
    for label, name in (("auto_first", "auto's first run"), ("default", "cached")):
        seconds = row[f"{label}_s"]
        parts.append(
            f"{name} {seconds:6.1f} s (x{seconds / base_s:4.2f}; "
            f"x{seconds / sequential_s:4.2f} of sequential)"
        )
    peak = row["auto_first_rss"] / 2**30
    return f"{'':12s} {', '.join(parts)}; peak of the first run {peak:5.2f} GiB"


if __name__ == "__main__":
    main()
