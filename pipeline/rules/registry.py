"""Rule name -> stage rule class."""

from __future__ import annotations

from pipeline.rules.backprop import BackpropRule
from pipeline.rules.base import RuleContext, StageRule
from pipeline.rules.sigprop import SigPropRule

RULE_CLASSES: dict[str, type[StageRule]] = {
    "sigprop": SigPropRule,
    "bp": BackpropRule,
}


def make_rule(context: RuleContext) -> StageRule:
    return RULE_CLASSES[context.config.name](context)
