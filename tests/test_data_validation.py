"""Data files are checked before training: a damaged or foreign IDX file, CIFAR-10 batch or image
folder is one line naming the file and the problem, exit status 2, before any actor starts. A fuzz
test (hypothesis) corrupts the files and the flags in ways that can never be valid and checks that
every one of them is refused that way: never a traceback, never a run that goes ahead."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_data import make_idx_set, write_idx

import forwardflow.launch.train
from forwardflow.launch.build import build_run
from forwardflow.launch.cli import build_parser
from forwardflow.launch.train import main
from forwardflow.pipeline.config import DataConfig
from forwardflow.pipeline.data import IDX_STEMS, load_dataset
from forwardflow.pipeline.validation import ConfigError, plain_type

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def refused(directory: Path, dataset: str = "fashion-mnist") -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_dataset(DataConfig(dataset, data_dir=str(directory)))
    return caught.value


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(np.uint8).tobytes()


IDX_CASES = {
    "bad magic": (IMAGES, lambda raw: b"\x12\x34" + raw[2:], "is not an IDX file"),
    "float values": (IMAGES, lambda raw: raw[:2] + b"\x0d" + raw[3:], "holds float values"),
    "wrong dimensions": (LABELS, lambda raw: raw[:3] + b"\x02" + raw[4:], "has 2 dimensions; a label file has 1"),
    "truncated": (IMAGES, lambda raw: raw[:-5], "is truncated"),
    "header only": (IMAGES, lambda raw: raw[:2], "not even an IDX header"),
    "trailing bytes": (IMAGES, lambda raw: raw + b"\0\0", "2 bytes beyond"),
    "2-byte labels": (LABELS, lambda raw: raw[:2] + b"\x0b" + raw[3:], "holds 16-bit values"),
    "fewer labels": (LABELS, lambda raw: idx_bytes(np.arange(19) % 10), "holds 19 labels for the 20 images"),
    "label out of range": (LABELS, lambda raw: idx_bytes(np.r_[np.arange(19) % 10, 12]), "label 12 at position 19"),
    "no images": (IMAGES, lambda raw: idx_bytes(np.zeros((0, 28, 28))), "holds no images"),
}


@pytest.mark.parametrize("case", list(IDX_CASES))
def test_a_damaged_idx_file_is_named_with_its_problem(tmp_path, case):
    make_idx_set(tmp_path, gz=False)
    name, damage, message = IDX_CASES[case]
    path = tmp_path / name
    path.write_bytes(damage(path.read_bytes()))
    error = refused(tmp_path)
    assert error.where == str(path) and message in error.message, str(error)


def test_test_images_of_another_size_than_the_training_images_are_refused(tmp_path):
    make_idx_set(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10, 32, 32)), gz=False)
    error = refused(tmp_path)
    assert error.where.endswith("t10k-images-idx3-ubyte") and "32x32" in error.message and "28x28" in error.message


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[: len(raw) // 2], "truncated gzip"),
        (lambda raw: b"not gzip at all", "not a valid gzip file"),
        (lambda raw: raw[:-8] + bytes(8), "not a valid gzip file"),  # CRC and size zeroed
    ],
    ids=["truncated", "foreign", "crc"],
)
def test_a_corrupt_gzip_file_is_named(tmp_path, damage, message):
    make_idx_set(tmp_path, gz=True)
    path = tmp_path / (IMAGES + ".gz")
    path.write_bytes(damage(path.read_bytes()))
    error = refused(tmp_path)
    assert error.where == str(path) and message in error.message, str(error)


def cifar_dir(root: Path, batches: dict[str, object] | None = None) -> Path:
    """A CIFAR-10 python-batches folder of 4 training and 3 test images; ``batches`` replaces some."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for name, count in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 3)]:
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), b"labels": list(range(count))}
        content = (batches or {}).get(name, batch)
        (folder / name).write_bytes(content if isinstance(content, bytes) else pickle.dumps(content, protocol=2))
    return folder


CIFAR_CASES = {
    "not a dict": ([1, 2, 3], "holds a list, not a dict"),
    "rows of 3071": ({b"data": np.zeros((4, 3071), np.uint8), b"labels": [0] * 4}, "N x 3072 array of bytes"),
    "float pixels": ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "N x 3072 array of bytes"),
    "label 10": ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 10, 2]}, "label 10 at position 2"),
    "3 labels": ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}, "holds 3 labels for the 4"),
    "no labels": ({b"data": np.zeros((4, 3072), np.uint8)}, "'labels' must be a list"),
    "a key not in UTF-8": ({b"data": np.zeros((4, 3072), np.uint8), b"\xff": [0] * 4}, "'labels' must be a list"),
    "code": (pickle.dumps(os.getcwd), "refers to posix.getcwd"),
    "truncated": (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4})[:-40], "not a CIFAR"),
}


