"""Bad model and input files: each is one clean ConvdiffError naming the file and the fault,
at the library level and through the CLI (exit 2, one ``Error:`` line, no output file).

tests/test_cli.py covers the common cases (missing, empty, truncated, pickles, strings, wrong
shape, Lambda, custom objects); these are the rest.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from support import assert_error, run_cli

from convdiff import modelfile
from convdiff.errors import ConvdiffError, InputError, ModelLoadError, OutputError, ResourceError
from convdiff.inputs import InputSpec, fit_inputs, load_inputs, named_inputs
from convdiff.loading import load_model

MULTI = [InputSpec("a", (None, 4), "float32"), InputSpec("b", (None, 4), "float32")]
SINGLE = [InputSpec("x", (None, 4), "float32")]


def flip(data: bytes, start: int, n: int = 32) -> bytes:
    """Invert ``n`` bytes from ``start``."""
    out = bytearray(data)
    for i in range(start, min(start + n, len(out))):
        out[i] ^= 0xFF
    return bytes(out)


def rezip(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    """Copy a .keras archive with some members replaced (valid CRCs: only the content is bad)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for name in z.namelist():
            out.writestr(name, replace.get(name, z.read(name)))


def shrink_global_heap_free_space(data: bytes) -> bytes:
    """Shrink the free-space object of the HDF5 global heap that holds a Keras file's
    ``model_config`` string: libhdf5 then loops forever reading that attribute (found by the
    fuzz test; one byte of the free-space size, 0x630 -> 0x430, was enough)."""
    out = bytearray(data)
    heap = out.index(b"GCOL")
    end = heap + struct.unpack_from("<Q", out, heap + 8)[0]
    pos = heap + 16  # signature, version, reserved, collection size
    while pos + 16 <= end:
        index, size = (
            struct.unpack_from("<H", out, pos)[0],
            struct.unpack_from("<Q", out, pos + 8)[0],
        )
        if index == 0:  # the free space is heap object 0
            struct.pack_into("<Q", out, pos + 8, size - 0x200)
            return bytes(out)
        pos += 16 + (size + 7) // 8 * 8
    raise AssertionError("no free space in the global heap")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import keras

    d = tmp_path_factory.mktemp("loading")
    single = keras.Sequential(
        [
            keras.Input((4,), name="x"),
            keras.layers.Dense(3, name="d1"),
            keras.layers.Dense(2, name="d2"),
        ]
    )
    single.save(d / "single.keras")
    single.save(d / "single.h5")
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    multi = keras.Model([a, b], keras.layers.Add()([keras.layers.Dense(4)(a), b]))
    multi.save(d / "multi.keras")
    x = np.ones((1, 4), np.float32)
    np.save(d / "x.npy", x)
    np.savez(d / "only_a.npz", a=x)
    np.savez(d / "abc.npz", a=x, b=x, c=x)
    np.savez(d / "ab.npz", a=x, b=2 * x)
    np.savez(d / "positional.npz", x, 2 * x)
    return d


# --------------------------------------------------------------------------- inputs vs model


def test_npz_missing_input_name(files):
    with pytest.raises(InputError) as info:
        load_inputs(files / "only_a.npz", MULTI)
    message = str(info.value)
    assert "only_a.npz" in message and "missing ['b']" in message and "unexpected []" in message
    assert_error(
        run_cli(files / "multi.keras", files / "only_a.npz"), "only_a.npz", "missing ['b']"
    )


def test_npz_extra_input_name(files):
    with pytest.raises(InputError, match=r"missing \[\], unexpected \['c'\]"):
        load_inputs(files / "abc.npz", MULTI)
    assert_error(run_cli(files / "multi.keras", files / "abc.npz"), "unexpected ['c']")


def test_npz_by_name_and_by_position_both_load(files):
    by_name = load_inputs(files / "ab.npz", MULTI).arrays
    by_position = load_inputs(files / "positional.npz", MULTI).arrays
    for arrays in (by_name, by_position):
        np.testing.assert_array_equal(arrays[1], 2 * arrays[0])


def test_one_array_for_a_multi_input_model(files):
    with pytest.raises(InputError) as info:
        load_inputs(files / "x.npy", MULTI)
    assert "holds one array but the model has 2 inputs (a, b)" in str(info.value)
    assert_error(
        run_cli(files / "multi.keras", files / "x.npy"),
        "x.npy",
        "holds one array but the model has 2 inputs (a, b)",
        ".npz",
    )


def test_arrays_given_in_memory_are_checked_too():
    with pytest.raises(InputError, match="gives 1 arrays; the model has 2 inputs"):
        fit_inputs([np.ones((1, 4), np.float32)], MULTI, "the given arrays")
    with pytest.raises(InputError, match=r"missing \['b'\], unexpected \['z'\]"):
        named_inputs({"a": 1, "z": 2}, MULTI, "the given dict")
    assert named_inputs({"b": 2, "a": 1}, MULTI, "the given dict") == [1, 2]


