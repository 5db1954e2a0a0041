"""What a task's targets are and how its predictions are scored: classes (accuracy) or real values
(mean squared error).

The task declares it (``Dataset.target``), not the rule: every rule's output head, the training
loop's evaluation, the summary, the progress bar and the exporter read the one ``TargetSpec`` of the
run. A rule that learns from classes (Signal Propagation's class targets) sees a real-valued target
through its bin: ``classes_of`` splits the target's range into ``num_classes`` equal bins, and
``from_classes`` turns a predicted bin back into its centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Metric:
    """How predictions are scored: the mean over the scored samples of ``total``'s per-sample terms."""

    name: str  # the summary's key: test_<name>, and test_<plural> per prediction
    plural: str
    label: str  # in tables and on the progress bar
    higher_is_better: bool
    percent: bool  # shown as a percentage
    record_field: str  # the metrics log's field (monitoring.records.RunRecord)
    prometheus_name: str  # the exported gauge, without the forwardflow_ prefix
    help: str

    def total(self, predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The sum of the per-sample terms (hits, or squared errors) of one microbatch, as a
        float64 tensor where the prediction is: the caller reads its sums once per pass."""
        if self.higher_is_better:
            return (predicted == labels).sum(dtype=torch.float64)
        return (predicted.double() - labels.double()).pow(2).sum()

    def format(self, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.2f}%" if self.percent else f"{value:.4f}"


ACCURACY = Metric(
    "accuracy",
    "accuracies",
    "accuracy",
    higher_is_better=True,
    percent=True,
    record_field="test_accuracy",
    prometheus_name="test_accuracy_ratio",
    help="Test accuracy after the latest epoch, per predictor",
)
MSE = Metric(
    "mse",
    "mses",
    "MSE",
    higher_is_better=False,
    percent=False,
    record_field="test_mse",
    prometheus_name="test_mean_squared_error",
    help="Test mean squared error after the latest epoch, per predictor (regression tasks)",
)
METRICS = (ACCURACY, MSE)


@dataclass(frozen=True)
class TargetSpec:
    """Classes (``values`` None), or a real value in ``values = (low, high)``, seen by class-based
    rules as ``num_classes`` equal bins of that range."""

    num_classes: int
    values: tuple[float, float] | None = None

    @property
    def metric(self) -> Metric:
        return ACCURACY if self.values is None else MSE

    @property
    def head_outputs(self) -> int:
        """Outputs of an output head: one score per class, or the value itself."""
        return self.num_classes if self.values is None else 1

    def head_loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.values is None:
            return F.cross_entropy(outputs, labels)
        return F.mse_loss(outputs.squeeze(1), labels.to(outputs.dtype))

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """A head's prediction: its best class, or its value (detached: a prediction goes to the
        driver, not into a backward pass)."""
        return outputs.argmax(1) if self.values is None else outputs.detach().squeeze(1)

    def classes_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels: the labels themselves, or the bin of each value (values outside the range
        go to the first or last bin)."""
        if self.values is None:
            return labels
        low, high = self.values
        position = (labels.float() - low) / (high - low) * self.num_classes
        return position.floor().long().clamp(0, self.num_classes - 1)

    def from_classes(self, classes: torch.Tensor) -> torch.Tensor:
        """A predicted class as a prediction: the class, or the centre of its bin."""
        if self.values is None:
            return classes
        low, high = self.values
        return low + (classes.float() + 0.5) * (high - low) / self.num_classes
