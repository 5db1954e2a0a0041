"""Every learning rule, by name. Adding a rule: its own file, one line here, and its tests."""

from __future__ import annotations

from forwardflow.pipeline.rules.backprop import BackpropRule
from forwardflow.pipeline.rules.base import Rule
from forwardflow.pipeline.rules.bptt import BPTTRule
from forwardflow.pipeline.rules.efp import ErrorForwardRule
from forwardflow.pipeline.rules.ff import ForwardForwardRule
from forwardflow.pipeline.rules.local import LocalHeadsRule
from forwardflow.pipeline.rules.rtrl import RTRLRule
from forwardflow.pipeline.rules.sigprop import SigPropRule
from forwardflow.pipeline.rules.tbptt import TruncatedBPTTRule

RULES: dict[str, type[Rule]] = {
    rule.name: rule
    for rule in (
        SigPropRule,
        ForwardForwardRule,
        LocalHeadsRule,
        ErrorForwardRule,
        BackpropRule,
        BPTTRule,
        TruncatedBPTTRule,
        RTRLRule,
    )
}
