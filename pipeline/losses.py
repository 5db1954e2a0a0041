"""Local losses. Every one takes ``scores`` or activations of a single stage: nothing here reaches
across a stage boundary.

Signal Propagation scores a sample against the K class targets instead of against the B targets
of the microbatch: ``S_ij = <h_i, t_{y_j}>`` takes only K distinct values per row, so the
batch-contrastive loss is computed exactly from the K×K-free ``B×K`` matrix and the label counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32: under bfloat16 autocast (--bf16) the losses are still summed in float32."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


def similarity(h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``S_ik = <h_i, t_k> / temperature``; for conv feature maps the channel dot product at each
    spatial position, averaged over positions (= the flattened dot product divided by H*W)."""
    positions = h.shape[2:].numel()  # H*W of a conv map; 1 for (B, F) features
    return h.flatten(1) @ targets.flatten(1).T / (positions * temperature)


def default_temperature(h: torch.Tensor) -> float:
    """sqrt(features per position): unit-scale features then give O(1) scores, as in scaled
    dot-product attention, and the softmax does not saturate in wide layers."""
    return float(h.shape[1]) ** 0.5


def _label_counts(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    if labels.is_cuda:
        # Not torch.bincount there: on a GPU it reads the largest label on the host to size its
        # output. Both count exactly, so every device gets the same values.
        classes = torch.arange(num_classes, device=labels.device)
        return (labels[:, None] == classes).sum(0).to(dtype)
    return torch.bincount(labels, minlength=num_classes).to(dtype)


def batch_contrastive_loss(
    scores: torch.Tensor, labels: torch.Tensor, positives: str = "all", topk: int = 4
) -> torch.Tensor:
    """``L = -mean_i sum_j Y_ij log softmax_j(S_i.)`` over the microbatch, from class scores.

    ``S_ij`` repeats ``S_{i,y_j}`` for every sample j of class y_j, so the softmax denominator is
    ``sum_k n_k exp(S_ik)`` over classes present (n_k = label count), and the sum over the
    positives j of sample i is ``P_i * log softmax`` of its own class, where P_i is
    - ``all``: every same-label sample (itself included), P_i = n_{y_i};
    - ``one``: only itself, P_i = 1;
    - ``topk``: its k most similar same-label samples; with one target row per class they tie,
      so P_i = min(k, n_{y_i}).
    """
    scores = full_precision(scores)
    counts = _label_counts(labels, scores.shape[1], scores.dtype)
    log_counts = torch.where(counts > 0, counts.clamp_min(1).log(), torch.full_like(counts, -torch.inf))
    log_softmax_own = scores.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(scores + log_counts, dim=1)
    own_count = counts[labels]
    if positives == "one":
        weight = torch.ones_like(own_count)
    elif positives == "topk":
        weight = own_count.clamp_max(topk)
    else:
        weight = own_count
    return -(weight * log_softmax_own).mean()


def per_class_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``L = CE(h T^T, c)`` with one target per class."""
    return F.cross_entropy(full_precision(scores), labels)


def goodness(h: torch.Tensor) -> torch.Tensor:
    """Forward-Forward goodness: sum of squared activations per sample (mean over conv positions)."""
    squares = full_precision(h).pow(2).flatten(1).sum(1)
    return squares / h.shape[2:].numel()  # positions: H*W of a conv map; 1 for (B, F) features


def forward_forward_loss(goodness_pos: torch.Tensor, goodness_neg: torch.Tensor, threshold: float) -> torch.Tensor:
    """``softplus(theta - G_pos) + softplus(G_neg - theta)``, averaged over the microbatch."""
    return (F.softplus(threshold - goodness_pos) + F.softplus(goodness_neg - threshold)).mean()
