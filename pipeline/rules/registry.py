"""Rule name -> stage rule class, the rule's compatibility check, and its feedback loop."""

from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.rules.backprop import BackpropRule
from pipeline.rules.base import Feedback, RuleContext, StageRule
from pipeline.rules.efp import ErrorForwardRule
from pipeline.rules.ff import ForwardForwardRule
from pipeline.rules.local import LocalHeadsRule
from pipeline.rules.sigprop import SigPropRule

RULE_CLASSES: dict[str, type[StageRule]] = {
    "sigprop": SigPropRule,
    "ff": ForwardForwardRule,
    "local": LocalHeadsRule,
    "efp": ErrorForwardRule,
    "bp": BackpropRule,
}


def make_rule(context: RuleContext) -> StageRule:
    return RULE_CLASSES[context.config.name](context)


def check_rule(config: TrainConfig, num_classes: int, input_shape: tuple[int, ...]) -> None:
    """Raise ConfigError if ``config``'s rule cannot work with its model on this data."""
    RULE_CLASSES[config.rule.name].check(config, num_classes, input_shape)


def make_feedback(config: TrainConfig, num_classes: int, input_shape: tuple[int, ...]) -> Feedback:
    """What the training loop feeds back from the output to the front (nothing for most rules)."""
    return RULE_CLASSES[config.rule.name].make_feedback(config, num_classes, input_shape)
