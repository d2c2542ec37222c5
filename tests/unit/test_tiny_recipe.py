"""The tiny model's demonstrator: how often it is wrong on each problem (pure: no model is built)."""

import pytest

from apo_ray.model.tiny import make_recipe, wrong_prob


def test_error_rate_rises_with_the_answer_from_min_to_max():
    rec = make_recipe()
    assert wrong_prob(0, rec) == pytest.approx(rec.wrong_frac)
    assert wrong_prob(198, rec) == pytest.approx(rec.wrong_frac_max)  # 99 + 99, the largest 2-digit sum
    rates = [wrong_prob(a, rec) for a in range(199)]
    assert rates == sorted(rates) and rates[99] == pytest.approx((rec.wrong_frac + rec.wrong_frac_max) / 2)


def test_without_a_max_the_error_rate_is_one_number():
    rec = make_recipe(wrong_frac=0.65, wrong_frac_max=None)
    assert {wrong_prob(a, rec) for a in (0, 57, 198)} == {0.65}


def test_the_scale_follows_the_task():
    rec = make_recipe(digits=3, ops="+-")
    assert wrong_prob(1998, rec) == pytest.approx(rec.wrong_frac_max)  # 999 + 999
    assert wrong_prob(-999, rec) == pytest.approx(wrong_prob(999, rec))


def test_subtraction_alone_scales_by_its_own_largest_answer():
    rec = make_recipe(ops="-")
    assert wrong_prob(-99, rec) == pytest.approx(rec.wrong_frac_max)  # 0 - 99
    assert wrong_prob(-50, rec) < rec.wrong_frac_max


def test_the_base_rate_cannot_be_none():
    with pytest.raises(ValueError, match="wrong_frac"):
        make_recipe(wrong_frac=None)


@pytest.mark.parametrize("key", ["wrong_frac", "wrong_frac_max"])
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_rates_outside_0_1_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        make_recipe(**{key: value})
