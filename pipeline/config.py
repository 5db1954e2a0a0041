"""Configuration dataclasses, one per component, each validated in ``__post_init__``.

A validation failure raises :class:`ConfigError` naming the field the way the command line spells
it (``--batch-size``), so the launcher can print one line and exit with status 2 before any actor
starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DATASETS = ("mnist", "fashion-mnist", "cifar10", "synthetic")
RULES = ("sigprop", "ff", "local", "efp", "bp")
SIGPROP_LOSSES = ("contrastive", "per-class")
POSITIVES = ("all", "one", "topk")
TARGET_LAYERS = ("learned", "fixed")
# RuleConfig fields that only some rules read: a command-line flag for another rule is refused.
RULE_OPTIONS = {
    "loss": ("sigprop",), "positives": ("sigprop",), "topk": ("sigprop",), "target_layer": ("sigprop",),
    "temperature": ("sigprop",), "ff_threshold": ("ff",), "ff_hard_negatives": ("ff",), "head_width": ("local",),
}
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
EXECUTORS = ("ray", "sequential")
PLACEMENTS = ("pack", "spread")
BLOCK_KINDS = (
    "linear", "conv", "batchnorm", "layernorm", "relu", "tanh", "gelu",
    "maxpool", "avgpool", "flatten", "dropout",
)
LAYER_KINDS = ("linear", "conv")  # blocks that carry weights and start a new layer


class ConfigError(ValueError):
    """Bad input: names the field (as a command-line flag) and what is allowed."""

    def __init__(self, field_name: str, message: str):
        self.field_name = field_name
        self.message = message
        super().__init__(f"{flag_name(field_name)}: {message}")


def flag_name(field_name: str) -> str:
    return field_name if field_name.startswith("-") else "--" + field_name.replace("_", "-")


def _one_of(field_name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(field_name, f"{value!r} is not one of {', '.join(allowed)}")


def _in_range(field_name: str, value: float, low: float, high: float, kind: type = int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ConfigError(field_name, f"must be {'an integer' if kind is int else 'a number'} (got {value!r})")
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(field_name, f"must be between {low:g} and {high:g} (got {value!r})")


@dataclass(frozen=True)
class BlockSpec:
    """One block of a model: ``width`` is out features (linear) or out channels (conv)."""

    kind: str
    width: int = 0
    kernel_size: int = 3
    padding: int = 1
    p: float = 0.0

    def __post_init__(self):
        _one_of("model", self.kind, BLOCK_KINDS)
        if self.kind in LAYER_KINDS:
            _in_range("model", self.width, 1, 1 << 16)
        if self.kind == "dropout":
            _in_range("model", self.p, 0.0, 0.99, float)


@dataclass(frozen=True)
class ModelConfig:
    """A network as a list of blocks; ``stages`` groups consecutive layers (0 = one per layer)."""

    name: str
    blocks: tuple[BlockSpec, ...]
    stages: int = 0
    head: bool = True  # a linear output layer trained on detached last features

    def __post_init__(self):
        if not self.blocks:
            raise ConfigError("model", "needs at least one block")
        _in_range("stages", self.stages, 0, 1024)
        if self.stages > self.num_layers:
            raise ConfigError("stages", f"must be between 1 and {self.num_layers}, the number of "
                                        f"layers of model {self.name} (got {self.stages})")

    @property
    def num_layers(self) -> int:
        return sum(block.kind in LAYER_KINDS for block in self.blocks)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    data_dir: str | None = None  # None: $FORWARDFLOW_DATA_DIR, then the set-up path's locations
    batch_size: int = 512
    eval_batch_size: int = 1000
    train_limit: int = 0  # use only the first N training samples (0 = all)
    test_limit: int = 0
    augment: bool = False  # random crop with padding and horizontal flip (images with 3 channels)

    def __post_init__(self):
        _one_of("dataset", self.dataset, DATASETS)
        _in_range("batch_size", self.batch_size, 1, 65536)
        _in_range("eval_batch_size", self.eval_batch_size, 1, 65536)
        _in_range("train_limit", self.train_limit, 0, 10**9)
        _in_range("test_limit", self.test_limit, 0, 10**9)


@dataclass(frozen=True)
class RuleConfig:
    """The learning rule: what the target signal is and what each stage's local loss is."""

    name: str = "sigprop"
    loss: str = "contrastive"  # sigprop: contrastive (batch) or per-class
    positives: str = "all"  # contrastive: which same-label samples count as positives
    topk: int = 4
    temperature: float = 0.0  # scores are <h, t> / temperature; 0: sqrt(features per position)
    target_loss: bool = True  # sigprop, learned target layer: its own local loss at the input
    target_layer: str = "learned"  # sigprop: learned projection of the label, or fixed random
    ff_threshold: float = 0.25  # forward-forward goodness threshold theta, per unit (see rules/ff.py)
    ff_hard_negatives: bool = False
    head_width: int = 0  # local heads: hidden width of each stage's classifier (0 = linear)

    def __post_init__(self):
        _one_of("rule", self.name, RULES)
        _one_of("loss", self.loss, SIGPROP_LOSSES)
        _one_of("positives", self.positives, POSITIVES)
        _one_of("target_layer", self.target_layer, TARGET_LAYERS)
        _in_range("topk", self.topk, 1, 65536)
        _in_range("temperature", self.temperature, 0.0, 1e6, float)
        _in_range("ff_threshold", self.ff_threshold, 0.0, 1e6, float)
        _in_range("head_width", self.head_width, 0, 1 << 16)
        if self.loss == "per-class" and self.positives != "all":
            raise ConfigError("positives", "chooses the positives of --loss contrastive; --loss per-class "
                                           "scores each sample against one target per class")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "constant"  # cosine: decay to 0 over the run's training microbatches

    def __post_init__(self):
        _one_of("optimizer", self.name, OPTIMIZERS)
        _one_of("schedule", self.schedule, SCHEDULES)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (0 < self.lr <= 10):
            raise ConfigError("lr", f"must be a number in (0, 10] (got {self.lr!r})")
        _in_range("weight_decay", self.weight_decay, 0.0, 1.0, float)
        _in_range("momentum", self.momentum, 0.0, 0.999, float)


