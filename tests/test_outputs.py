"""Output files: JSON that stays JSON, whatever the figures hold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from convdiff.outputs import json_safe


def test_json_safe_values_are_strict_json():
    value = {
        "inf": math.inf,
        "minus": -math.inf,
        "nan": math.nan,
        "f32": np.float32(np.inf),
        "i64": np.int64(7),
        "path": Path("a/b"),
        3: (1.5, np.float64(math.nan)),
    }
    text = json.dumps(json_safe(value), allow_nan=False)  # raises on NaN or Infinity tokens
    assert json.loads(text) == {
        "inf": "inf",
        "minus": "-inf",
        "nan": "nan",
        "f32": "inf",
        "i64": 7,
        "path": "a/b",
        "3": [1.5, "nan"],
    }
