"""The one config tree of a run: a frozen dataclass per component, each checked when it is built.

    RunConfig
      data        DataConfig        which dataset, where, how much of it, read as sequences or not
      model       ModelConfig       the blocks and how they split into stages (pipeline/model.py)
      rule        RuleConfig        the learning rule and its own options (pipeline/rules/)
      optim       OptimConfig       every stage's optimizer and learning-rate schedule
      schedule    ScheduleConfig    epochs, microbatch sizes, when the steps of a sequence learn
      execution   ExecutionConfig   sequential or Ray, devices, placement, threads
      monitoring  MonitoringConfig  progress bar, Prometheus endpoint, plots
      output      OutputConfig      where the run's files go
      seed

Every problem is a ConfigError naming the flag as the user types it. Presets (pipeline/presets.py)
are plain functions returning a RunConfig; the command line (launch/cli.py) is generated from the
fields declared here; a config file (TOML or JSON, or a run's summary.json) is read by
pipeline/config_files.py and overrides a preset the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forwardflow.pipeline.device import TRANSPORT_DEVICES
from forwardflow.pipeline.model import BLOCKS, ModelConfig
from forwardflow.pipeline.recurrent import RECURRENT_KINDS
from forwardflow.pipeline.rules.base import Rule, RuleOptions
from forwardflow.pipeline.rules.registry import RULES
from forwardflow.pipeline.validation import ConfigError, Section, option

DATASETS = ("mnist", "fashion-mnist", "cifar10", "synthetic", "adding")
SEQUENCE_DATASETS = ("adding",)  # sequences by nature (pipeline/sequence.py); the others are images
VALUE_DATASETS = ("adding",)  # a real-valued target (pipeline/targets.py); the others have classes


@dataclass(frozen=True)
class DataConfig(Section):
    dataset: str = option("mnist", "the dataset", choices=DATASETS)
    data_dir: str | None = option(
        None, "where the dataset's files are (default: $FORWARDFLOW_DATA_DIR, then where launch/setup.sh puts them)"
    )
    train_limit: int = option(0, "use only the first N training samples (0: all)", low=0, high=10**9)
    test_limit: int = option(0, "use only the first N test samples (0: all)", low=0, high=10**9)
    augment: bool = option(False, "random crops with 4-pixel padding and horizontal flips (image data)")
    sequence: str = option(
        "none",
        "read each image as a sequence: rows (one row per time step) or pixels (one pixel per step); "
        "none: images as they are (the adding dataset is a sequence already)",
        choices=("none", "rows", "pixels"),
    )
    permute: bool = option(False, "with --sequence pixels: the pixels in one fixed random order (permuted MNIST)")
    sequence_length: int = option(100, "--dataset adding: time steps per sequence (T)", low=2, high=1_000_000)

    placement: str = option(
        "auto",
        "where the first stage keeps the dataset on a GPU: device (its memory), host (pinned memory, "
        "each microbatch copied without waiting), auto (device when it fits in half the free memory)",
        flag="--data-placement",
        choices=("auto", "device", "host"),
    )

    def check(self) -> None:
        if self.permute and self.sequence != "pixels":
            raise self.error("permute", f"permutes the pixels of --sequence pixels (the sequence is {self.sequence})")
        if self.dataset in SEQUENCE_DATASETS and self.sequence != "none":
            raise self.error(
                "sequence", f"reads images as sequences; --dataset {self.dataset} is a sequence already (use none)"
            )

    @property
    def is_sequence(self) -> bool:
        """Whether the run learns from sequences (one time step per microbatch)."""
        return self.dataset in SEQUENCE_DATASETS or self.sequence != "none"

    @property
    def regression(self) -> bool:
        """Whether the targets are real values (scored by mean squared error) rather than classes."""
        return self.dataset in VALUE_DATASETS


@dataclass(frozen=True)
class ScheduleConfig(Section):
    epochs: int = option(1, "passes over the training set", low=1, high=10000)
    batch_size: int = option(512, "training microbatch size", low=1, high=65536)
    eval_batch_size: int = option(1000, "evaluation microbatch size", low=1, high=65536)
    loss_steps: str = option(
        "every",
        "sequence data with one target per sequence: the target applies at every time step (beside each "
        "input) or at the last step only",
        choices=("every", "last"),
    )
    update_every: int = option(
        1,
        "sequence data: each stage applies the gradients it gathered every K time steps and at a sequence's "
        "last step (1: at every step)",
        low=1,
        high=1_000_000,
    )


@dataclass(frozen=True)
class RuleConfig(Section):
    """The learning rule and its own options; ``options`` left out means the rule's defaults."""

    name: str = option("sigprop", "the learning rule", flag="--rule", choices=tuple(RULES))
    options: RuleOptions | None = option(None, "the rule's own options", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.options is None:
            object.__setattr__(self, "options", self.rule_class.Options())  # frozen: set once, here

    def check(self) -> None:
        expected = self.rule_class.Options
        if self.options is not None and type(self.options) is not expected:
            raise self.error("name", f"rule {self.name} takes {expected.__name__}, not {type(self.options).__name__}")

    @property
    def rule_class(self) -> type[Rule]:
        return RULES[self.name]


@dataclass(frozen=True)
class OptimConfig(Section):
    name: str = option("adam", "every stage's optimizer", flag="--optimizer", choices=("adam", "sgd"))
    lr: float = option(1e-3, "learning rate of every stage's optimizer, in (0, 10]")
    weight_decay: float = option(0.0, "weight decay", low=0.0, high=1.0)
    momentum: float = option(0.9, "sgd momentum", low=0.0, high=0.999)
    lr_schedule: str = option(
        "constant",
        "constant, or cosine decay to 0 over the run's training microbatches",
        choices=("constant", "cosine"),
    )
    divergence_factor: float = option(
        100.0,
        "stop when a stage's loss exceeds this many times its running median (or its first value) "
        "(0: only NaN and inf stop a run)",
        low=0.0,
        high=1e12,
    )

    def check(self) -> None:
        if not 0 < self.lr <= 10:
            raise self.error("lr", f"must be a number in (0, 10] (got {self.lr!r})")
        if 0 < self.divergence_factor <= 1:
            # A loss at or under its first value would already count as exploded.
            raise self.error("divergence_factor", f"must be 0 (off) or more than 1 (got {self.divergence_factor:g})")


DEFAULT_WINDOW = 8  # the fewest microbatches a Ray run keeps in flight, and efp's delay
# The default window grows past DEFAULT_WINDOW only for small hand-offs, where a call's fixed cost
# outweighs the work it carries (README, "Fewer Ray calls"); a large net's window stays as it was.
AUTO_WINDOW_MAX = 32
WINDOW_BUDGET_BYTES = 16 * 2**20  # the hand-offs in flight that a default window larger than 8 holds
DEFAULT_MAX_RESTARTS = 3
# ExecutionConfig's settings for the Ray executor only (None: not given), beside window and ray_dashboard.
RAY_ONLY = (
    "address",
    "placement",
    "max_restarts",
    "cpus_per_stage",
    "gpus_per_stage",
    "microbatches_per_call",
    "transport",
)


@dataclass(frozen=True)
class ExecutionConfig(Section):
    """Where and how the stages run: the Ray pipeline, or the in-process sequential runner.

    Settings that apply to one executor only default to None, "not given": a flag the user gave
    for the other executor is refused (RunConfig.check) instead of ignored, and the properties
    below resolve the defaults, in this one place."""

    executor: str = option(
        "ray", "ray: one actor per stage; sequential: every stage in this process", choices=("ray", "sequential")
    )
    device: str = option("auto", "auto, cpu, cuda, or cuda:N (cuda:N with --executor sequential)")
    window: int | None = option(
        None,
        "microbatches in flight in the Ray pipeline (bounds memory for any run length; default: as many as keep "
        f"their hand-offs under {WINDOW_BUDGET_BYTES >> 20} MiB, from {DEFAULT_WINDOW} to {AUTO_WINDOW_MAX}; "
        f"{DEFAULT_WINDOW} for a rule whose delay it sets)",
        low=1,
        high=1024,
    )
    microbatches_per_call: int | None = option(
        None,
        "microbatches per Ray actor call, at most --window (default: window // (stages + 1), so that every "
        "stage has a call in hand)",
        low=1,
        high=1024,
    )
    address: str | None = option(
        None,
        "an existing Ray cluster: HOST:PORT, ray://HOST:PORT or auto (default: a "
        "local Ray on 127.0.0.1, or $RAY_ADDRESS under ray job submit)",
    )
    placement: str | None = option(
        None,
        "pack: stages on as few nodes as possible; spread: in balanced blocks across the nodes, 2 or more "
        "(default: pack)",
        choices=("pack", "spread"),
    )
    cpus_per_stage: float | None = option(
        None,
        "CPUs reserved per stage on Ray (default: an equal share of its node's CPUs, at most 1)",
        low=0.0,
        high=1024.0,
    )
    gpus_per_stage: float | None = option(
        None,
        "GPUs reserved per stage on Ray (default: a whole GPU when the cluster has one per stage, an equal share "
        "otherwise); a fraction up to 1, or a whole number",
        low=0.0,
        high=64.0,
    )
    transport: str | None = option(
        None,
        "how activations go from stage to stage on Ray: auto (Ray Direct Transport between CUDA stages, "
        "cuda-ipc on a shared GPU and nccl across GPUs; the object store otherwise), object-store, or one "
        "of gloo (CPU tensors), nccl, cuda-ipc for every hop (default: auto)",
        choices=("auto", "object-store", "gloo", "nccl", "cuda-ipc"),
    )
    threads: int = option(1, "torch threads per stage (per actor; the sequential runner's process)", low=1, high=256)
    max_restarts: int | None = option(
        None,
        f"stage actors recreated after a failure (a dead process or node) before the run stops "
        f"(default: {DEFAULT_MAX_RESTARTS})",
        low=0,
        high=10000,
    )
    ray_dashboard: bool = option(False, "a local Ray also serves its dashboard, on 127.0.0.1:8265")
    bf16: bool = option(
        False,
        "bfloat16 autocast for the forward pass and the local loss: CUDA stages, and CPU stages where the CPU "
        "multiplies in bfloat16 (AVX512-BF16, AMX, Arm BF16; other CPU stages ignore it)",
    )
    channels_last: bool = option(
        False, "CUDA stages: conv weights and image inputs in channels-last memory format (a CPU stage ignores it)"
    )
    compile: bool = option(False, "CUDA stages: torch.compile each block of a stage (a CPU stage ignores it)")
    streams: bool = option(
        False,
        "CUDA: copies between host and GPU (pinned data, Ray hand-offs) on a side stream, so that the "
        "copy of one microbatch overlaps the compute of another (ignored on the CPU)",
    )
    nan_check_every: int = option(
        32,
        "training microbatches between reads of each stage's losses (after a first read at the first step): "
        "a NaN, inf or exploded loss, which never reaches the weights, stops the run at most this many "
        "microbatches after it (each read waits for the device; snapshots, checkpoints and the end read too)",
        low=1,
        high=10**6,
    )

    def check(self) -> None:
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise self.error("device", f"{device!r} is not one of auto, cpu, cuda, cuda:N")
        carries, tensors = TRANSPORT_DEVICES.get(self.transport_choice, (None, ""))
        if carries and device != "auto" and not device.startswith(carries):
            raise self.error(
                "transport", f"{self.transport} carries {tensors}, not {device} ones; use auto or object-store"
            )
        for name in ("cpus_per_stage", "gpus_per_stage"):
            if getattr(self, name) == 0:  # not "the default": that is leaving the flag out
                raise self.error(name, "must be more than 0 (leave it out for the default share)")
        gpus = self.gpus_per_stage
        if gpus is not None and gpus > 1 and gpus != int(gpus):
            # Ray reserves fractions of one GPU, or whole GPUs.
            raise self.error("gpus_per_stage", f"must be at most 1 or a whole number (got {gpus:g})")

    @property
    def pipeline_window(self) -> int:
        """--window, or the default of a rule whose delay it sets (see ray_window for the others)."""
        return DEFAULT_WINDOW if self.window is None else self.window

    def ray_window(self, bytes_per_microbatch: int, sets_a_delay: bool) -> int:
        """The window of a Ray run: --window; else as many microbatches as keep their hand-offs in
        the object store under WINDOW_BUDGET_BYTES, from DEFAULT_WINDOW to AUTO_WINDOW_MAX, and at
        least one call of --microbatches-per-call. A call costs the same whatever it carries, so a
        small net gets more microbatches per call; a rule whose delay the window sets keeps it."""
        if self.window is not None or sets_a_delay:
            return self.pipeline_window
        fits = WINDOW_BUDGET_BYTES // max(1, bytes_per_microbatch)
        return max(DEFAULT_WINDOW, min(AUTO_WINDOW_MAX, fits), self.microbatches_per_call or 0)

    @property
    def transport_choice(self) -> str:
        return self.transport or "auto"

    @property
    def placement_strategy(self) -> str:
        return self.placement or "pack"

    @property
    def restart_limit(self) -> int:
        return DEFAULT_MAX_RESTARTS if self.max_restarts is None else self.max_restarts


@dataclass(frozen=True)
class MonitoringConfig(Section):
    progress: bool = option(True, "a progress bar on stderr")
    metrics_port: int = option(0, "serve Prometheus metrics on this port (0: off)", low=0, high=65535)
    metrics_host: str = option("127.0.0.1", "address the metrics endpoint binds to")
    metrics_interval: float = option(
        1.0, "seconds between metrics collections (endpoint and metrics.jsonl)", low=0.05, high=3600
    )
    metrics_linger: float = option(
        5.0,
        "with --metrics-port: keep serving the final values this many seconds "
        "after the run, so that Prometheus scrapes them",
        low=0,
        high=3600,
    )
    plot: bool = option(False, "write PNG plots of the run into --out")

    def check(self) -> None:
        if not self.metrics_host:
            raise self.error("metrics_host", "must be an address to bind to, such as 127.0.0.1")


DEFAULT_KEEP_CHECKPOINTS = 2
SHARD_WRITERS = ("stage", "driver")


@dataclass(frozen=True)
class OutputConfig(Section):
    """Where the run's files go, and its checkpoints. ``--resume DIR`` is ``--out DIR`` of a run that
    stopped; the checkpoint settings default to None ("not given") so that giving one without
    ``--out`` is refused rather than ignored."""

    out: str | None = option(None, "write summary.json, weights.pt, metrics.jsonl and checkpoints/ into this directory")
    resume: str | None = option(
        None, "continue the run in this directory (its --out) from its newest complete checkpoint, with its settings"
    )
    overwrite: bool = option(False, "replace the run already in --out (its summary, weights, log and checkpoints)")
    checkpoints: bool = option(
        True,
        "with --out: checkpoint at each epoch end, at a stop (SIGINT/SIGTERM) and as often as "
        "--checkpoint-every / --checkpoint-minutes say",
    )
    checkpoint_every: int | None = option(
        None, "also checkpoint every N training microbatches (default: 0, off)", low=0, high=10**9
    )
    checkpoint_minutes: float | None = option(
        None, "also checkpoint when this many minutes have passed since the last one (default: 0, off)", low=0, high=1e6
    )
    keep_checkpoints: int | None = option(
        None, f"complete checkpoints kept, the newest (default: {DEFAULT_KEEP_CHECKPOINTS})", low=1, high=10000
    )
    shard_writer: str | None = option(
        None,
        "stage: each stage writes its own checkpoint shard (on a cluster, --out must be storage every node "
        "sees); driver: the stages send their shards to the driver, which writes them (default: stage)",
        choices=SHARD_WRITERS,
    )

    def __post_init__(self) -> None:
        if self.resume is not None and self.out is None:
            object.__setattr__(self, "out", self.resume)  # frozen: resolved once, here
        super().__post_init__()

    def check(self) -> None:
        if self.resume is not None and Path(self.resume) != Path(self.out or ""):
            raise self.error("resume", f"continues the run in its own directory; --out {self.out} is another one")
        if self.resume is not None and self.overwrite:
            raise self.error("overwrite", "replaces a run; --resume continues one")
        if not self.out:
            for name in ("checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "shard_writer"):
                if getattr(self, name) is not None:
                    raise self.error(name, "needs --out: checkpoints are written there")
            if self.overwrite:
                raise self.error("overwrite", "needs --out: it replaces the run in that directory")

    @property
    def checkpoint_interval(self) -> int:
        """Training microbatches between checkpoints (0: only at epoch ends and stops)."""
        return self.checkpoint_every or 0

    @property
    def checkpoint_period_s(self) -> float:
        return 60.0 * (self.checkpoint_minutes or 0.0)

    @property
    def checkpoints_kept(self) -> int:
        return self.keep_checkpoints or DEFAULT_KEEP_CHECKPOINTS

    @property
    def stages_write_shards(self) -> bool:
        return self.shard_writer != "driver"


@dataclass(frozen=True)
class RunConfig(Section):
    model: ModelConfig = option(cli=False, default_factory=ModelConfig)
    data: DataConfig = option(cli=False, default_factory=DataConfig)
    rule: RuleConfig = option(cli=False, default_factory=RuleConfig)
    optim: OptimConfig = option(cli=False, default_factory=OptimConfig)
    schedule: ScheduleConfig = option(cli=False, default_factory=ScheduleConfig)
    execution: ExecutionConfig = option(cli=False, default_factory=ExecutionConfig)
    monitoring: MonitoringConfig = option(cli=False, default_factory=MonitoringConfig)
    output: OutputConfig = option(cli=False, default_factory=OutputConfig)
    seed: int = option(0, "weights, shuffling, dropout masks: same seed, same run", low=0, high=2**31 - 1)

    def check(self) -> None:
        if self.monitoring.plot and not self.output.out:
            raise self.monitoring.error("plot", "needs --out: the plots are drawn from the run's metrics log there")
        execution = self.execution
        if execution.executor == "sequential":
            given = [name for name in RAY_ONLY if getattr(execution, name) is not None]
            if execution.window is not None and not self.rule.rule_class.uses_window:
                given.append("window")
            if execution.ray_dashboard:
                given.append("ray_dashboard")
            if given:
                raise execution.error(given[0], "applies to --executor ray only (the executor is sequential)")
        # A call fits the window: --window, or the delay a rule keeps; without either, the default
        # window is made to hold one call (ExecutionConfig.ray_window).
        per_call, delay = execution.microbatches_per_call, self.rule.rule_class.uses_window
        bound = execution.pipeline_window if delay else execution.window
        if per_call is not None and bound is not None and per_call > bound:
            whose = f", rule {self.rule.name}'s delay" if execution.window is None else ""
            raise execution.error("microbatches_per_call", f"must be at most --window ({bound}{whose})")
        if execution.ray_dashboard and execution.address:
            raise execution.error(
                "ray_dashboard", "applies to a local Ray only; a cluster serves its own dashboard (ray start ...)"
            )
        data, model = self.data, self.model
        if data.is_sequence and not model.recurrent:
            source = data.dataset if data.sequence == "none" else f"{data.dataset} by {data.sequence}"
            raise ConfigError(
                BLOCKS,
                f"the run learns from sequences ({source}), but model {model.name} has no recurrent block "
                f"({', '.join(RECURRENT_KINDS)}); give it one (as the mnist-rows preset's model has)",
            )
        if model.recurrent and not data.is_sequence:
            raise data.error(
                "sequence",
                f"model {model.name} has recurrent blocks, which learn from sequence data: "
                "--sequence rows or pixels, or --dataset adding",
            )
        # Settings of sequence runs are refused elsewhere, not ignored (at their defaults they change nothing).
        if not data.is_sequence:
            schedule, defaults = self.schedule, ScheduleConfig()
            for name in ("loss_steps", "update_every"):
                if getattr(schedule, name) != getattr(defaults, name):
                    raise schedule.error(name, f"applies to sequence data only ({data.dataset} without --sequence)")
        if data.dataset not in SEQUENCE_DATASETS and data.sequence_length != DataConfig().sequence_length:
            raise data.error("sequence_length", f"applies to --dataset adding only (the dataset is {data.dataset})")

    @property
    def num_stages(self) -> int:
        return self.model.stages or self.rule.rule_class.default_stages(self.model.num_layers)