def test_a_dict_of_arrays_with_a_missing_name(files):
    from convdiff.api import compare

    x = np.ones((1, 4), np.float32)
    with pytest.raises(InputError, match=r"missing \['b'\], unexpected \['c'\]"):
        compare(load_model(files / "multi.keras"), {"a": x, "c": x})


def test_empty_array_is_refused(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(InputError, match=r"shape \(0, 4\), which holds no values"):
        load_inputs(tmp_path / "empty.npy", SINGLE)


def test_nan_and_inf_inputs_load_with_a_note(tmp_path):
    np.save(tmp_path / "x.npy", np.array([[np.nan, np.inf, -np.inf, 1]], np.float32))
    loaded = load_inputs(tmp_path / "x.npy", SINGLE)
    assert "input 'x' holds 1 NaN and 2 infinite values" in loaded.notes


# --------------------------------------------------------------------------- damaged inputs


def test_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "raw.npy").write_bytes(pickle.dumps(Payload(), protocol=4))
    np.save(tmp_path / "objects.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objects.npz", x=np.array([Payload()], dtype=object))
    for name in ("raw.npy", "objects.npy", "objects.npz"):
        with pytest.raises(InputError, match=r"Python objects \(a pickle\); refused"):
            load_inputs(tmp_path / name, SINGLE)
    assert not marker.exists()


def test_a_file_that_is_not_numpy(tmp_path):
    (tmp_path / "x.npy").write_text("1, 2, 3, 4\n")
    with pytest.raises(InputError, match=r"is not a .npy or .npz file"):
        load_inputs(tmp_path / "x.npy", SINGLE)


