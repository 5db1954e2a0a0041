"""A Stage: blocks + learning rule + optimizer. The one implementation of the learning, driven by
both executors (the sequential runner in this package and the Ray actor in ``actors/``)."""

from __future__ import annotations

import contextlib
import functools
import math
import resource
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from forwardflow.pipeline.checkpoint import save_shard
from forwardflow.pipeline.config import OptimConfig, RuleConfig, RunConfig
from forwardflow.pipeline.device import StepClock, host_read, uses_bfloat16
from forwardflow.pipeline.divergence import LossWatch
from forwardflow.pipeline.messages import (
    TRAIN,
    CheckpointMarker,
    DivergenceError,
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
class DeviceOptions:
    """What a stage on a CUDA device may do to go faster (``--bf16``, ``--channels-last``,
    ``--compile``). A stage on the CPU keeps bf16 only where the CPU multiplies in bfloat16 (its
    matmuls then take about half the time) and ignores the rest: its numbers are those of the
    options off."""

    bf16: bool = False  # bfloat16 autocast over the forward pass and the local loss
    channels_last: bool = False  # conv weights and image inputs in channels-last memory format
    compile: bool = False  # torch.compile each block (dropout, which draws from its own generator, excepted)


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
    check_every: int = 32  # training microbatches between reads of the non-finite-loss flag
    options: DeviceOptions = DeviceOptions()


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
        self.options = setup.options
        if self.device.type != "cuda":
            # Decided where the stage runs (an actor's node may have another CPU than the driver's).
            self.options = DeviceOptions(bf16=uses_bfloat16(self.device, setup.options.bf16))
        # bfloat16 for the forward pass and the loss only; the backward pass follows the forward's
        # types and the optimizer updates the float32 weights. Without --bf16 no autocast context
        # at all: entering a disabled one still costs a few microseconds, twice per step.
        self._bf16_autocast = (
            functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16)
            if self.options.bf16
            else contextlib.nullcontext
        )
        if self.options.channels_last:
            self.blocks.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # What the rule runs: the blocks themselves, or each compiled (the parameters are shared,
        # so the optimizer, the snapshot and the state dict see the same tensors either way).
        self.run_blocks = self.blocks
        if self.options.compile:
            # Every block of a kind shares its forward's code, and each stage's shapes (training,
            # evaluation) compile it again: more than dynamo's default of 8 graphs per code object,
            # past which it would quietly run the rest uncompiled.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.run_blocks = nn.ModuleList(
                block if isinstance(block, SeededDropout) else cast(nn.Module, torch.compile(block))
                for block in self.blocks
            )
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self._dropout_seed)
        for module in self.blocks:
            if isinstance(module, SeededDropout):
                module.generator = generator
        params = [p for p in list(self.blocks.parameters()) + list(self.rule.parameters()) if p.requires_grad]
        self.optimizer = _build_optimizer(setup.optim, params)
        self.scheduler = _build_schedule(setup.optim, self.optimizer, setup.total_steps)
        precision = "bfloat16" if self.options.bf16 else "float32"
        self.stats = StageStats(stage=self.index, device=str(self.device), lr=setup.optim.lr, precision=precision)
        self.loss_watch = LossWatch(setup.optim.divergence_factor)
        self.clock = StepClock(self.device)
        self.last_index = -1
        # Sequence data (--update-every): gradients gathered since the last optimizer step, and the
        # training microbatches since then, which the learning-rate schedule catches up on.
        self._gathering = False
        self._unscheduled = 0
        self._parameters = list(self.blocks.parameters()) + list(self.rule.parameters())
        self._weights_at_last_snapshot = [p.detach().clone() for p in self._parameters]
        # What the host learns only at a read: each training step's loss, own hits and whether its
        # inputs were finite, written into device buffers of check_every slots without waiting,
        # and read all at once (check_finite): after the first training step (so that the
        # divergence watch has a scale from the second step on), then every check_every steps.
        self._losses = torch.zeros(setup.check_every, device=self.device)
        self._hits = torch.zeros(setup.check_every, device=self.device, dtype=torch.long)
        self._inputs_ok = torch.ones(setup.check_every, device=self.device, dtype=torch.bool)
        self._unread: list[_Slot] = []
        self._read_after = 1  # training steps until the next read: 1, then check_every
        self._failure: DivergenceError | None = None  # once found, raised at every later read
        # The largest |loss| the watch lets through until the next read (float32, as the device
        # compares), and 1.0 from the first loss past it or non-finite on: the fused optimizer
        # skips every step while the flag is set, so no such step reaches the weights.
        self._limit = torch.tensor(self.loss_watch.limit(), device=self.device)
        self._diverged = torch.zeros((), device=self.device)

    @property
    def is_last(self) -> bool:
        return self.setup.spec.is_last

    def step(self, mb: Microbatch | CheckpointMarker) -> Microbatch | Prediction | CheckpointMarker:
        """Forward, local loss, update at once; returns the detached hand-on (or, in the last
        stage, the predictions, on this stage's device). Evaluation microbatches change no weight
        and no statistic of the blocks (eval mode, no gradient). Nothing here waits for the device
        except the periodic read of losses (check_finite). A checkpoint marker writes the stage's
        shard and goes on."""
        if isinstance(mb, CheckpointMarker):
            return self._write_shard(mb)
        if mb.index <= self.last_index:
            # Equivalence with the sequential run rests on stream order; never learn out of order.
            raise RuntimeError(f"stage {self.index}: microbatch {mb.index} arrived after {self.last_index}")
        self.last_index = mb.index
        started = self.clock.start()
        # Detach on entry too: whatever the caller hands in, the update cannot reach upstream.
        mb = mb.to(self.device).detached()
        if self.options.channels_last:
            mb = mb.map(_channels_last)
        training = mb.phase == TRAIN
        if mb.time is not None and mb.time.step == 0:
            reset_states(self.blocks)  # a new batch of sequences starts from a zero state
        # Only on a change of phase: train() walks every submodule, a cost per microbatch that a
        # plain loop does not pay. A rule that switches the blocks' mode itself (ff, efp) switches
        # them back, through the container, so its flag stays the blocks' mode.
        if self.run_blocks.training != training:
            self.run_blocks.train(training)
        if self.rule.training != training:
            self.rule.train(training)
        with torch.set_grad_enabled(training):
            if training and not self._gathering:
                # The last update's gradients are cleared before the rule runs, not at the stage's
                # backward pass: a rule may run backward passes of its own first (LocalStep.settled).
                self.optimizer.zero_grad(set_to_none=True)
            with self._bf16_autocast():
                local = self.rule(self.run_blocks, mb, training)
            if training:
                self._unscheduled += 1
                self._record(mb, local.whole_loss(), local.scores, local.tracked)
                # Without a loss (a step the target does not reach, a rule that learns later in
                # the sequence) the step only moves the recurrent state on.
                if local.loss is not None:
                    self._backward(local.loss)
                if self._gathering and (mb.time is None or mb.time.update):
                    self._apply(mb)
        result: Microbatch | Prediction = local.handed_on
        if self.is_last:
            # No graph for the predictions: the output head would otherwise keep its input for a
            # backward pass that never comes. Only evaluation is scored, so a training microbatch
            # reports back without predicted classes (no head, no argmax: work nothing reads).
            with torch.no_grad(), self._bf16_autocast():
                result = self.rule.training_report(mb, local) if training else self.rule.predict(mb, local)
        self._count(mb, local.scores, training, started)
        if training and len(self._unread) >= self._read_after:
            self.check_finite()
        return result

    def _record(self, mb: Microbatch, loss: torch.Tensor | None, scores: torch.Tensor | None, tracked: bool) -> None:
        """Writes a training step's loss, own hits and input check into its slot, on the device."""
        slot = len(self._unread)
        # A stage's own accuracy on the steps the task scores, for class labels.
        scored = scores is not None and (mb.time is None or mb.time.scored) and not mb.labels.is_floating_point()
        self._unread.append(_Slot(mb.index, loss is not None, tracked, mb.size if scored else 0))
        if scored:
            assert scores is not None
            torch.sum(scores.argmax(1) == mb.labels, dim=0, out=self._hits[slot])
        if loss is not None:
            value = loss.detach().float()
            self._losses[slot].copy_(value)
            if self.index == 0:  # only the first stage's inputs are the data
                # The largest magnitude is finite exactly when every input is (max propagates NaN);
                # an element-wise isfinite is several times slower on a CPU.
                self._inputs_ok[slot] = torch.isfinite(mb.inputs.abs().amax())
            # Past the limit (NaN and inf never pass a comparison) sets the sticky flag.
            passes = value.abs() <= self._limit if tracked else torch.isfinite(value)
            self._diverged = torch.where(passes, self._diverged, 1.0)

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # adds to the gradients gathered since the last optimizer step
        self._gathering = True

    def _apply(self, mb: Microbatch) -> None:
        # No host read here. The fused optimizer takes the sticky flag as its found_inf and skips
        # the whole step (weights, moments, step count) while it is set, so no step from the first
        # bad loss on reaches the parameters; the host learns of it at the next read.
        self.optimizer.found_inf = self._diverged  # type: ignore[attr-defined]
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

    def check_finite(self) -> None:
        """Read the losses, hits and input checks written since the last read (a sync point) into
        the stage's counters and divergence watch; raise if one of those losses was NaN, inf or
        past the watch's limit, naming the first."""
        if self._failure is not None:
            raise self._failure
        count, unread = len(self._unread), self._unread
        self._unread = []
        if count:
            with host_read():
                read = torch.cat(
                    [self._losses[:count].double(), self._hits[:count].double(), self._inputs_ok[:count].double()]
                )
                values = read.tolist()
            self._hits.zero_()
            losses, hits, inputs_ok = values[:count], values[count : 2 * count], values[2 * count :]
            # The limit the device compared these losses with: the watch changes only at reads.
            limit, stats = self.loss_watch.limit(), self.stats
            for slot, value, ok in zip(unread, losses, inputs_ok):
                if not slot.has_loss:
                    continue
                if not math.isfinite(value):
                    self._failure = NonFiniteLossError(self.index, slot.index, value, data_ok=bool(ok))
                elif slot.tracked and abs(value) > limit:
                    self._failure = self.loss_watch.exploded(value, self.index, slot.index)
                if self._failure is not None:
                    raise self._failure
                if slot.tracked:
                    self.loss_watch.record(value)
                stats.loss_sum += value
                stats.loss_count += 1
                stats.last_loss = value
            stats.train_correct += int(sum(hits))
            stats.train_scored += sum(slot.scored for slot in unread)
            self._limit.fill_(self.loss_watch.limit())  # a write, queued: the host does not wait
            self._read_after = self.setup.check_every
        # The device has caught up to this point: fold the step times it has finished (so that the
        # clock holds at most check_every steps' events, whatever the metrics cadence).
        self.clock.collect(self.stats)

    def _catch_up(self) -> None:
        """Wait for the device (inside a host_read) and fold every step time it has finished."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.clock.collect(self.stats, finished=True)

    def _count(self, mb: Microbatch, scores: torch.Tensor | None, training: bool, started) -> None:
        stats = self.stats
        elapsed = self.clock.stop(started, training, stats)
        stats.microbatches += 1
        stats.last_step_at = time.time()
        stats.first_step_at = stats.first_step_at or stats.last_step_at - elapsed
        if mb.time is not None:
            stats.time_step, stats.sequence_length = mb.time.step + 1, mb.time.length
        if not training:
            stats.eval_samples += mb.size if mb.ends_sample else 0
            return
        stats.samples += mb.size if mb.ends_sample else 0

    @torch.no_grad()
    def _squared_norms(self) -> torch.Tensor:
        """Squared norm of all weights and of their change since the last snapshot, on the device,
        tensor by tensor (no concatenated copy of the model); the reference copy is updated in place."""
        weight_sq = torch.zeros((), device=self.device, dtype=torch.float64)
        update_sq = torch.zeros((), device=self.device, dtype=torch.float64)
        for param, previous in zip(self._parameters, self._weights_at_last_snapshot):
            weight_sq += param.pow(2).sum(dtype=torch.float64)
            previous.sub_(param)
            update_sq += previous.pow(2).sum(dtype=torch.float64)
            previous.copy_(param)
        return torch.stack([weight_sq, update_sq])

    def snapshot(self) -> StageStats:
        """Counters so far plus norms and memory, read from the device at once. Called at the
        metrics cadence and at the end, never per microbatch; raises if a loss was non-finite."""
        self.check_finite()
        stats = self.stats
        norms = self._squared_norms()
        with host_read():
            self._catch_up()
            weight_sq, update_sq = norms.tolist()
        stats.weight_norm, stats.update_norm = math.sqrt(weight_sq), math.sqrt(update_sq)
        stats.lr = self.optimizer.param_groups[0]["lr"]
        if self.device.type == "cuda":
            stats.memory_bytes = torch.cuda.memory_allocated(self.device)
            stats.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            stats.memory_bytes = _current_rss_bytes()
            stats.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return replace(stats, step_counts=list(stats.step_counts))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights (and the rule's own parameters), on the CPU; refused after a non-finite loss."""
        self.check_finite()
        weights: dict[str, torch.Tensor] = {}
        with host_read():
            for prefix, module in (("blocks.", self.blocks), ("rule.", self.rule)):
                for name, tensor in module.state_dict().items():
                    weights[prefix + name] = tensor.detach().cpu().clone()
        return weights

    # ---------------------------------------------------------------- checkpoints

    @property
    def _dropout_seed(self) -> int:
        """The seed of the stage's own generator (dropout masks), from the run's seed."""
        return self.setup.seed * 1000 + self.index + 7919

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
        continue exactly as this one would. Reads the stage's unread losses first (a sync point), so
        a shard never holds a state past a loss the watch would stop at."""
        self.check_finite()
        with host_read():
            self._catch_up()
        return {
            "stage": self.index,
            "last_index": self.last_index,
            "blocks": self.blocks.state_dict(),
            "rule": self.rule.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "generators": [generator.get_state() for generator in self._generators()],
            "generator_devices": [generator.device.type for generator in self._generators()],
            "loss_watch": self.loss_watch.state_dict(),
            "read_after": self._read_after,
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
        generators = self._generators()
        saved_on = state.get("generator_devices", [generator.device.type for generator in generators])
        for number, (generator, generator_state, device_type) in enumerate(
            zip(generators, state["generators"], saved_on, strict=True)
        ):
            if device_type == generator.device.type:
                generator.set_state(generator_state)
            else:
                # Resumed on another kind of device (--device): a CPU generator's state means
                # nothing to a CUDA one and the other way round, so the generator starts again
                # from a seed that the checkpoint's position decides. The same run, other draws.
                generator.manual_seed(self._dropout_seed * 1_000_003 + state["last_index"] + number)
        self.loss_watch.load_state_dict(state["loss_watch"])
        # The steps until the next read, within this stage's buffers: --nan-check-every may be
        # smaller on resume than when the checkpoint was written.
        self._read_after = min(state["read_after"], len(self._losses))
        self._limit.fill_(self.loss_watch.limit())
        # Counters from the checkpoint; where and how it computes from this process.
        self.stats = replace(StageStats(**state["stats"]), device=str(self.device), precision=self.stats.precision)
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


@dataclass(frozen=True)
class _Slot:
    """What the host knows of a training step whose values wait on the device for the next read."""

    index: int  # the microbatch's stream index
    has_loss: bool
    tracked: bool  # the loss is compared with the divergence watch's limit
    scored: int  # samples whose own hits the step counted


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def _build_optimizer(config: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    # Fused: one kernel per step for all parameters, and it takes a device-side found_inf flag (a
    # step is skipped without the host having to look at the loss).
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, fused=True
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


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
            check_every=config.execution.nan_check_every,
            options=DeviceOptions(
                bf16=config.execution.bf16,
                channels_last=config.execution.channels_last,
                compile=config.execution.compile,
            ),
        )
        for spec in specs
    ]
