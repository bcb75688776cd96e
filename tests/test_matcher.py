"""Matching and sampling: the Matcher against torchvision's, the balanced sampler's invariants, and
crowd regions."""

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection._utils import Matcher as TVMatcher

from maskrcnn.modeling.matcher import Matcher, ignore_crowd, match_boxes, sample_balanced

# (high, low): the RPN's and the box head's thresholds, and one with a wide ignore band.
THRESHOLDS = [(0.7, 0.3), (0.5, 0.5), (0.6, 0.2)]


def quantised_iou(m, r, generator):
    """(m, r) IoU-like values on a 0.05 grid, so that many candidates tie for a ground truth's best."""
    return torch.randint(0, 21, (m, r), generator=generator).float() / 20


@pytest.mark.parametrize("allow_low_quality", [False, True])
@pytest.mark.parametrize("high, low", THRESHOLDS)
def test_matches_equal_torchvision(high, low, allow_low_quality):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        m, r = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 60, (1,), generator=g))
        iou = quantised_iou(m, r, g) * (0.3 if trial % 2 else 1.0)  # odd trials: only low-quality overlaps
        ours = Matcher(high_threshold=high, low_threshold=low, allow_low_quality_matches=allow_low_quality)(iou)
        expected = TVMatcher(high, low, allow_low_quality_matches=allow_low_quality)(iou.clone())
        assert ours.dtype == torch.int64
        assert torch.equal(ours, expected), (trial, iou)


def test_low_quality_matches_include_ties():
    iou = torch.tensor([[0.2, 0.4, 0.4, 0.1],
                        [0.0, 0.1, 0.3, 0.35]])
    matches = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)(iou)
    # gt 0's best (0.4) is shared by candidates 1 and 2; gt 1's best is candidate 3.
    assert matches.tolist() == [Matcher.BELOW_LOW, 0, 0, 1]


def test_no_ground_truth_makes_everything_background():
    candidates = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    matcher = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)
    matches = match_boxes(matcher, torch.zeros(0, 4), candidates)
    assert matches.tolist() == [Matcher.BELOW_LOW, Matcher.BELOW_LOW]


def test_low_threshold_above_high_is_refused():
    with pytest.raises(ValueError, match="low_threshold 0.8"):
        Matcher(high_threshold=0.5, low_threshold=0.8, allow_low_quality_matches=False)


def random_labels(n, p_pos, p_neg, generator):
    """(n,) int64 labels: positives in 1..3 with probability p_pos, 0 with p_neg, -1 otherwise."""
    u = torch.rand(n, generator=generator)
    labels = torch.full((n,), -1, dtype=torch.int64)
    labels[u < p_pos + p_neg] = 0
    pos = u < p_pos
    labels[pos] = torch.randint(1, 4, (int(pos.sum()),), generator=generator)
    return labels


# (candidates, positive probability, negative probability): plenty of both, scarce positives,
# scarce negatives, no positives at all, nothing sampleable.
CASES = [(1000, 0.3, 0.5), (1000, 0.002, 0.6), (300, 0.5, 0.05), (200, 0.0, 0.7), (50, 0.0, 0.0)]


@pytest.mark.parametrize("n, p_pos, p_neg", CASES)
def test_sample_balanced_invariants_and_counts(n, p_pos, p_neg):
    g = torch.Generator().manual_seed(3)
    labels = random_labels(n, p_pos, p_neg, g)
    batch, fraction = 128, 0.25
    torch.manual_seed(0)
    pos, neg = sample_balanced(labels, batch, fraction)
    assert pos.dtype == neg.dtype == torch.int64
    assert len(pos) <= int(batch * fraction)
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()  # -1 is never sampled
    assert len(set(pos.tolist())) == len(pos) and len(set(neg.tolist())) == len(neg)
    num_pos, num_neg = int((labels >= 1).sum()), int((labels == 0).sum())
    assert len(pos) == min(num_pos, int(batch * fraction))
    assert len(neg) == min(num_neg, batch - len(pos))  # negatives fill what positives leave
    pos_mask, neg_mask = BalancedPositiveNegativeSampler(batch, fraction)([labels])
    assert (len(pos), len(neg)) == (int(pos_mask[0].sum()), int(neg_mask[0].sum()))


def test_sample_balanced_is_random():
    labels = torch.zeros(1000, dtype=torch.int64)
    labels[:500] = 1
    torch.manual_seed(0)
    first = sample_balanced(labels, 64, 0.5)
    second = sample_balanced(labels, 64, 0.5)
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])


def test_ignore_crowd_marks_background_inside_crowd_only():
    crowd = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    candidates = torch.tensor([
        [10.0, 10.0, 30.0, 30.0],   # 0: background, wholly inside the crowd box -> ignored
        [20.0, 20.0, 60.0, 60.0],   # 1: positive inside the crowd box -> stays matched
        [200.0, 200.0, 220.0, 220.0],  # 2: background far away -> stays background
        [80.0, 0.0, 120.0, 20.0],   # 3: background, half inside (ioa = 0.5) -> ignored
        [90.0, 0.0, 130.0, 20.0],   # 4: background, a quarter inside -> stays background
        [50.0, 50.0, 70.0, 70.0],   # 5: already ignored -> stays ignored
    ])
    matches = torch.tensor([Matcher.BELOW_LOW, 0, Matcher.BELOW_LOW, Matcher.BELOW_LOW, Matcher.BELOW_LOW,
                            Matcher.BETWEEN])
    out = ignore_crowd(matches, candidates, crowd)
    assert out.tolist() == [Matcher.BETWEEN, 0, Matcher.BELOW_LOW, Matcher.BETWEEN, Matcher.BELOW_LOW,
                            Matcher.BETWEEN]
    assert matches[0] == Matcher.BELOW_LOW  # the input is not modified


def test_ignore_crowd_without_crowd_boxes_changes_nothing():
    matches = torch.tensor([Matcher.BELOW_LOW, 1])
    out = ignore_crowd(matches, torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 4.0, 4.0]]), torch.zeros(0, 4))
    assert torch.equal(out, matches)
