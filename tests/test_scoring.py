import random

import pytest

from mics_agents.scoring import competitiveness, item_rng, mics_score, path_trend, pick_full_score, pick_to_continue


def test_mics_score_is_share_correct():
    assert mics_score([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        mics_score([])


def test_competitiveness_is_a_product():
    assert competitiveness([0.5, 0.5]) == 0.25
    assert competitiveness([]) == 1.0


@pytest.mark.parametrize(
    "scores, trend",
    [
        ([1.0], "constant"),
        ([0.5, 0.5], "constant"),
        ([0.25, 0.5, 1.0], "increasing"),
        ([0.5, 0.5, 1.0], "increasing"),
        ([0.75, 0.5], "non-increasing"),
        ([0.5, 0.75, 0.25], "fluctuating"),
    ],
)
def test_trend(scores, trend):
    assert path_trend(scores) == trend


def test_item_rng_is_fixed_by_seed_and_id():
    assert item_rng(1, "a").random() == item_rng(1, "a").random()
    assert item_rng(1, "a").random() != item_rng(2, "a").random()
    assert item_rng(1, "a").random() != item_rng(1, "b").random()


def test_pick_full_score_prefers_competitiveness():
    rng = random.Random(0)
    assert pick_full_score(["a", "b"], {"a": [0.5], "b": [0.75]}, rng) == "b"


def test_pick_to_continue_prefers_fresh_mentors_on_ties():
    rng = random.Random(0)
    assert pick_to_continue({"a": 0.5, "b": 0.5, "c": 0.25}, {"a"}, rng) == "b"
    assert pick_to_continue({"a": 0.75, "b": 0.5}, {"a"}, rng) == "a"


def test_competitiveness_is_the_product_not_the_published_codes_one_plus_sum():
    """The published select_best_mentor ranks by 1 + the sum of earlier scores; the paper's rule (DESIGN §3)
    is the product, which a single zero sinks: a steady mentor beats one that once led nobody anywhere."""
    rng = random.Random(0)
    earlier = {"steady": [0.5, 0.5], "erratic": [0.9, 0.2]}  # products 0.25 vs 0.18; 1 + sums 2.0 vs 2.1
    assert pick_full_score(["steady", "erratic"], earlier, rng) == "steady"
    assert pick_full_score(["steady", "zeroed"], {"steady": [0.25, 0.25], "zeroed": [1.0, 0.0]}, rng) == "steady"
