"""GPU check: the examples on CPU and on GPU, with TF32 off and on, in one run.

    python benchmarks/gpu_check.py            # needs an NVIDIA GPU and a CUDA build of TF

Prints, per example and setting, the status counts and the largest ULP figures against the
NumPy side, and the largest ULP difference between the CPU and GPU Keras outputs. Each setting
runs in its own process (TensorFlow's TF32 and device choice are process-wide).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [
    ("one_layer", ROOT / "examples/one_layer.h5", ROOT / "examples/one_layer_input.npy"),
    ("deep8", ROOT / "examples/deep8.keras", ROOT / "examples/deep8_input.npy"),
]
SETTINGS = [
    ("cpu", ["--device", "cpu"]),
    ("gpu tf32 off", ["--device", "gpu", "--no-tf32"]),
    ("gpu tf32 on", ["--device", "gpu", "--tf32"]),
]


def run(model: Path, inputs: Path, flags: list[str]) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "convdiff",
            str(model),
            str(inputs),
            "--json",
            "-",
            "--mode",
            "isolated",
            *flags,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == 2:
        raise SystemExit(proc.stderr.strip())
    return json.loads(proc.stdout)


def main() -> None:
    card = None
    for name, model, inputs in EXAMPLES:
        for label, flags in SETTINGS:
            report = run(model, inputs, flags)
            card = card or report["environment"].get("device_name")
            worst = max((layer["max_ulp"] or 0 for layer in report["layers"]), default=0)
            ratio = max(
                (float(layer["bound_ratio"] or 0) for layer in report["layers"]), default=0.0
            )
            print(
                f"{name:10s} {label:14s} counts={report['counts']} max_ulp={worst:,} "
                f"max_bound_ratio={ratio:.3g}"
            )
    print(f"GPU: {card}")


if __name__ == "__main__":
    main()