def test_huge_declared_shape_is_refused_before_allocation(tmp_path):
    """A header claiming 8 TB: np.load would try to allocate it; we compare it with the file."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 2)}
    )
    (tmp_path / "huge.npy").write_bytes(buffer.getvalue() + b"\0" * 64)
    with pytest.raises(InputError, match=r"truncated .* 8,796,093,022,208 bytes of data"):
        load_inputs(tmp_path / "huge.npy", SINGLE)


def test_array_larger_than_memory_is_refused(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.ones((1000, 4), np.float32))
    monkeypatch.setenv("CONVDIFF_MEMORY_LIMIT", "1000")
    with pytest.raises(ResourceError, match=r"needs 15.6 KiB of memory but 1,000 bytes"):
        load_inputs(tmp_path / "x.npy", SINGLE)


def test_corrupt_compressed_npz(tmp_path):
    np.savez_compressed(tmp_path / "c.npz", x=np.random.default_rng(0).random((64, 4)))
    data = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(flip(data, len(data) // 3, 8))
    with pytest.raises(InputError, match=r"'.*bad.npz' is not a readable .npz archive"):
        load_inputs(tmp_path / "bad.npz", SINGLE)


def test_npz_with_a_member_that_is_not_an_array(tmp_path):
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as z:
        z.writestr("x.txt", "hello")
    with pytest.raises(InputError, match=r"'x.txt', which is not a .npy array"):
        load_inputs(tmp_path / "odd.npz", SINGLE)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.npy")
    with pytest.raises(InputError, match="is not a regular file"):
        load_inputs(tmp_path / "pipe.npy", SINGLE)


# --------------------------------------------------------------------------- damaged models


def test_corrupt_h5_structure(files, tmp_path):
    """Bytes flipped in the middle of the file, at the HDF5 B-tree nearest the middle."""
    data = (files / "single.h5").read_bytes()
    starts = [i for i in range(len(data)) if data.startswith(b"TREE", i)]
    middle = min(starts, key=lambda i: abs(i - len(data) // 2))
    path = tmp_path / "corrupt.h5"
    path.write_bytes(flip(data, middle))
    with pytest.raises(ModelLoadError, match=r"corrupt.h5' is a corrupt or truncated HDF5 file"):
        load_model(path)
    assert_error(run_cli(path, files / "x.npy"), "corrupt.h5", "corrupt or truncated HDF5 file")


def test_corrupt_keras_archive(files, tmp_path):
    data = (files / "single.keras").read_bytes()
    path = tmp_path / "corrupt.keras"
    path.write_bytes(flip(data, len(data) // 2))
    with pytest.raises(ModelLoadError, match="fails its CRC check: the file is corrupt"):
        load_model(path)
    assert_error(run_cli(path, files / "x.npy"), "corrupt.keras", "fails its CRC check")


def test_keras_archive_with_corrupt_weights_but_valid_crc(files, tmp_path):
    with zipfile.ZipFile(files / "single.keras") as z:
        weights = z.read("model.weights.h5")
    path = tmp_path / "badweights.keras"
    rezip(files / "single.keras", path, {"model.weights.h5": weights[: len(weights) // 2]})
    with pytest.raises(ModelLoadError, match=r"holds a corrupt model.weights.h5"):
        load_model(path)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (b"{{{garbage", "has an unreadable model configuration"),
        (b"\xff\xfe\x00garbage", "has an unreadable model configuration"),
        (b"[" * 100_000 + b"]" * 100_000, "unreadable model configuration"),
        (b"[1, 2, 3]", "does not hold a Keras model configuration"),
        (b'{"class_name": 7}', "does not hold a Keras model configuration"),
        (
            b'{"class_name": "Sequential", "config": {"layers": [{"config": {}}]}}',
            "malformed layer entry (number 0)",
        ),
        (b'{"class_name": "Sequential", "config": {"name": "s"}}', "without a list of layers"),
        (
            b'{"class_name": "Sequential", "config": {"layers": '
            b'[{"class_name": "Dense", "module": 5, "config": {}}]}}',
            "whose 'module' is int, not text",
        ),
        (
            b'{"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense", '
            b'"module": "keras.layers", "config": {"kernel_initializer": '
            b'{"class_name": null, "module": "mine", "config": {}}}}]}}',
            "whose 'class_name' is null",
        ),
    ],
    ids=[
        "garbage",
        "not-utf8",
        "nested",
        "list",
        "class-int",
        "no-class",
        "no-layers",
        "module",
        "class-null",
    ],
)
def test_keras_archive_with_bad_config(files, tmp_path, config, fragment):
    path = tmp_path / "badcfg.keras"
    rezip(files / "single.keras", path, {"config.json": config})
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert fragment in str(info.value) and "badcfg.keras" in str(info.value)
    assert_error(run_cli(path, files / "x.npy"), "badcfg.keras", fragment)


def test_misnamed_model_files(files, tmp_path):
    (tmp_path / "zip.h5").write_bytes((files / "single.keras").read_bytes())
    (tmp_path / "hdf5.keras").write_bytes((files / "single.h5").read_bytes())
    with pytest.raises(ModelLoadError, match=r"is a .keras archive \(zip\).*rename it to .keras"):
        load_model(tmp_path / "zip.h5")
    with pytest.raises(ModelLoadError, match=r"is an HDF5 model file.*rename it to .h5"):
        load_model(tmp_path / "hdf5.keras")


def test_hdf5_that_makes_libhdf5_loop_is_stopped(files, tmp_path, monkeypatch):
    path = tmp_path / "loops.h5"
    path.write_bytes(shrink_global_heap_free_space((files / "single.h5").read_bytes()))
    monkeypatch.setattr(modelfile, "PROBE_TIMEOUT_S", 3.0)
    with pytest.raises(ModelLoadError, match="could not be read within 3 s"):
        load_model(path)


def test_a_late_caller_gets_a_good_files_answer_however_long_it_took(tmp_path, monkeypatch):
    """The child's answer is read as it comes: a real model's configuration (ResNet50's:
    some 175 KB) fills a pipe's 64 KiB buffer, and a child left waiting on it while this
    process imports TensorFlow would have that import counted against its time limit and a
    good file reported corrupt. Here the child ends on its own, and a caller that asks for the
    answer long after the limit (a slow import) still gets it."""
    import keras

    layers = [keras.layers.Dense(2, name=f"dense_with_a_long_name_{i:03d}") for i in range(150)]
    path = tmp_path / "deep.keras"
    keras.Sequential([keras.Input((2,), name="x"), *layers]).save(path)
    monkeypatch.setattr(modelfile, "PROBE_TIMEOUT_S", 30.0)
    probe = modelfile.Probe.start(path)
    try:
        assert probe.process.wait(timeout=30) == 0  # not held up by an unread pipe
        assert len(probe.output.stdout) > 1 << 16  # more than a pipe holds
        probe.started -= 100.0  # asked for 100 s later, past the time limit
        assert probe.early() == {"needs_onednn": []}
        assert len(probe.result()["config"]["layers"]) == 151
    finally:
        probe.close()


def test_a_child_past_its_time_limit_is_stopped(files, monkeypatch):
    """A child still reading when the limit runs out (libhdf5 looping) is killed, its first
    answer is None, and the file is reported as one that could not be read in time."""
    monkeypatch.setattr(modelfile, "_PROBE_CODE", "import time; time.sleep(60)")
    monkeypatch.setattr(modelfile, "PROBE_TIMEOUT_S", 1.0)
    probe = modelfile.Probe.start(files / "single.h5")
    assert probe.early() is None
    with pytest.raises(ModelLoadError, match="could not be read within 1 s"):
        probe.result()
    assert probe.process.poll() is not None  # killed, and waited for


def test_crash_while_reading_is_a_clean_error(files, monkeypatch):
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(modelfile, "_PROBE_CODE", crash)
    with pytest.raises(ModelLoadError, match=r"made the HDF5 or zip library crash \(signal 11\)"):
        load_model(files / "single.h5")


def test_an_unexpected_failure_of_the_reader_is_a_bug_not_a_user_error(files, monkeypatch):
    monkeypatch.setattr(modelfile, "_PROBE_CODE", "raise ZeroDivisionError('bug')")
    with pytest.raises(RuntimeError, match="ZeroDivisionError: bug") as info:
        load_model(files / "single.h5")
    assert not isinstance(info.value, ConvdiffError)


def test_good_files_still_load(files):
    for name in ("single.keras", "single.h5"):
        model = load_model(files / name)
        assert [layer.name for layer in model.layers] == ["d1", "d2"]


# --------------------------------------------------------------------------- output paths


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory this process cannot write in: chmod, or for root (who ignores modes) the
    immutable attribute; skipped where neither works."""
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    immutable = False
    if os.access(d, os.W_OK):
        done = subprocess.run(["chattr", "+i", str(d)], capture_output=True, check=False)
        immutable = done.returncode == 0
    try:
        if os.access(d, os.W_OK):
            pytest.skip("cannot make a directory unwritable here")
        yield d
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        d.chmod(0o755)