@pytest.mark.parametrize("case", list(CIFAR_CASES))
def test_a_damaged_cifar_batch_is_named_and_never_runs_code(tmp_path, case):
    batch, message = CIFAR_CASES[case]
    folder = cifar_dir(tmp_path, {"data_batch_3": batch})
    error = refused(tmp_path, "cifar10")
    assert error.where == str(folder / "data_batch_3") and message in error.message, str(error)


def image_folders(root: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(root / split / label / "0.png")


@pytest.mark.parametrize(
    "damage, where, message",
    [
        (lambda root: (root / "train" / "cat" / "1.png").write_bytes(b"\x89PNG broken"), "train/cat/1.png", "Pillow"),
        (lambda root: (root / "test" / "cow").mkdir(), "test/cow", "train/ does not have"),
        (lambda root: (root / "train" / "dog" / "0.png").unlink(), "", ""),  # one class empty: still fine
        (lambda root: [p.unlink() for p in root.glob("test/*/*")], "test", "holds no images"),
    ],
    ids=["not an image", "unknown class", "empty class", "empty test set"],
)
def test_image_folders_are_checked_file_by_file(tmp_path, damage, where, message):
    image_folders(tmp_path)
    damage(tmp_path)
    if not where:
        assert load_dataset(DataConfig("cifar10", data_dir=str(tmp_path))).train_x.shape[0] == 1
        return
    error = refused(tmp_path, "cifar10")
    assert error.where == str(tmp_path / where) and message in error.message, str(error)


def test_images_of_two_sizes_are_refused(tmp_path):
    from PIL import Image

    image_folders(tmp_path)
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "train" / "dog" / "1.png")
    error = refused(tmp_path, "cifar10")
    assert error.where.endswith("dog/1.png") and "is 8x9" in error.message


# ---------------------------------------------------------------- fuzz


