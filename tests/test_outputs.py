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


def test_written_files_get_the_permissions_of_a_new_file(tmp_path):
    import os

    from convdiff.outputs import write_atomic

    umask = os.umask(0o022)
    try:
        write_atomic(str(tmp_path / "report.json"), b"{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left