@pytest.mark.parametrize("option", ["--json", "--junit", "--save-outputs"])
def test_unwritable_output_path_is_refused_before_loading(files, readonly_dir, option):
    target = readonly_dir / "report.out"
    assert_error(
        run_cli(files / "single.h5", files / "x.npy", option, target),
        "report.out",
        "permission denied",
    )
    assert list(readonly_dir.iterdir()) == []
    if option == "--save-outputs":
        return  # checked once TensorFlow is set up, still before the model is loaded
    # In a fresh process: the error comes before TensorFlow (let alone the model) is loaded.
    code = textwrap.dedent(
        f"""
        import sys
        from convdiff.cli import invoke
        try:
            invoke([{str(files / "single.h5")!r}, {str(files / "x.npy")!r},
                  {option!r}, {str(target)!r}])
        except SystemExit as exc:
            assert exc.code == 2, exc.code
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("Error: ") and len(done.stderr.splitlines()) == 1


def test_json_path_under_a_file_is_refused(files, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError):
        from convdiff.outputs import check_writable

        check_writable(str(tmp_path / "file" / "report.json"))
    assert_error(
        run_cli(files / "single.h5", files / "x.npy", "--json", tmp_path / "file" / "r.json"),
        "r.json",
    )


def test_bad_model_with_json_leaves_no_file(files, tmp_path):
    """A bad model with --json: one error line, and no JSON file is left behind."""
    (tmp_path / "bad.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    out = tmp_path / "report.json"
    assert_error(run_cli(tmp_path / "bad.h5", files / "x.npy", "--json", out), "bad.h5")
    assert not out.exists()


def test_a_probe_started_early_is_the_one_the_run_takes(examples, tmp_path):
    """The command line starts the model file's child before its slower imports; the run's
    Probe.start takes that child (already reading) instead of starting another. A path that
    cannot be a model starts nothing, and Probe.start reports it in its turn as before."""
    path = examples / "one_layer.keras"
    modelfile.start_early(str(path))
    early = modelfile._STARTED_EARLY[os.path.abspath(path)]
    probe = modelfile.Probe.start(path)
    try:
        assert probe is early and early.process is not None
        assert os.path.abspath(path) not in modelfile._STARTED_EARLY
        assert probe.early() == {"needs_onednn": []}
        assert probe.result()["class_name"] in ("Sequential", "Functional")
    finally:
        probe.close()
    # taken once: the next start is a child of its own
    again = modelfile.Probe.start(path)
    try:
        assert again is not early
    finally:
        again.close()
    missing = tmp_path / "missing.keras"
    modelfile.start_early(missing)
    assert os.path.abspath(missing) not in modelfile._STARTED_EARLY
    with pytest.raises(ModelLoadError, match=r"missing\.keras"):
        modelfile.Probe.start(missing)


def test_cli_option_errors_come_before_a_missing_model(tmp_path):
    """Starting the model's child early changes no error's order: a bad option is reported
    before a missing model file, one Error line, exit 2."""
    result = run_cli(str(tmp_path / "missing.keras"), "--random-input", "--order", "bogus")
    assert_error(result, "bogus")