def one_line_exit_2(argv: list[str]) -> str:
    """Run launch/train.py's main in-process; it must refuse with status 2 and exactly one line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("forwardflow: error: "), (status, lines)
    return lines[0]


def corrupt_idx(data, raw: bytes, labels: bool) -> bytes:
    """A change that leaves no valid IDX file (of the set): header fields, size, labels."""
    ndim = raw[3]
    kinds = ["truncate", "magic", "type", "ndim", "dimension", "extra"] + (["label"] if labels else [])
    kind = data.draw(st.sampled_from(kinds))
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if kind == "magic":
        return bytes([data.draw(st.integers(1, 255))]) + raw[1:]
    if kind == "type":
        return raw[:2] + bytes([data.draw(st.integers(0, 255).filter(lambda v: v != 8))]) + raw[3:]
    if kind == "ndim":
        return raw[:3] + bytes([data.draw(st.integers(0, 255).filter(lambda v: v != ndim))]) + raw[4:]
    if kind == "dimension":
        axis = data.draw(st.integers(0, ndim - 1))
        old = struct.unpack(">I", raw[4 + 4 * axis : 8 + 4 * axis])[0]
        new = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != old))
        return raw[: 4 + 4 * axis] + struct.pack(">I", new) + raw[8 + 4 * axis :]
    if kind == "extra":
        return raw + data.draw(st.binary(min_size=1, max_size=64))
    header = 4 + 4 * ndim
    position = header + data.draw(st.integers(0, len(raw) - header - 1))
    return raw[:position] + bytes([data.draw(st.integers(10, 255))]) + raw[position + 1 :]


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzz_corrupted_idx_files_exit_2_with_one_line(data):
    gz = data.draw(st.booleans(), label="gzip")
    stem = data.draw(st.sampled_from(IDX_STEMS), label="file")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_idx_set(root, gz=gz)
        path = root / (stem + (".gz" if gz else ""))
        raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
        if gz and data.draw(st.booleans(), label="damage the gzip stream itself"):
            packed = gzip.compress(raw, mtime=0)  # a 10-byte header: every later byte matters
            position = data.draw(st.integers(10, len(packed) - 1))
            flipped = packed[:position] + bytes([packed[position] ^ data.draw(st.integers(1, 255))])
            damaged = flipped + packed[position + 1 :]
            try:
                unchanged = gzip.decompress(damaged) == raw  # only padding bits flipped
            except Exception:
                unchanged = False
            assume(not unchanged)
        else:
            damaged = corrupt_idx(data, raw, labels="labels" in stem)
            damaged = gzip.compress(damaged, mtime=0) if gz else damaged
        path.write_bytes(damaged)
        line = one_line_exit_2(["--dataset", "fashion-mnist", "--data-dir", folder, "--executor", "sequential"])
        assert str(path) in line


@FUZZ
@given(data=st.data())
def test_fuzz_corrupted_cifar_batches_exit_2_with_one_line(data):
    count = 4
    good = {b"data": np.zeros((count, 3072), np.uint8), b"labels": [0] * count}
    kind = data.draw(st.sampled_from(["truncate", "shape", "dtype", "label", "count", "type", "foreign"]))
    if kind == "truncate":
        raw = pickle.dumps(good, protocol=2)
        batch: object = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "shape":
        width = data.draw(st.integers(0, 4000).filter(lambda v: v != 3072))
        batch = {**good, b"data": np.zeros((count, width), np.uint8)}
    elif kind == "dtype":
        dtype = data.draw(st.sampled_from([np.float32, np.int16, np.int64, np.float64]))
        batch = {**good, b"data": np.zeros((count, 3072), dtype)}
    elif kind == "label":
        bad = data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=10, max_value=2**62)))
        batch = {**good, b"labels": [0, 1, bad, 2]}
    elif kind == "count":
        batch = {**good, b"labels": [0] * data.draw(st.integers(0, 12).filter(lambda v: v != count))}
    elif kind == "type":
        batch = data.draw(st.one_of(st.lists(st.integers()), st.text(), st.none(), st.just({b"data": [1, 2]})))
    else:
        batch = pickle.dumps(data.draw(st.sampled_from([os.system, print, Path, np.load])))
    split = data.draw(st.sampled_from(["data_batch_1", "data_batch_5", "test_batch"]))
    with tempfile.TemporaryDirectory() as folder:
        cifar_dir(Path(folder), {split: batch})
        line = one_line_exit_2(["--dataset", "cifar10", "--data-dir", folder, "--executor", "sequential"])
        assert split in line


def parses(value: str, kind) -> bool:
    try:
        kind(value)
    except ValueError:
        return False
    return True


def bad_value(data, flag) -> str:
    """A value the flag can never take: the wrong type, outside its range, or not one of its choices."""
    item = flag[1]
    kind, _ = plain_type(flag[2].field_types()[item.name])
    choices, low, high = item.metadata.get("choices"), item.metadata.get("low"), item.metadata.get("high")
    if choices:
        return data.draw(st.text(min_size=1).filter(lambda v: v not in choices and not v.startswith("-")))
    if kind is int:
        options = [st.text(min_size=1).filter(lambda v: not parses(v, int))]
        if high is not None:
            options.append(st.integers(min_value=int(high) + 1).map(str))
        if low is not None and low > 0:
            options.append(st.integers(max_value=int(low) - 1, min_value=0).map(str))
        return data.draw(st.one_of(options))
    options = [st.sampled_from(["nan", "inf", "1e400"]), st.text().filter(lambda v: not parses(v, float))]
    if low is not None:
        below = low - max(abs(low), 1.0) * 1e-6
        options.append(st.floats(max_value=below, min_value=-1e12, allow_nan=False).map(repr))
    if high is not None:
        options.append(st.floats(min_value=high, exclude_min=True, allow_infinity=False).map(repr))
    return data.draw(st.one_of(options))


def checked_flags() -> list:
    """(flag, field, section class) of every flag with a type, range or choices to break."""
    _, flags = build_parser()
    from forwardflow.launch.cli import _leaf_fields  # the generator's own view of the tree
    from forwardflow.pipeline.presets import DEFAULT_PRESET, PRESETS

    defaults = PRESETS[DEFAULT_PRESET]()
    found = []
    for flag in flags.values():
        if flag.section == "rule.options":
            continue
        section = getattr(defaults, flag.section) if flag.section else defaults
        item = next(item for item in _leaf_fields(type(section)) if item.name == flag.name)
        kind, _ = plain_type(type(section).field_types()[item.name])
        if kind in (int, float) or item.metadata.get("choices"):
            found.append((flag.flag, item, type(section)))
    return found


CHECKED = checked_flags()


@FUZZ
@given(data=st.data())
def test_fuzz_flags_with_values_they_never_take_exit_2_with_one_line(data):
    flag = data.draw(st.sampled_from(CHECKED), label="flag")
    value = bad_value(data, flag)
    line = one_line_exit_2(["--dataset", "synthetic", "--executor", "sequential", f"{flag[0]}={value}"])
    assert line.startswith(f"forwardflow: error: {flag[0]}"), line


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


class ValidInputError(Exception):
    """Raised instead of training: the fuzzed command line was a valid one."""


@FUZZ
@given(
    tokens=st.lists(st.one_of(st.sampled_from([f[0] for f in CHECKED] + ["--out", "--resume"]), st.text()), max_size=6)
)
def test_fuzz_random_command_lines_are_refused_in_one_line_or_valid(tokens, monkeypatch_module):
    def checked_but_not_started(config, *args, **kwargs):
        build_run(config)  # every check, and nothing started
        raise ValidInputError

    monkeypatch_module.setattr(forwardflow.launch.train, "build_run", checked_but_not_started)
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder), contextlib.suppress(ValidInputError):
        one_line_exit_2([*tokens, "--dataset", "synthetic"])
