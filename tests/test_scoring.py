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
