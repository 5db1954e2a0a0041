"""The device check's data: the CIFAR-10 JPEG copy decoded into the python batches forwardflow reads
(``--dataset cifar10``), else synthetic images of the same shape. torch, numpy and, where there is
one, a JPEG decoder (Pillow or torchvision) only: the GPU machine has nothing else."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = "cifar10-jpeg75.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def find_archive(given: str | None) -> Path | None:
    """``given``, else beside the checkout (../shared/datasets), else where ``benchmarks/gpu_session.sh
    pack`` puts it for a GPU machine (.gpu/: ../shared does not travel there, a carried path does)."""
    candidates = [Path(given)] if given else [REPO.parent / "shared" / "datasets" / ARCHIVE, REPO / ".gpu" / ARCHIVE]
    return next((path for path in candidates if path.is_file()), None)


def jpeg_decoder():
    """A function from JPEG bytes to a (3, 32, 32) uint8 array: Pillow, else torchvision, else None."""
    try:
        from PIL import Image

        return lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    except ImportError:
        pass
    try:
        from torchvision.io import decode_jpeg

        return lambda data: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).numpy()
    except ImportError:
        return None


def decode_archive(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    decode = jpeg_decoder()
    if decode is None:
        return None
    found: dict[str, list[tuple[str, int, np.ndarray]]] = {"train": [], "test": []}
    with tarfile.open(path) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in found and parts[-2] in CLASSES:
                data = archive.extractfile(member)
                assert data is not None
                found[parts[-3]].append((member.name, CLASSES.index(parts[-2]), decode(data.read())))
    split = {}
    for name, items in found.items():
        items.sort()
        split[name] = (np.stack([item[2] for item in items]), np.array([item[1] for item in items]))
    return split


def synthetic_images(train: int, test: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images of CIFAR-10's shape, each class a colour of its own under noise: learnable, for speed only."""
    rng = np.random.default_rng(0)
    means = rng.integers(40, 216, (10, 3, 1, 1))
    split = {}
    for name, count in (("train", train), ("test", test)):
        labels = rng.integers(0, 10, count)
        images = np.clip(means[labels] + rng.normal(0, 40, (count, 3, 32, 32)), 0, 255).astype(np.uint8)
        split[name] = (images, labels)
    return split


def write_python_batches(split: dict[str, tuple[np.ndarray, np.ndarray]], folder: Path) -> None:
    """The standard CIFAR-10 python batches, which forwardflow reads (--dataset cifar10)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, file in (("train", "data_batch_1"), ("test", "test_batch")):
        images, labels = split[name]
        with open(folder / file, "wb") as handle:
            pickle.dump({b"data": images.reshape(len(images), -1), b"labels": labels.tolist()}, handle)


def prepare_data(args, workdir: Path) -> str:
    """Writes the data into ``workdir``; returns where it came from, for the report."""
    archive = None if args.tiny else find_archive(args.cifar)
    split = decode_archive(archive) if archive else None
    if split is not None:
        source = f"CIFAR-10 (JPEG q75 copy, {archive})"
    else:
        train, test = (512, 256) if args.tiny else (50_000, 10_000)
        split = synthetic_images(train, test)
        why = "tiny check" if args.tiny else ("no JPEG decoder" if archive else f"no {ARCHIVE}")
        source = f"synthetic images of CIFAR-10's shape ({why})"
    write_python_batches(split, workdir)
    return source
