"""Backpropagation through time: the whole sequence runs forward, every step's activations are kept,
and at the last step the error goes back from the last step to the first. It is TBPTT(T, T) for
sequences of T steps (pipeline/rules/tbptt.py): one update per sequence, at its last step, with the
gradient of the sum of the losses of its supervised steps (``--loss-steps``)."""

from __future__ import annotations

from forwardflow.pipeline.messages import TimeStep
from forwardflow.pipeline.rules.base import RuleOptions
from forwardflow.pipeline.rules.tbptt import TruncatedBPTTRule


class BPTTRule(TruncatedBPTTRule):
    name = "bptt"
    Options = RuleOptions  # no options of its own: the window is the whole sequence

    def window(self, time: TimeStep) -> tuple[int, int]:
        return time.length, time.length
