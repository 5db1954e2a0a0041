"""The dataset where the first stage computes, and microbatches made there from the schedule's plans.

The driver sends a :class:`MicrobatchPlan` (sample numbers, crop offsets and flips: a few hundred
bytes); the first stage's :class:`DataSource` holds the dataset, placed once, and gathers, crops and
flips the samples as batched tensor ops on its device. Nothing per microbatch goes through the
host on a GPU whose memory holds the dataset; otherwise the dataset stays in pinned host memory and
each microbatch is gathered there and copied without waiting (the copy overlaps the compute the
host has already queued).

The augmentation is drawn by the schedule from its seeded generator on the host and applied here,
so it is the same on every device and in every executor, and bit for bit what a per-image loop
gives (the values are copied, never interpolated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forwardflow.pipeline.data import Dataset
from forwardflow.pipeline.device import CopyStream
from forwardflow.pipeline.messages import EVAL, TRAIN, Microbatch, MicrobatchPlan

PADDING = 4  # pixels of zero padding around an image before a random crop
PLACEMENTS = ("auto", "device", "host")
# auto: the dataset goes to the GPU when it takes at most this share of its free memory.
DEVICE_SHARE = 0.5


def augment_images(
    images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, padding: int = PADDING
) -> torch.Tensor:
    """Random crops with zero padding and horizontal flips of a whole batch at once: one gather.
    ``crops`` (B, 2) are the crop's top-left corner in the padded image, ``flips`` (B,) booleans."""
    count, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    ys = crops[:, 0, None] + torch.arange(height, device=device)  # (B, H) rows of the padded image
    xs = crops[:, 1, None] + torch.arange(width, device=device)  # (B, W) columns
    xs = torch.where(flips[:, None], xs.flip(1), xs)
    batch = torch.arange(count, device=device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice: the result is (B, H, W, C).
    return padded[batch, :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2).contiguous()


def draw_augmentation(
    count: int, generator: torch.Generator, padding: int = PADDING
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets and flips for ``count`` images, from ``generator`` (on the host)."""
    rows = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    cols = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    return torch.stack([rows, cols], 1), flips


def dataset_bytes(dataset: Dataset) -> int:
    tensors = (dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y)
    return sum(t.numel() * t.element_size() for t in tensors)


def keeps_on_device(dataset: Dataset, device: torch.device, placement: str) -> bool:
    """Whether the dataset goes to ``device`` itself (else: host memory, pinned on a GPU machine)."""
    if device.type == "cpu" or placement == "host":
        return False
    if placement == "device":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return dataset_bytes(dataset) <= DEVICE_SHARE * free


class DataSource:
    def __init__(
        self, dataset: Dataset, device: str | torch.device = "cpu", placement: str = "auto", streams: bool = False
    ):
        self.device = torch.device(device)
        self.on_device = keeps_on_device(dataset, self.device, placement)
        # Placed once: on the device, pinned in host memory (a GPU that cannot hold it), or as is.
        pinned = self.device.type == "cuda" and not self.on_device

        def place(tensor: torch.Tensor) -> torch.Tensor:
            if self.on_device:
                return tensor.to(self.device)
            return tensor.pin_memory() if pinned else tensor

        self.splits = {
            TRAIN: (place(dataset.train_x), place(dataset.train_y)),
            EVAL: (place(dataset.test_x), place(dataset.test_y)),
        }
        self.pinned = pinned
        # --streams: the copy of a microbatch from pinned memory runs beside the compute queued
        # before it, instead of behind it on the compute stream.
        self.copies = CopyStream(self.device) if pinned and streams else None

    def read(self, plan: MicrobatchPlan) -> Microbatch:
        """The microbatch ``plan`` describes, on this source's device."""
        images, labels = self.splits[plan.phase]
        if plan.time is not None:
            # Sequence data (N, T, F): this time step's values of the plan's sequences, gathered
            # from a view, so that a step costs its own rows only; labels per sequence or per step.
            images = images.select(1, plan.time.step)
            labels = labels if labels.dim() == 1 else labels.select(1, plan.time.step)
        rows = plan.rows.to(images.device, non_blocking=True)
        if self.pinned:
            # Gathered into pinned memory, so that the copy to the GPU is queued, not waited for.
            inputs = torch.empty((plan.size, *images.shape[1:]), dtype=images.dtype, pin_memory=True)
            targets = torch.empty((plan.size,), dtype=labels.dtype, pin_memory=True)
            torch.index_select(images, 0, rows, out=inputs)
            torch.index_select(labels, 0, rows, out=targets)
            if self.copies is not None:
                gathered = Microbatch(plan.index, plan.phase, plan.epoch, inputs, targets)
                gathered = self.copies.use(*self.copies.to_device(gathered))
                inputs, targets = gathered.inputs, gathered.labels
            else:
                inputs = inputs.to(self.device, non_blocking=True)
                targets = targets.to(self.device, non_blocking=True)
        else:
            inputs, targets = images.index_select(0, rows), labels.index_select(0, rows)
        if plan.crops is not None and plan.flips is not None:
            inputs = augment_images(
                inputs, plan.crops.to(self.device, non_blocking=True), plan.flips.to(self.device, non_blocking=True)
            )
        context = None if plan.context is None else plan.context.to(self.device, non_blocking=True)
        return Microbatch(plan.index, plan.phase, plan.epoch, inputs, targets, context=context, time=plan.time)
