"""Recorded references: one compressed .npz, written atomically, read without pickle."""

from __future__ import annotations

import io
import json
import zipfile

import ml_dtypes
import numpy as np
import pytest

from convdiff.errors import InputError, OutputError
from convdiff.recording import (
    FORMAT,
    Recording,
    RecordingWriter,
    environment_changes,
    load_recording,
    match_layers,
    save_outputs,
)

ENV = {"tensorflow": "2.21.0", "onednn": True, "cpu": "Test CPU", "intra_op_threads": 0}
SETTINGS = {"order": "sequential", "fma": True, "mode": "isolated", "max_ulp": None}


@pytest.fixture
def outputs(rng) -> dict[str, np.ndarray]:
    """Layer outputs in execution order, with the names and dtypes a real run produces."""
    return {
        "conv2d": rng.standard_normal((1, 8, 8, 4)).astype(np.float32),
        "outer/dense": rng.standard_normal((1, 3)).astype(np.float16),
        "shared#2": rng.standard_normal((2, 5)).astype(ml_dtypes.bfloat16),
        "argmax": np.array([[3, 1]], dtype=np.int64),
        "a_scalar": np.array(2.5),
        "transposed": rng.standard_normal((3, 4)).astype(np.float32).T,
    }


@pytest.fixture
def inputs(rng) -> list[np.ndarray]:
    return [rng.standard_normal((1, 8, 8, 1)).astype(np.float32), np.ones((1, 2), np.float32)]


def _save(path, outputs, inputs) -> None:
    save_outputs(path, outputs, inputs, ["image", "extra"], ENV, SETTINGS)


def test_round_trip_keeps_values_dtypes_and_order(tmp_path, outputs, inputs):
    path = tmp_path / "ref.npz"
    _save(path, outputs, inputs)
    rec = load_recording(path)
    assert isinstance(rec, Recording) and rec.path == str(path)
    assert list(rec.layers) == list(outputs)
    for name, array in outputs.items():
        assert rec.layers[name].dtype == array.dtype and rec.layers[name].shape == array.shape
        np.testing.assert_array_equal(rec.layers[name], array)
    assert list(rec.inputs) == ["image", "extra"]
    np.testing.assert_array_equal(rec.inputs["image"], inputs[0])
    assert rec.environment == ENV and rec.settings == SETTINGS and rec.convdiff_version
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary file left


def test_file_is_a_plain_compressed_npz_without_pickles(tmp_path, outputs, inputs):
    path = tmp_path / "ref.npz"
    _save(path, outputs, inputs)
    with zipfile.ZipFile(path) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(
            ["meta", "input/image", "input/extra"] + [f"layer/{n}" for n in outputs]
        )
        meta = json.loads(npz["meta"].tobytes())
        assert npz["meta"].dtype == np.uint8
        assert npz["layer/shared#2"].dtype == np.uint16  # bfloat16 stored as its bits
    assert meta["format"] == FORMAT and meta["layers"] == list(outputs)
    assert meta["dtypes"]["layer/shared#2"] == "bfloat16"


def test_writer_streams_layers_and_replaces_atomically(tmp_path, inputs):
    path = tmp_path / "ref.npz"
    _save(path, {"old": np.zeros(2, np.float32)}, inputs)
    writer = RecordingWriter(path, inputs, ["image", "extra"], ENV, SETTINGS)
    with pytest.raises(RuntimeError, match="stop"), writer as rec:
        rec.add("new", np.ones(3, np.float32))
        raise RuntimeError("stop")
    # The failed write left the previous recording intact and no temporary file behind.
    assert list(load_recording(path).layers) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]
    with RecordingWriter(path, inputs, ["image", "extra"], ENV, SETTINGS) as rec:
        rec.add("new", np.ones(3, np.float32))
        with pytest.raises(ValueError, match="recorded twice"):
            rec.add("new", np.ones(3, np.float32))
    assert list(load_recording(path).layers) == ["new"]


def test_unwritable_targets_raise_output_error(tmp_path, inputs):
    with pytest.raises(OutputError, match=r"cannot write .*missing"):
        _save(tmp_path / "missing" / "ref.npz", {}, inputs)
    with pytest.raises(ValueError, match="plain array"):
        _save(tmp_path / "obj.npz", {"x": np.array([object()])}, inputs)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad files


def _corrupt_member(path) -> None:
    """Flip bytes in the middle of the largest compressed member's data."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.compress_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 40
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _npz(path, **arrays) -> None:
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b"not a zip at all" * 10), "cannot read recording"),
        (lambda p: np.save(p.open("wb"), np.ones(3)), "holds a single array"),
        (lambda p: _npz(p, x=np.ones(3)), "has no 'meta' entry"),
        (lambda p: _npz(p, meta=np.frombuffer(b"{not json", np.uint8)), "unreadable 'meta'"),
        (lambda p: _npz(p, meta=np.array(["text"])), "unreadable 'meta'"),
        (
            lambda p: _npz(p, meta=np.frombuffer(json.dumps({"format": "x"}).encode(), np.uint8)),
            "not a convdiff recording",
        ),
        (
            lambda p: _npz(p, **{"meta": np.array([object()], dtype=object)}),
            "cannot read recording",
        ),
    ],
)
def test_bad_files_raise_input_error(tmp_path, make, fragment):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(InputError, match=fragment):
        load_recording(path)


def test_truncated_and_corrupt_recordings_raise_input_error(tmp_path, outputs, inputs):
    path = tmp_path / "ref.npz"
    _save(path, outputs, inputs)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="cannot read recording"):
        load_recording(path)
    path.write_bytes(whole)
    _corrupt_member(path)
    with pytest.raises(InputError, match="cannot read recording"):
        load_recording(path)


def test_meta_listing_a_missing_layer_is_incomplete(tmp_path, inputs):
    path = tmp_path / "ref.npz"
    _save(path, {"a": np.ones(2, np.float32)}, inputs)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta["layers"].append("ghost")
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(InputError, match="incomplete: 'meta' lists 'layer/ghost'"):
        load_recording(path)


# --------------------------------------------------------------------------- matching


def test_match_layers_lists_both_sides_unmatched(tmp_path, outputs, inputs):
    path = tmp_path / "ref.npz"
    _save(path, outputs, inputs)
    rec = load_recording(path)
    current = ["conv2d", "new_layer", "argmax", "outer/dense"]
    matched, only_recorded, only_current = match_layers(rec, current)
    assert matched == ["conv2d", "argmax", "outer/dense"]
    assert only_recorded == ["shared#2", "a_scalar", "transposed"]
    assert only_current == ["new_layer"]
    assert match_layers(rec, list(outputs)) == (list(outputs), [], [])


def test_environment_changes_name_each_difference():
    current = {**ENV, "tensorflow": "2.22.0", "gpu": "H100"}
    assert environment_changes(ENV, current) == [
        "tensorflow 2.21.0 -> 2.22.0",
        "gpu (not recorded) -> H100",
    ]
    assert environment_changes(ENV, ENV) == []
