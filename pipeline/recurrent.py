"""Recurrent blocks: an Elman cell and a GRU cell, usable as any stage's blocks (``BlockSpec`` kinds
``elman`` and ``gru``).

A microbatch of sequence data is one time step of a batch of sequences (``Microbatch.time``). A
recurrent block keeps the state of those sequences inside itself, between the stage's steps (in the
Ray actor, with Ray), so the stream never carries it: ``block(x_t)`` reads the state left by step
t-1, computes the new one and keeps it *detached*. The graph of a step therefore ends at that step:
a stage that learns at every step (Signal Propagation, local heads) holds one step's activations
whatever the sequence's length. The stage starts every sequence from a zero state
(``reset_states`` at step 0). The state has as many rows as the block's input: Signal Propagation's
target rows, which go through the same blocks as the data, have states of their own.

Rules that carry the gradient through time (``bptt``, ``tbptt``, ``rtrl``) keep the states
themselves and call the pure step ``block(x, state)`` through :func:`step_blocks`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

RECURRENT_KINDS = ("elman", "gru")


class RecurrentBlock(nn.Module):
    """One recurrent layer: ``hidden`` state values per sequence, which are also its output."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.state: torch.Tensor | None = None  # not a buffer: no part of the weights

    def cell(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """One time step. With ``state``: the pure step from that state. Without: from the state
        the block keeps (zero at a sequence's first step), which it then replaces, detached."""
        if state is not None:
            return self.cell(x, state)
        h = self.state
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden)
        elif h.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"a recurrent block holds the state of {h.shape[0]} rows but got {x.shape[0]}: "
                "the rows of a batch of sequences must not change between its time steps"
            )
        new = self.cell(x, h)
        self.state = new.detach()  # the next step starts here, without this step's graph
        return new

    def reset(self) -> None:
        self.state = None


class ElmanCell(RecurrentBlock):
    """``h_t = tanh(W x_t + b + U h_{t-1})``, U initialised orthogonal (a norm-preserving start,
    which keeps early gradients through time from vanishing or exploding at once)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__(hidden)
        self.input = nn.Linear(in_features, hidden)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        nn.init.orthogonal_(self.recurrent.weight)

    def cell(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.input(x) + self.recurrent(h))


class GRUCell(RecurrentBlock):
    """The gated recurrent unit, exactly as ``torch.nn.GRUCell`` computes it (reset gate r, update
    gate z, candidate n; ``h_t = (1 - z) n + z h_{t-1}``), written with linear layers so that
    forward-mode differentiation (``rtrl``) can take its Jacobians with ``torch.func``."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__(hidden)
        self.input = nn.Linear(in_features, 3 * hidden)
        self.recurrent = nn.Linear(hidden, 3 * hidden)
        bound = 1.0 / math.sqrt(hidden)  # torch.nn.GRUCell's initialisation
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def cell(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x_reset, x_update, x_new = self.input(x).chunk(3, -1)
        h_reset, h_update, h_new = self.recurrent(h).chunk(3, -1)
        reset = torch.sigmoid(x_reset + h_reset)
        update = torch.sigmoid(x_update + h_update)
        candidate = torch.tanh(x_new + reset * h_new)
        return (1 - update) * candidate + update * h


CELLS: dict[str, type[ElmanCell] | type[GRUCell]] = {"elman": ElmanCell, "gru": GRUCell}
GATES = {"elman": 1, "gru": 3}  # weight matrices per cell, for the stage plan's cost


def build_recurrent(kind: str, width: int, in_features: int) -> RecurrentBlock:
    return CELLS[kind](in_features, width)


def recurrent_cost(kind: str, in_features: int, width: int) -> int:
    """Multiply-accumulates per sample and time step."""
    return GATES[kind] * (in_features + width) * width


def is_recurrent(kinds: Iterable[str]) -> bool:
    return any(kind in RECURRENT_KINDS for kind in kinds)


def recurrent_blocks(blocks: nn.ModuleList) -> list[RecurrentBlock]:
    return [block for block in blocks if isinstance(block, RecurrentBlock)]


def reset_states(blocks: nn.ModuleList) -> None:
    """A new sequence: every recurrent block starts again from a zero state."""
    for block in recurrent_blocks(blocks):
        block.reset()


def zero_states(blocks: nn.ModuleList, rows: int, like: torch.Tensor) -> list[torch.Tensor]:
    return [like.new_zeros(rows, block.hidden) for block in recurrent_blocks(blocks)]


def step_blocks(
    blocks: nn.ModuleList | Sequence[nn.Module], x: torch.Tensor, states: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One time step through ``blocks`` from the given states (one per recurrent block, in order):
    the output and the new states. Pure: the blocks keep nothing, and the graph runs through the
    states as far back as the caller kept it."""
    new_states: list[torch.Tensor] = []
    for block in blocks:
        if isinstance(block, RecurrentBlock):
            x = block(x, states[len(new_states)])
            new_states.append(x)
        else:
            x = block(x)
    return x, new_states
