"""Rank correlations and pairwise agreement, checked on values worked out by hand."""

import pytest

from selfreward.run.metrics import both_orders_verdict, distinct_n, kendall_tau_b, pairwise_agreement, ranks, spearman


def test_ranks_share_ties():
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = (0, 0, 1, -1): rho = 1 - 6*2 / (4*15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant: undefined


def test_kendall_known_values():
    # pairs of [1,2,3,4] vs [1,2,4,3]: 5 concordant, 1 discordant -> (5-1)/6
    assert kendall_tau_b([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    # x ties once: n0=3, n1=1, n2=0 -> C=2, D=0, tau_b = 2 / sqrt((3-1)*(3-0))
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / (2 * 3) ** 0.5)


def test_pairwise_agreement_within_groups_only():
    groups = ["a", "a", "a", "b", "b"]
    reference = [3, 2, 2, 1, 5]  # pairs ordered strictly: a0>a1, a0>a2, b4>b3 (a1=a2 is skipped)
    other = [9, 1, 9, 0, 1]  # a0>a1 agrees, a0=a2 tie (half), b4>b3 agrees
    frac, pairs = pairwise_agreement(groups, reference, other)
    assert pairs == 3 and frac == pytest.approx(2.5 / 3)


def test_distinct_n():
    # unigrams: a b a b c -> 3 unique of 5; bigrams: ab ba ab bc -> 3 unique of 4
    assert distinct_n(["a b a", "b c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a b c"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["A b", "a B"], 2) == pytest.approx(1 / 2)  # case-insensitive
    assert distinct_n(["one"], 2) is None


def test_both_orders_tie_rule():
    assert both_orders_verdict("A", "B") == "win"  # picked as A, then picked as B
    assert both_orders_verdict("B", "A") == "loss"
    assert both_orders_verdict("A", "A") == "tie"  # the judge always picks the first position
    assert both_orders_verdict("B", "B") == "tie"
