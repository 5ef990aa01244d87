"""Fuzz the loaders: mutated .npy/.npz/.h5/.keras files and SavedModel directories (one of their
files truncated at a random offset, random bits flipped, headers overwritten, random chunks
replaced) must each load or give a clean ConvdiffError naming the file; never another
exception, never a crash, never a hang.

Each load runs in a worker process that answers one case at a time: a case that takes longer
than CASE_TIMEOUT_S (a hang) or kills the worker (a crash in libhdf5 or zlib) is recorded as a
failure and the worker is restarted. Seeded: the same mutations every run.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from support import keras2_writer

SEED = 20261127
MODEL_MUTATIONS = 80
ARRAY_MUTATIONS = 120
CASE_TIMEOUT_S = 30.0
# The loader reads a model file in a child process it kills after this long (libhdf5 loops
# forever on some damaged files); lowered from its default so that such a case costs seconds.
PROBE_TIMEOUT_S = 4.0
SPECS = [{"name": "x", "shape": [None, 6, 6, 2], "dtype": "float32"}]

_WORKER = textwrap.dedent(
    """
    import json, sys, traceback
    import convdiff.inputs as inputs
    import convdiff.loading as loading
    import convdiff.modelfile as modelfile
    from convdiff.errors import ConvdiffError

    modelfile.PROBE_TIMEOUT_S = float(sys.argv[1])
    specs = [inputs.InputSpec(s["name"], tuple(s["shape"]), s["dtype"])
             for s in json.loads(sys.argv[2])]
    # Keras and TensorFlow imported before the first case, as the loader would import them:
    # a case's time limit then measures the case, not TensorFlow's import (tens of seconds
    # on a loaded machine).
    from convdiff.runtime import configure_tensorflow
    configure_tensorflow()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        try:
            if case["kind"] == "model":
                loading.load_model(case["path"])
            else:
                inputs.load_inputs(case["path"], specs)
            answer = {"outcome": "loaded", "message": ""}
        except ConvdiffError as exc:
            answer = {"outcome": "error", "message": str(exc)}
        except BaseException:
            answer = {"outcome": "exception", "message": traceback.format_exc()}
        print(json.dumps(answer), flush=True)
    """
)


@dataclass
class Case:
    path: Path
    kind: str  # "model" or "input"
    mutation: str


class Worker:
    """A process that loads one file per request, restarted after a hang or a crash."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.selector = selectors.DefaultSelector()

    def start(self) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        args = [sys.executable, "-c", _WORKER, str(PROBE_TIMEOUT_S), json.dumps(SPECS)]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.process.stdout, selectors.EVENT_READ)
        assert json.loads(self._read_line(120.0) or "{}").get("ready"), "worker did not start"

    def _read_line(self, timeout: float) -> str | None:
        if not self.selector.select(timeout):
            return None
        return self.process.stdout.readline()

    def load(self, case: Case) -> tuple[str, str]:
        if self.process is None:
            self.start()
        self.process.stdin.write(json.dumps({"path": str(case.path), "kind": case.kind}) + "\n")
        self.process.stdin.flush()
        line = self._read_line(CASE_TIMEOUT_S)
        if line is None:
            self.stop()
            return "hang", f"no answer within {CASE_TIMEOUT_S} s"
        if not line:
            code = self.process.wait()
            self.stop()
            return "crash", f"the worker died (exit status {code})"
        answer = json.loads(line)
        return answer["outcome"], answer["message"]

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            # close the pipes now: left to the garbage collector, they raise a ResourceWarning
            # inside whichever later test happens to collect them
            self.selector.close()
            for pipe in (self.process.stdin, self.process.stdout):
                pipe.close()
            self.process = None


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random damage: a truncation, flipped bits, an overwritten header or a replaced
    chunk (near the end too, where a zip keeps its directory)."""
    out = bytearray(data)
    kind = rng.choice(["truncate", "flip", "header", "chunk", "tail"])
    if kind == "truncate":
        cut = rng.randrange(1, len(out))
        return bytes(out[:cut]), f"truncate at {cut}"
    if kind == "flip":
        spots = [rng.randrange(len(out)) for _ in range(rng.randint(1, 16))]
        for spot in spots:
            out[spot] ^= 1 << rng.randrange(8)
        return bytes(out), f"flip bits at {spots}"
    if kind == "header":
        start, n = rng.randrange(min(512, len(out))), rng.randint(1, 64)
    elif kind == "chunk":
        start, n = rng.randrange(len(out)), rng.randint(1, 256)
    else:
        start, n = max(0, len(out) - rng.randint(1, 128)), rng.randint(1, 32)
    n = min(n, len(out) - start)
    out[start : start + n] = bytes(rng.randrange(256) for _ in range(n))
    return bytes(out), f"overwrite {n} bytes at {start}"


_KERAS2_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tf_keras as k
    m = k.Sequential([k.Input((6, 6, 2)), k.layers.Conv2D(3, 3), k.layers.BatchNormalization(),
                      k.layers.Flatten(), k.layers.Dense(4)])
    for name in ("keras2.h5", "keras2.keras", "keras2_savedmodel"):
        m.save(sys.argv[1] + "/" + name)
    """
)
keras2_writer("fuzz", _KERAS2_SCRIPT)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, keras2_files) -> dict[str, Path]:
    """Healthy files to damage: Keras 3 .keras and .h5, Keras 2 .h5, .keras and SavedModel,
    .npy, .npz."""
    import keras

    d = tmp_path_factory.mktemp("fuzz_seeds")
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            layers.Conv2D(3, 3),
            layers.BatchNormalization(),
            layers.Flatten(),
            layers.Dense(4),
        ]
    )
    model.save(d / "model.keras")
    model.save(d / "model.h5")
    x = np.random.default_rng(1).standard_normal((1, 6, 6, 2)).astype(np.float32)
    np.save(d / "x.npy", x)
    np.savez(d / "x.npz", x=x)
    np.savez_compressed(d / "xc.npz", x=x)
    return {p.name: p for directory in (d, keras2_files("fuzz")) for p in directory.iterdir()}


