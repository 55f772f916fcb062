"""Statistics over seeds (§4.1 "statistically significantly lower", §5.1 "8 trained CLIP models")."""
from __future__ import annotations

import json
import math

import pytest

from clip_poison.metrics.stats import compare_accuracy, compare_accuracy_paired, summarize


def test_t_interval_by_hand():
    # values 1..5: mean 3, sample var = (4+1+0+1+4)/4 = 2.5, std = √2.5 ≈ 1.581139,
    # sem = std/√5 = √0.5 ≈ 0.707107; t_{0.975, df=4} = 2.776445 (t table),
    # half-width = 2.776445 · 0.707107 ≈ 1.963243 → (1.036757, 4.963243).
    r = summarize([1, 2, 3, 4, 5])
    assert r["mean"] == 3.0 and r["n"] == 5
    assert r["std"] == pytest.approx(math.sqrt(2.5), abs=1e-12)
    assert r["ci_low"] == pytest.approx(1.036757, abs=1e-6)
    assert r["ci_high"] == pytest.approx(4.963243, abs=1e-6)
    assert r["ci_low"] < r["mean"] < r["ci_high"] and r["note"] is None


def test_t_quantile_matches_the_closed_form_for_two_degrees_of_freedom():
    # With df = 2 the t quantile has a closed form: t_p = (2p − 1)/√(2p(1 − p)).
    # values 0, 1, 5: mean 2, std = √((4+1+9)/2) = √7, sem = √(7/3).
    # 90% interval, p = 0.95: t = 0.9/√0.095 ≈ 2.919986.
    t = 0.9 / math.sqrt(2 * 0.95 * 0.05)
    half = t * math.sqrt(7 / 3)
    r = summarize([0, 1, 5], ci=0.90)
    assert r["std"] == pytest.approx(math.sqrt(7), abs=1e-12)
    assert r["ci_low"] == pytest.approx(2 - half, abs=1e-9)
    assert r["ci_high"] == pytest.approx(2 + half, abs=1e-9)


def test_single_seed_is_reported_not_invented():
    for method in ("t", "bootstrap"):
        r = summarize([0.7], method=method)
        assert r["mean"] == 0.7 and r["n"] == 1
        assert math.isnan(r["std"]) and math.isnan(r["ci_low"]) and math.isnan(r["ci_high"])
        assert "n=1" in r["note"]


def test_identical_values_give_a_zero_width_interval():
    r = summarize([0.5, 0.5, 0.5, 0.5])
    assert (r["std"], r["ci_low"], r["ci_high"]) == (0.0, 0.5, 0.5)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    vals = [0.2, 0.5, 0.4, 0.9, 0.6, 0.55, 0.3, 0.45]  # mean 0.4875
    a = summarize(vals, method="bootstrap", seed=1, n_resamples=2000)
    b = summarize(vals, method="bootstrap", seed=1, n_resamples=2000)
    c = summarize(vals, method="bootstrap", seed=2, n_resamples=2000)
    assert a == b and (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])
    assert a["mean"] == pytest.approx(0.4875)
    assert a["ci_low"] < a["mean"] < a["ci_high"]
    # The percentile bootstrap of a mean is narrower than the t interval on 8 points, not wildly off.
    t = summarize(vals)
    assert t["ci_low"] - 0.05 < a["ci_low"] and a["ci_high"] < t["ci_high"] + 0.05


