"""The statistics behind the verdicts (aird/core/stats.py), against values worked out by hand."""

import math

import pytest

from aird.core import stats


def test_wilson_interval_matches_the_formula_and_stays_in_bounds():
    lo, hi = stats.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert stats.wilson(0, 20)[0] == 0.0 and 0.15 < stats.wilson(0, 20)[1] < 0.17
    assert stats.wilson(3, 0) is None


def test_mcnemar_floor_and_detectable_change():
    assert stats.mcnemar_floor() == 6                     # 2/2^6 = 0.031 < 0.05 <= 2/2^5
    assert stats.mcnemar_exact(6, 0) < 0.05 <= stats.mcnemar_exact(5, 0)
    mdes = [stats.mcnemar_mde(n, n // 5) for n in (50, 100, 200, 400)]
    assert all(a > b for a, b in zip(mdes, mdes[1:]))     # more prompts detect smaller changes
    assert stats.mcnemar_mde(100, 0) >= 6 / 100
    # 200 prompts, 20% discordant: (1.96 + 0.84) * sqrt(0.2 / 200) = 0.0886
    assert stats.mcnemar_mde(200, 40) == pytest.approx(0.0886, abs=5e-4)


def test_spearman_exact_permutation_p():
    r = stats.spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert r["rho"] == pytest.approx(1.0) and r["exact"]
    assert r["p_greater"] == pytest.approx(1 / 120) and r["p_less"] == pytest.approx(1.0)
    assert stats.spearman([1, 2], [1, 2])["rho"] is None          # too few points to test
    assert stats.spearman([1, 1, 1], [1, 2, 3])["rho"] is None    # no ranking on one side
    big = stats.spearman(list(range(12)), list(range(12)), seed=1)
    assert not big["exact"] and big["p_greater"] < 0.001


def test_permutation_test_of_two_groups():
    t = stats.permutation_means([1.0, 2.0], [3.0, 4.0])
    assert t["splits"] == 6 and t["p_less"] == pytest.approx(1 / 6) and t["p_greater"] == pytest.approx(1.0)
    t = stats.permutation_means([0.5, 0.6, 0.7, 0.8], [0.97, 0.98, 0.99])
    assert t["p_less"] == pytest.approx(1 / 35)


def test_paired_bootstrap_of_a_change():
    a = [[0, 1, 1, 0, 1] * 20, [1, 0] * 30]
    same = stats.paired_bootstrap(a, a)
    assert same["estimate"] == 0 and tuple(same["ci"]) == (0, 0) and same["n"] == 160
    shifted = stats.paired_bootstrap([[0] * 50], [[1] * 50])
    assert shifted["estimate"] == 1 and tuple(shifted["ci"]) == (1, 1)
    noisy = stats.paired_bootstrap([[0] * 100], [[1] * 10 + [0] * 90], seed=3)
    lo, hi = noisy["ci"]
    assert noisy["estimate"] == pytest.approx(0.1) and 0.03 < lo < 0.1 < hi < 0.17
    with pytest.raises(ValueError):
        stats.paired_bootstrap([[0, 1]], [[0]])


def test_perplexity_ratio_and_mean_interval():
    before = [1000.0 + 10 * i for i in range(20)]
    after = [b + 100 * math.log(2) for b in before]           # 100 tokens a window, each loss up by log 2
    r = stats.perplexity_ratio(before, after, 100)
    assert r["estimate"] == pytest.approx(2.0) and r["ci"][0] == pytest.approx(2.0)
    m = stats.mean_ci([-2.0, -1.0, -1.5, -0.5, -1.0] * 4)
    assert m["estimate"] == pytest.approx(-1.2) and m["ci"][1] < 0


@pytest.mark.parametrize("ci,verdict", [((-0.005, 0.008), "holds"), ((-0.03, -0.015), "does not hold"),
                                        ((-0.02, 0.004), "inconclusive"), (None, "not tested")])
def test_equivalence_verdicts(ci, verdict):
    assert stats.equivalence(ci, 0.01) == verdict


def test_directional_and_combined_verdicts():
    assert stats.directional(0.01, 0.99) == "holds"
    assert stats.directional(0.9, 0.02) == "does not hold"
    assert stats.directional(0.2, 0.6) == "inconclusive"
    assert stats.combine(["holds", "holds"]) == "holds"
    assert stats.combine(["holds", "inconclusive"]) == "inconclusive"
    assert stats.combine(["holds", "does not hold"]) == "does not hold"
    assert stats.combine(["not tested"]) == "not tested"


def test_gap_removed_share_and_its_interval():
    harmless = [-3.0, -3.5, -2.5, -3.0]                       # mean −3
    base = [1.0, 0.0, -1.0, 0.0, 1.0, -1.0]                   # mean 0: the gap is 3
    # ablation takes every harmful prompt 3 lower: exactly the gap, with no spread in the change
    r = stats.gap_removed(base, [b - 3 for b in base], harmless)
    assert r["estimate"] == pytest.approx(1.0) and r["n_harmful"] == 6 and r["n_harmless"] == 4
    lo, hi = r["ci"]
    assert lo < 1.0 < hi                                      # the gap itself is resampled: an interval
    # nothing removed: 0; half removed on average
    assert stats.gap_removed(base, base, harmless)["estimate"] == 0
    assert stats.gap_removed(base, [b - 1.5 for b in base], harmless)["estimate"] == pytest.approx(0.5)
    # harmful prompts scoring below the harmless ones: no gap, no share
    assert stats.gap_removed([-4.0, -5.0], [-6.0, -7.0], harmless)["estimate"] is None
    with pytest.raises(ValueError):
        stats.gap_removed(base, base[:-1], harmless)