@dataclass(frozen=True)
class ExecutionConfig:
    """Where and how stages run: the Ray pipeline or the in-process sequential runner."""

    executor: str = "ray"
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    window: int = 8  # microbatches in flight; bounds memory for any run length
    address: str | None = None  # an existing Ray cluster; None starts a local one
    placement: str = "pack"
    torch_threads: int = 1  # per stage (per actor); more threads per actor was slower on CPU
    metrics_port: int = 0  # 0: no Prometheus endpoint
    metrics_host: str = "127.0.0.1"

    def __post_init__(self):
        _one_of("executor", self.executor, EXECUTORS)
        _one_of("placement", self.placement, PLACEMENTS)
        _in_range("window", self.window, 1, 1024)
        _in_range("torch_threads", self.torch_threads, 1, 256)
        _in_range("metrics_port", self.metrics_port, 0, 65535)
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ConfigError("device", f"{device!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig | None = None
    rule: RuleConfig = field(default_factory=RuleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    epochs: int = 1
    seed: int = 0
    out: str | None = None
    run_id: str = ""

    def __post_init__(self):
        if self.model is None:
            raise ConfigError("model", "a model is required")
        _in_range("epochs", self.epochs, 1, 10000)
        _in_range("seed", self.seed, 0, 2**31 - 1)
        if self.rule.name == "bp" and self.model.stages > 1:
            raise ConfigError("stages", "rule bp trains end to end through one stage; use --stages 1")
        if self.rule.name == "efp" and not self.model.head:
            raise ConfigError("rule", f"efp feeds the output head's error back to the front; model "
                                      f"{self.model.name} has no output head")

    @property
    def num_stages(self) -> int:
        if self.model.stages:
            return self.model.stages
        return 1 if self.rule.name == "bp" else self.model.num_layers