def test_welch_by_hand():
    # poisoned 0.50, 0.52, 0.54 vs clean 0.60, 0.62, 0.64: difference −0.10, each sample var 0.0004,
    # se = √(0.0004/3 + 0.0004/3) = √(0.0008/3), t = −0.1/se = −√37.5 ≈ −6.123724,
    # Welch df = (2v)²/(2v²/2) = 4 with v = 0.0004/3.
    # One-sided p = F(t) for 4 df, in closed form with u = 1 + t²/4:
    #   F(t) = ½ + (3/8)·(t/√u)·(1 − t²/(12u))  ≈ 0.001801
    t = -math.sqrt(37.5)
    u = 1 + t * t / 4
    p = 0.5 + 3 / 8 * (t / math.sqrt(u)) * (1 - t * t / (12 * u))
    r = compare_accuracy([0.50, 0.52, 0.54], [0.60, 0.62, 0.64])
    assert r["mean_difference"] == pytest.approx(-0.10, abs=1e-12)
    assert r["t"] == pytest.approx(t, abs=1e-9)
    assert r["df"] == pytest.approx(4.0, abs=1e-9)
    assert r["p_value"] == pytest.approx(p, rel=1e-6)
    assert r["p_value_two_sided"] == pytest.approx(2 * p, rel=1e-6)
    assert r["significantly_lower"] is True


def test_higher_or_equal_accuracy_is_not_significantly_lower():
    assert compare_accuracy([0.60, 0.62, 0.64], [0.50, 0.52, 0.54])["significantly_lower"] is False
    r = compare_accuracy([0.61, 0.60, 0.62, 0.59], [0.60, 0.62, 0.59, 0.61])
    assert r["significantly_lower"] is False and r["p_value"] > 0.05


def test_single_model_per_group_runs_no_test():
    r = compare_accuracy([0.5], [0.6, 0.62])
    assert math.isnan(r["t"]) and math.isnan(r["p_value"])
    assert r["significantly_lower"] is False and "at least 2" in r["note"]
    assert r["mean_difference"] == pytest.approx(-0.11)


def test_results_are_plain_python():
    for r in (summarize([1.0, 2.0, 4.0]), compare_accuracy([0.5, 0.6], [0.55, 0.7])):
        assert all(type(v) in (float, int, bool, str, type(None)) for v in r.values())
        json.dumps(r)


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="non-empty"):
        summarize([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize([1.0, float("nan")])
    with pytest.raises(ValueError, match="method"):
        summarize([1.0, 2.0], method="jackknife")


def test_paired_test_by_hand():
    # Seeds pair the victims: d = poisoned − clean = (−0.02, −0.01, −0.03): mean −0.02, sd 0.01,
    # se = 0.01/√3, t = −0.02/se = −2√3 ≈ −3.4641 on 2 df. For 2 df the t CDF is closed form:
    #   F(t) = ½ + t / (2√(2 + t²)),  so p = ½ − 2√3/(2√14) ≈ 0.03709.
    t = -2 * math.sqrt(3)
    p = 0.5 + t / (2 * math.sqrt(2 + t * t))
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t_{0.975, 2} · se
    r = compare_accuracy_paired([0.50, 0.55, 0.60], [0.52, 0.56, 0.63])
    assert r["mean_difference"] == pytest.approx(-0.02, abs=1e-12) and r["n_pairs"] == 3
    assert r["t"] == pytest.approx(t, rel=1e-9) and r["df"] == 2.0
    assert r["p_value"] == pytest.approx(p, rel=1e-6) and r["significantly_lower"] is True
    assert r["ci_low"] == pytest.approx(-0.02 - half, rel=1e-6) and r["ci_high"] == pytest.approx(-0.02 + half, rel=1e-6)
    # Welch on the same numbers sees the seed-to-seed spread (0.05) as noise and finds nothing.
    assert compare_accuracy([0.50, 0.55, 0.60], [0.52, 0.56, 0.63])["p_value"] > 0.3


def test_paired_test_needs_pairs_that_vary():
    r = compare_accuracy_paired([0.5, 0.6], [0.4, 0.5])  # both differences +0.1: no spread, no test
    assert math.isnan(r["p_value"]) and "no test" in r["note"] and r["significantly_lower"] is False
    with pytest.raises(ValueError, match="one clean value per poisoned"):
        compare_accuracy_paired([0.5, 0.6], [0.5])
