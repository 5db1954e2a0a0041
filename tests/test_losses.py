"""The local losses against values computed independently of the implementation."""

import math

import numpy as np
import pytest
import torch

from forwardflow.pipeline.losses import (
    batch_contrastive_loss,
    default_temperature,
    forward_forward_loss,
    goodness,
    per_class_loss,
    similarity,
)


def explicit_batch_contrastive(h: np.ndarray, targets: np.ndarray, labels: np.ndarray) -> float:
    """The published B x B form: S_ij = <h_i, t_{y_j}>, Y_ij = [y_i == y_j],
    L = -mean_i sum_j Y_ij log softmax_j(S_i.)."""
    per_sample_targets = targets[labels]
    scores = h @ per_sample_targets.T
    log_softmax = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    same = (labels[:, None] == labels[None, :]).astype(float)
    return float(-(same * log_softmax).sum(axis=1).mean())


H = np.array([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
T = np.array([[1.0, 1.0], [-1.0, 0.5]])
LABELS = np.array([0, 1, 0])


def test_batch_contrastive_with_equal_scores_is_the_label_count_weighted_log_of_batch_size():
    # All scores 0: softmax is 1/3 everywhere, so sample i contributes n_{y_i} * log 3.
    # Counts by label: [2, 1, 2] -> L = (2 + 1 + 2) / 3 * log 3.
    scores = torch.zeros(3, 2)
    loss = batch_contrastive_loss(scores, torch.tensor(LABELS))
    assert loss.item() == pytest.approx(5 / 3 * math.log(3), rel=1e-6)


def test_batch_contrastive_matches_the_explicit_three_sample_form():
    scores = similarity(torch.tensor(H), torch.tensor(T))
    loss = batch_contrastive_loss(scores, torch.tensor(LABELS))
    assert loss.item() == pytest.approx(explicit_batch_contrastive(H, T, LABELS), rel=1e-9)


def test_batch_contrastive_hand_computed_value():
    # S rows (h_i . t_0, h_i . t_1): (1, -1), (-0.5, -1), (2, 1); columns j follow labels (0, 1, 0).
    # i=0: scores (1, -1, 1): L0 = -(2 * 1 - 2 * log(2e + e^-1))
    # i=1: scores (-0.5, -1, -0.5): L1 = -(-1 - log(2e^-0.5 + e^-1))
    # i=2: scores (2, 1, 2): L2 = -(2 * 2 - 2 * log(2e^2 + e))
    e = math.e
    l0 = -(2 - 2 * math.log(2 * e + e**-1))
    l1 = -(-1 - math.log(2 * e**-0.5 + e**-1))
    l2 = -(4 - 2 * math.log(2 * e**2 + e))
    scores = similarity(torch.tensor(H), torch.tensor(T))
    assert batch_contrastive_loss(scores, torch.tensor(LABELS)).item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-9)


def test_per_class_loss_is_cross_entropy_of_class_scores():
    # Row i: -log softmax(h_i T^T)[y_i].
    scores = H @ T.T
    expected = np.mean([-(scores[i, LABELS[i]] - np.log(np.exp(scores[i]).sum())) for i in range(3)])
    loss = per_class_loss(similarity(torch.tensor(H), torch.tensor(T)), torch.tensor(LABELS))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_conv_similarity_is_the_channel_dot_product_averaged_over_positions():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, 2, 3, generator=generator, dtype=torch.float64)
    t = torch.randn(2, 4, 2, 3, generator=generator, dtype=torch.float64)
    expected = torch.zeros(3, 2, dtype=torch.float64)
    for i in range(3):
        for k in range(2):
            expected[i, k] = np.mean([float(h[i, :, y, x] @ t[k, :, y, x]) for y in range(2) for x in range(3)])
    assert torch.allclose(similarity(h, t), expected)


def test_temperature_divides_the_scores():
    h, t = torch.tensor(H), torch.tensor(T)
    assert torch.allclose(similarity(h, t, temperature=4.0) * 4.0, similarity(h, t))


def test_goodness_is_the_sum_of_squares_per_sample_and_for_conv_maps_its_mean_over_positions():
    h = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.float64)
    assert goodness(h).tolist() == pytest.approx([1 + 4 + 0.25, 9 + 1])
    maps = torch.linspace(-1.0, 2.0, 2 * 3 * 2 * 4, dtype=torch.float64).view(2, 3, 2, 4)  # B, C, H, W
    expected = [
        np.mean([sum(float(maps[b, c, y, x]) ** 2 for c in range(3)) for y in range(2) for x in range(4)])
        for b in range(2)
    ]
    assert goodness(maps).tolist() == pytest.approx(expected, rel=1e-12)


def test_forward_forward_loss_by_hand():
    # softplus(theta - G_pos) + softplus(G_neg - theta), averaged over the samples: theta = 2.
    positive, negative = torch.tensor([3.0, 1.0]), torch.tensor([0.5, 2.5])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-1.5)) + math.log1p(math.exp(1.0))) / 2
    expected += math.log1p(math.exp(0.5)) / 2
    assert forward_forward_loss(positive, negative, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_default_temperature_is_the_square_root_of_the_features_per_position():
    assert default_temperature(torch.zeros(5, 16)) == 4.0
    assert default_temperature(torch.zeros(5, 9, 7, 3)) == 3.0  # 9 channels at each of 7 x 3 positions


@pytest.mark.parametrize("positives", ["all", "one", "topk"])
def test_batch_contrastive_ignores_classes_absent_from_the_microbatch(positives):
    # Class 2 has no sample: it is not a column of S (no j has y_j = 2), whatever its score.
    scores = similarity(torch.tensor(H), torch.tensor(T))
    labels = torch.tensor(LABELS)
    with_absent = torch.cat([scores, torch.full((3, 1), 50.0, dtype=scores.dtype)], dim=1)
    assert batch_contrastive_loss(with_absent, labels, positives, topk=1).item() == pytest.approx(
        batch_contrastive_loss(scores, labels, positives, topk=1).item(), rel=1e-9
    )


def test_batch_contrastive_positive_weights_by_hand():
    # Equal scores (softmax 1/B = 1/5 for every j), labels with counts n = (3, 2):
    # all: P_i = n_{y_i}; one: P_i = 1; topk with k = 2: P_i = min(2, n_{y_i}).
    scores, labels = torch.zeros(5, 2), torch.tensor([0, 0, 0, 1, 1])
    log5 = math.log(5)
    assert batch_contrastive_loss(scores, labels, "all").item() == pytest.approx((3 * 3 + 2 * 2) / 5 * log5)
    assert batch_contrastive_loss(scores, labels, "one").item() == pytest.approx(log5)
    assert batch_contrastive_loss(scores, labels, "topk", topk=2).item() == pytest.approx(2 * log5)
    assert batch_contrastive_loss(scores, labels, "topk", topk=3).item() == pytest.approx((3 * 3 + 2 * 2) / 5 * log5)
