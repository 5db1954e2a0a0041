"""Checkpoints of a run: where they go and what one costs."""

from __future__ import annotations

import torch

from forwardflow.pipeline.model import build_stage_blocks
from forwardflow.pipeline.stage import StageSetup

CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints, in --out


def estimate_checkpoint_bytes(setups: list[StageSetup]) -> int:
    """About the size of one checkpoint: every stage's parameters and its optimizer's state (Adam:
    two moments per parameter), counted on the meta device (nothing allocated)."""
    total = 0
    for setup in setups:
        with torch.device("meta"):
            blocks = build_stage_blocks(setup.spec)
        parameters = sum(p.numel() * p.element_size() for p in blocks.parameters())
        total += parameters * (3 if setup.optim.name == "adam" else 2)
    return int(total * 1.1) + 64 * 1024 * len(setups)  # the rules' own parameters, RNG and counters
