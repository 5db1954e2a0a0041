"""A Stage: blocks + learning rule + optimizer. The one implementation of the learning, driven by
both executors (the sequential runner in this package and the Ray actor in ``actors/``)."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from forwardflow.pipeline.checkpoint import save_shard
from forwardflow.pipeline.config import OptimConfig, RuleConfig, RunConfig
from forwardflow.pipeline.divergence import LossWatch
from forwardflow.pipeline.messages import (
    TRAIN,
    CheckpointMarker,
    Microbatch,
    NonFiniteLossError,
    Prediction,
    StageStats,
)
from forwardflow.pipeline.model import SeededDropout, StageSpec, build_stage_blocks, plan_stages
from forwardflow.pipeline.recurrent import reset_states
from forwardflow.pipeline.rules.base import RuleContext
from forwardflow.pipeline.targets import TargetSpec


@dataclass(frozen=True)
class StageSetup:
    """Everything needed to build one stage, identically in any process."""

    spec: StageSpec
    rule: RuleConfig
    optim: OptimConfig
    num_classes: int
    model_input_shape: tuple[int, ...]
    head: bool
    seed: int
    total_steps: int = 0  # training microbatches in the run (for learning-rate schedules)
    target: TargetSpec | None = None  # the task's targets (None: num_classes classes)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class Stage:
    def __init__(self, setup: StageSetup, device: str | torch.device = "cpu"):
        self.setup = setup
        self.index = setup.spec.index
        self.device = torch.device(device)
        # Parameters are drawn on the CPU from a seed of their own, so that a stage starts from the
        # same weights in every executor, on every device, whatever was built before it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(setup.seed * 1000 + self.index)
            self.blocks = build_stage_blocks(setup.spec)
            assert setup.rule.options is not None
            context = RuleContext(
                setup.rule.options,
                setup.spec,
                setup.num_classes,
                setup.model_input_shape,
                setup.head,
                setup.target or TargetSpec(setup.num_classes),
            )
            self.rule = setup.rule.rule_class(context)
        self.blocks.to(self.device)
        self.rule.to(self.device)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(setup.seed * 1000 + self.index + 7919)
        for module in self.blocks:
            if isinstance(module, SeededDropout):
                module.generator = generator
        params = [p for p in list(self.blocks.parameters()) + list(self.rule.parameters()) if p.requires_grad]
        self.optimizer = _build_optimizer(setup.optim, params)
        self.scheduler = _build_schedule(setup.optim, self.optimizer, setup.total_steps)
        self.stats = StageStats(stage=self.index, device=str(self.device), lr=setup.optim.lr)
        self.loss_watch = LossWatch(setup.optim.divergence_factor)
        self.last_index = -1
        # Sequence data (--update-every): gradients gathered since the last optimizer step, and the
        # training microbatches since then, which the learning-rate schedule catches up on.
        self._gathering = False
        self._unscheduled = 0
        self._parameters = list(self.blocks.parameters()) + list(self.rule.parameters())
        self._weights_at_last_snapshot = [p.detach().clone() for p in self._parameters]

    @property
    def is_last(self) -> bool:
        return self.setup.spec.is_last

    def step(self, mb: Microbatch | CheckpointMarker) -> Microbatch | Prediction | CheckpointMarker:
        """Forward, local loss, update at once; returns the detached hand-on (or, in the last
        stage, the predictions). Evaluation microbatches change no weight and no statistic of
        the blocks (eval mode, no gradient). A checkpoint marker writes the stage's shard and
        goes on."""
        if isinstance(mb, CheckpointMarker):
            return self._write_shard(mb)
        if mb.index <= self.last_index:
            # Equivalence with the sequential run rests on stream order; never learn out of order.
            raise RuntimeError(f"stage {self.index}: microbatch {mb.index} arrived after {self.last_index}")
        self.last_index = mb.index
        started = time.perf_counter()
        # Detach on entry too: whatever the caller hands in, the update cannot reach upstream.
        mb = mb.to(self.device).detached()
        training = mb.phase == TRAIN
        if mb.time is not None and mb.time.step == 0:
            reset_states(self.blocks)  # a new batch of sequences starts from a zero state
        self.blocks.train(training)
        self.rule.train(training)
        with torch.set_grad_enabled(training):
            local = self.rule(self.blocks, mb, training)
            if training:
                self._unscheduled += 1
                # Without a loss (a step the target does not reach, a rule that learns later in
                # the sequence) the step only moves the recurrent state on.
                if local.loss is not None:
                    self._backward(local.loss, mb, local.tracked)
                if self._gathering and (mb.time is None or mb.time.update):
                    self._apply(mb)
        result = self.rule.predict(mb, local).cpu() if self.is_last else local.handed_on
        self._count(mb, local.scores, training, started)
        return result

    def _backward(self, loss: torch.Tensor, mb: Microbatch, tracked: bool = True) -> None:
        # .item() is the stage's one sync point per microbatch: the NaN/inf check needs the value
        # on the host before the update is applied, so a bad loss never reaches the weights.
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(self.index, mb.index, value, data_ok=bool(torch.isfinite(mb.inputs).all()))
        if tracked:
            self.loss_watch.check(value, self.index, mb.index)
        if not self._gathering:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # adds to the gradients gathered since the last optimizer step
        self._gathering = True
        self.stats.loss_sum += value
        self.stats.loss_count += 1
        self.stats.last_loss = value

    def _apply(self, mb: Microbatch) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            # The schedule counts training microbatches, whether or not each one updated.
            for _ in range(self._unscheduled):
                self.scheduler.step()
        self._unscheduled = 0
        self._gathering = False
        self.rule.after_update()
        stats = self.stats
        stats.updates += 1
        if not stats.first_update_at:
            stats.first_update_at = time.time()
            stats.first_update_step = 1 if mb.time is None else mb.time.step + 1

    def _count(self, mb: Microbatch, scores: torch.Tensor | None, training: bool, started: float) -> None:
        stats = self.stats
        elapsed = time.perf_counter() - started
        stats.busy_s += elapsed
        stats.microbatches += 1
        stats.last_step_at = time.time()
        stats.first_step_at = stats.first_step_at or stats.last_step_at - elapsed
        if mb.time is not None:
            stats.time_step, stats.sequence_length = mb.time.step + 1, mb.time.length
        if not training:
            stats.eval_samples += mb.size if mb.ends_sample else 0
            return
        stats.samples += mb.size if mb.ends_sample else 0
        stats.count_step(elapsed)
        # A stage's own accuracy on the steps the task scores, for class labels.
        if scores is not None and (mb.time is None or mb.time.scored) and not mb.labels.is_floating_point():
            stats.train_correct += int((scores.argmax(1) == mb.labels).sum())
            stats.train_scored += mb.size

    @torch.no_grad()
    def _weight_and_update_norms(self) -> tuple[float, float]:
        """Norm of all weights and of their change since the last snapshot, tensor by tensor
        (no concatenated copy of the model); the reference copy is updated in place."""
        weight_sq = update_sq = 0.0
        for param, previous in zip(self._parameters, self._weights_at_last_snapshot):
            weight_sq += float(param.pow(2).sum())
            previous.sub_(param)
            update_sq += float(previous.pow(2).sum())
            previous.copy_(param)
        return math.sqrt(weight_sq), math.sqrt(update_sq)

    def snapshot(self) -> StageStats:
        """Counters so far plus norms and memory. Called at the metrics cadence, never per
        microbatch (the norms read every weight)."""
        stats = self.stats
        stats.weight_norm, stats.update_norm = self._weight_and_update_norms()
        stats.lr = self.optimizer.param_groups[0]["lr"]
        if self.device.type == "cuda":
            stats.memory_bytes = torch.cuda.memory_allocated(self.device)
            stats.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            stats.memory_bytes = _current_rss_bytes()
            stats.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return replace(stats, step_counts=list(stats.step_counts))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights (and the rule's own parameters), on the CPU."""
        weights: dict[str, torch.Tensor] = {}
        for prefix, module in (("blocks.", self.blocks), ("rule.", self.rule)):
            for name, tensor in module.state_dict().items():
                weights[prefix + name] = tensor.detach().cpu().clone()
        return weights

    # ---------------------------------------------------------------- checkpoints

    def _generators(self) -> list[torch.Generator]:
        """Every random generator the stage draws from (the dropout masks', a rule's own such as
        Forward-Forward's negatives), in module order, a shared one once."""
        found: dict[int, torch.Generator] = {}
        for module in [*self.blocks.modules(), *self.rule.modules()]:
            for value in vars(module).values():
                if isinstance(value, torch.Generator):
                    found.setdefault(id(value), value)
        return list(found.values())

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything the stage's next steps depend on, after microbatch ``last_index``: blocks and
        rule (parameters and buffers), optimizer, learning-rate schedule, random generators, the
        divergence watch and the counters. ``restore`` on a fresh Stage of the same setup makes it
        continue exactly as this one would."""
        return {
            "stage": self.index,
            "last_index": self.last_index,
            "blocks": self.blocks.state_dict(),
            "rule": self.rule.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "generators": [generator.get_state() for generator in self._generators()],
            "loss_watch": self.loss_watch.state_dict(),
            "stats": asdict(self.stats),
        }

    def restore(self, state: dict[str, Any]) -> None:
        if state["stage"] != self.index:
            raise RuntimeError(f"stage {self.index} was handed stage {state['stage']}'s checkpoint")
        self.blocks.load_state_dict(state["blocks"])
        self.rule.load_state_dict(state["rule"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for generator, generator_state in zip(self._generators(), state["generators"], strict=True):
            generator.set_state(generator_state)
        self.loss_watch.load_state_dict(state["loss_watch"])
        self.stats = replace(StageStats(**state["stats"]), device=str(self.device))
        self.last_index = state["last_index"]
        self._weights_at_last_snapshot = [p.detach().clone() for p in self._parameters]

    def _write_shard(self, marker: CheckpointMarker) -> CheckpointMarker:
        if marker.after != self.last_index:
            # The cut is consistent only if every stage sees it after the same microbatch.
            raise RuntimeError(
                f"stage {self.index}: the checkpoint after microbatch {marker.after} arrived after {self.last_index}"
            )
        shard = save_shard(marker, self.index, self.checkpoint_state())
        return replace(marker, shards=[*marker.shards, shard])


def _build_optimizer(config: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _build_schedule(config: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    if config.lr_schedule == "constant" or total_steps <= 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )


def stage_setups(
    config: RunConfig,
    num_classes: int,
    input_shape: tuple[int, ...],
    total_steps: int = 0,
    target: TargetSpec | None = None,
) -> list[StageSetup]:
    """One StageSetup per stage of ``config``'s model, balanced by compute."""
    specs = plan_stages(config.model, input_shape, config.num_stages)
    return [
        StageSetup(
            spec=spec,
            rule=config.rule,
            optim=config.optim,
            num_classes=num_classes,
            model_input_shape=input_shape,
            head=config.model.head,
            seed=config.seed,
            total_steps=total_steps,
            target=target,
        )
        for spec in specs
    ]
