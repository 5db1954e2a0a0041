"""Real-time recurrent learning (Williams & Zipser 1989): forward-mode differentiation through time.

Alongside the state s_t (every recurrent block's state, one vector per sequence) the rule carries
the influence matrix M_t = ds_t/dθ of the state with respect to every parameter θ that acts on it
(the blocks up to the last recurrent one), forward in time:

    M_t = (∂s_t/∂s_{t-1}) M_{t-1} + ∂s_t/∂θ,

with both Jacobians taken per sequence by ``torch.func`` (``vmap`` of ``jacrev``). At every
supervised step the loss's gradient is exact and needs no past activations: dℓ_t/dθ = (∂ℓ_t/∂s_t)
M_t, plus ordinary gradients for the blocks after the last recurrent one and the output layer. The
stage applies it at once (an update at every step, like TBPTT(1, n)), or gathers it over
``--update-every`` steps; gathered over a whole sequence with the weights unchanged, it is BPTT's
gradient exactly (tests/test_temporal_rules.py). Updating as it goes, it follows the usual online
RTRL: M keeps the sensitivities computed with the weights of earlier steps.

The price is memory and compute: M holds batch x state x parameters numbers (about S^3 per sequence
for S state units), and each step multiplies it by an S x S Jacobian. Only small recurrent layers
fit: the rule refuses a model whose influence matrix would need more than ``--rtrl-max-gib``, saying
how much it would need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from forwardflow.pipeline.messages import Microbatch
from forwardflow.pipeline.model import build_block
from forwardflow.pipeline.recurrent import RECURRENT_KINDS, RecurrentBlock, step_blocks, zero_states
from forwardflow.pipeline.rules.base import LocalStep, RuleContext, RuleOptions
from forwardflow.pipeline.rules.tbptt import ThroughTimeRule
from forwardflow.pipeline.validation import ConfigError, option

if TYPE_CHECKING:
    from forwardflow.pipeline.config import RunConfig

# Live copies of the influence matrix's size during a step: M_{t-1}, ∂s_t/∂θ, and the new M_t.
INFLUENCE_COPIES = 3


@dataclass(frozen=True)
class RTRLOptions(RuleOptions):
    max_gib: float = option(
        4.0,
        "rtrl: the most memory the influence matrix may take, in GiB (batch x state x parameters x 4 bytes, "
        f"{INFLUENCE_COPIES} copies)",
        flag="--rtrl-max-gib",
        low=0.001,
        high=1e6,
    )


def influence_size(blocks: tuple, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(state values, parameters acting on the state) per sequence of a model's blocks: the blocks
    up to the last recurrent one, built on the meta device (no memory)."""
    last = max(position for position, spec in enumerate(blocks) if spec.kind in RECURRENT_KINDS)
    state = parameters = 0
    shape = input_shape
    with torch.device("meta"):
        for spec in blocks[: last + 1]:
            module, shape = build_block(spec, shape)
            parameters += sum(p.numel() for p in module.parameters())
            if spec.kind in RECURRENT_KINDS:
                state += spec.width
    return state, parameters


class Front(nn.Module):
    """The blocks up to the last recurrent one, as one function of (flat state, input) for
    ``torch.func``: the next flat state."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sizes = [block.hidden for block in self.blocks if isinstance(block, RecurrentBlock)]
        _, states = step_blocks(self.blocks, x, list(state.split(sizes, -1)))
        return torch.cat(states, -1)


class RTRLRule(ThroughTimeRule):
    name = "rtrl"
    Options = RTRLOptions

    def __init__(self, context: RuleContext):
        super().__init__(context)
        self.influence: torch.Tensor | None = None  # M: (batch, state, parameters)

    @classmethod
    def check(cls, config: RunConfig, num_classes: int, input_shape: tuple[int, ...]) -> None:
        super().check(config, num_classes, input_shape)
        options = config.rule.options
        assert isinstance(options, RTRLOptions)
        blocks = config.model.blocks
        if any(spec.kind == "dropout" for spec in blocks):
            raise ConfigError("--rule", "rule rtrl takes exact Jacobians of every step: the model must not drop out")
        state, parameters = influence_size(blocks, input_shape)
        batch = config.schedule.batch_size
        need = INFLUENCE_COPIES * batch * state * parameters * 4
        if need > options.max_gib * 2**30:
            raise ConfigError(
                "--rule",
                f"rtrl: the influence matrix of model {config.model.name} would need {need / 2**30:,.1f} GiB "
                f"({INFLUENCE_COPIES} x batch {batch} x state {state} x {parameters:,} parameters x 4 bytes), "
                f"more than --rtrl-max-gib {options.max_gib:g}; use narrower recurrent layers or a smaller "
                "--batch-size",
            )

    @staticmethod
    def split(blocks: nn.ModuleList) -> int:
        """How many blocks the influence matrix covers: up to the last recurrent one."""
        return 1 + max(i for i, block in enumerate(blocks) if isinstance(block, RecurrentBlock))

    def forward(self, blocks: nn.ModuleList, mb: Microbatch, training: bool) -> LocalStep:
        time = mb.time
        assert time is not None  # checked: this rule learns from sequence data only
        if time.step == 0:
            self.states = zero_states(blocks, mb.size, mb.inputs)
            self.influence = None
        split = self.split(blocks)
        front, tail = Front(list(blocks[:split])), blocks[split:]
        if not training:
            with torch.no_grad():
                _, self.states = step_blocks(front.blocks, mb.inputs, self.states)
                features = self._tail(tail, self.states[-1])
                return LocalStep(mb.handed_on(features, None), None, features, self.logits(features))
        params = {name: p.detach() for name, p in front.named_parameters()}
        state = torch.cat(self.states, -1)
        jacobians = vmap(jacrev(self._transition(front), argnums=(0, 1), has_aux=True), in_dims=(None, 0, 0))
        (by_params, by_state), new_state = jacobians(params, state, mb.inputs)
        immediate = torch.cat([j.flatten(2) for j in by_params.values()], 2)  # ∂s_t/∂θ: (B, S, P)
        self.influence = immediate if self.influence is None else torch.bmm(by_state, self.influence) + immediate
        self.states = list(new_state.split([s.shape[1] for s in self.states], -1))
        last = self.states[-1].detach().requires_grad_(True)  # the front's output, as a leaf
        features = self._tail(tail, last)
        logits = self.logits(features)
        loss = None
        if time.supervised:
            loss = self.target.head_loss(logits, mb.labels)
            (by_output,) = torch.autograd.grad(loss, last, retain_graph=True)
            by_state_now = torch.cat([torch.zeros_like(s) for s in self.states[:-1]] + [by_output], -1)
            gradient = torch.einsum("bs,bsp->p", by_state_now, self.influence)  # dℓ/dθ through time
            # Handed to the stage's backward pass: a term whose value is 0 and whose gradient is the
            # forward-mode one, beside the loss (whose gradient reaches the tail and output layer).
            flat = torch.cat([p.flatten() for _, p in front.named_parameters()])
            carried = (flat * gradient).sum()
            loss = loss + carried - carried.detach()
        return LocalStep(mb.handed_on(features, None), loss, features, logits.detach())

    @staticmethod
    def _tail(tail: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        for block in tail:
            h = block(h)
        return h

    @staticmethod
    def _transition(front: Front):
        """One sequence's step as a function of (parameters, flat state, input), for torch.func;
        returns the next state twice (as the output and as the auxiliary value)."""

        def step(params: dict[str, torch.Tensor], state: torch.Tensor, x: torch.Tensor):
            new = functional_call(front, params, (state[None], x[None]))[0]
            return new, new

        return step