# The files of a SavedModel that convdiff reads (saved_model.pb, the traced graph, is not read).
SAVEDMODEL_PARTS = (
    "keras_metadata.pb",
    "variables/variables.index",
    "variables/variables.data-00000-of-00001",
)


def _cases(seeds: dict[str, Path], directory: Path) -> list[Case]:
    rng = random.Random(SEED)
    models = ["model.keras", "model.h5", "keras2.h5", "keras2.keras", "keras2_savedmodel"]
    plan = [
        (models, "model", MODEL_MUTATIONS),
        (["x.npy", "x.npz", "xc.npz"], "input", ARRAY_MUTATIONS),
    ]
    cases = []
    for names, kind, count in plan:
        for i in range(count):
            seed = seeds[names[i % len(names)]]
            path = directory / f"{i:03d}_{seed.name}"
            target, label = path, seed.name
            if seed.is_dir():  # a SavedModel: one of its files is damaged
                shutil.copytree(seed, path)
                part = rng.choice(SAVEDMODEL_PARTS)
                target, label = path / part, f"{seed.name}/{part}"
            data, mutation = mutate((seed / part if seed.is_dir() else seed).read_bytes(), rng)
            target.write_bytes(data)
            cases.append(Case(path, kind, f"{label}: {mutation}"))
    return cases


def test_mutated_files_load_or_fail_cleanly(seeds, tmp_path):
    cases = _cases(seeds, tmp_path)
    worker = Worker()
    outcomes: dict[str, int] = {}
    failures = []
    started = time.monotonic()
    try:
        for case in cases:
            outcome, message = worker.load(case)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome not in ("loaded", "error"):
                failures.append(f"{case.mutation} -> {outcome}:\n{message}")
            elif outcome == "error" and str(case.path) not in message:
                failures.append(f"{case.mutation} -> error not naming the file: {message}")
    finally:
        worker.stop()
    elapsed = time.monotonic() - started
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n\n" + "\n\n".join(
        failures[:5]
    )
    # The mutations reach the loaders' error paths, not just harmless bytes.
    assert outcomes.get("error", 0) >= len(cases) // 2, outcomes
    print(f"{len(cases)} mutated files in {elapsed:.1f} s: {outcomes}")
