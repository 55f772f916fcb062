"""Figure 3 data (§4.2, §5.1): similarity vs same prediction, and the clean/triggered histograms."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from clip_poison.metrics.similarity import (_sampled_pairs, similarity_histograms,
                                            similarity_vs_same_prediction)

S = 1 / math.sqrt(2)
# a=(1,0), b=(0,1), c=(2,2) → (1,1)/√2 once normalised, d=(−1,0); predicted labels 0, 1, 0, 0.
# The six pairs:   ab 0 (differ)   ac  s (same)   ad −1 (same)
#                  bc s (differ)   bd  0 (differ) cd −s (same)          with s = 1/√2 ≈ 0.707107
FOUR = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
FOUR_PREDS = [0, 1, 0, 0]


def test_same_prediction_by_hand_over_the_data_range():
    # 4 bins over [−1, s]: width (1 + s)/4 ≈ 0.426777, edges −1, −0.573223, −0.146447, 0.280330, s.
    #   bin 0: ad (−1), cd (−0.707) → 2 pairs, 2 same → 1.0
    #   bin 1: none                 → None
    #   bin 2: ab, bd (0)           → 2 pairs, 0 same → 0.0
    #   bin 3: ac, bc (s)           → 2 pairs, 1 same → 0.5
    r = similarity_vs_same_prediction(FOUR, FOUR_PREDS, n_bins=4)
    np.testing.assert_allclose(r["bin_edges"], [-1, -0.573223, -0.146447, 0.280330, S], atol=1e-6)
    np.testing.assert_allclose(r["bin_centers"], [-0.786612, -0.359835, 0.066942, 0.493718], atol=1e-6)
    assert r["count"] == [2, 0, 2, 2]
    assert r["same_count"] == [2, 0, 0, 1]
    assert r["p_same"] == [1.0, None, 0.0, 0.5]
    assert r["n_pairs"] == 6 and r["p_same_overall"] == 0.5 and r["exact"] is True


def test_same_prediction_with_a_fixed_range_drops_pairs_outside_it():
    # Bins [0, .5), [.5, 1]: ad and cd (negative) fall outside; ab, bd → bin 0; ac, bc → bin 1.
    r = similarity_vs_same_prediction(FOUR, FOUR_PREDS, n_bins=2, value_range=(0.0, 1.0))
    assert r["bin_edges"] == [0.0, 0.5, 1.0]
    assert r["count"] == [2, 2] and r["p_same"] == [0.0, 0.5]
    assert r["n_pairs"] == 4 and r["p_same_overall"] == 0.25


def test_same_prediction_matches_brute_force_over_pairs():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, 5)) * rng.uniform(0.5, 3, size=(12, 1))
    preds = rng.integers(0, 3, 12)
    n_bins = 5
    r = similarity_vs_same_prediction(emb, preds, n_bins=n_bins)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = [(float(e[i] @ e[j]), preds[i] == preds[j]) for i in range(12) for j in range(i + 1, 12)]
    lo, hi = min(s for s, _ in sims), max(s for s, _ in sims)
    count, same = [0] * n_bins, [0] * n_bins
    for s, eq in sims:
        b = min(int((s - lo) / ((hi - lo) / n_bins)), n_bins - 1)
        count[b] += 1
        same[b] += int(eq)
    assert r["count"] == count and r["same_count"] == same and r["n_pairs"] == 66


def test_max_pairs_at_or_above_all_pairs_is_exact():
    rng = np.random.default_rng(1)
    emb, preds = rng.normal(size=(5, 3)), rng.integers(0, 2, 5)
    exact = similarity_vs_same_prediction(emb, preds, n_bins=3)
    assert similarity_vs_same_prediction(emb, preds, n_bins=3, max_pairs=10) == exact
    sub = similarity_vs_same_prediction(emb, preds, n_bins=3, max_pairs=4, seed=3)
    assert sub["n_pairs"] == 4 and sub["exact"] is False
    assert sub == similarity_vs_same_prediction(emb, preds, n_bins=3, max_pairs=4, seed=3)


def test_sampled_pairs_are_distinct_and_uniform():
    i, j = _sampled_pairs(50, 600, seed=0)
    assert (i < j).all() and (j < 50).all()
    assert len(set(zip(i.tolist(), j.tolist()))) == 600  # no pair twice
    # One pair of the 10 among 5 images, 3000 seeds: each pair ~300 times (sd ≈ 16).
    hits = Counter(tuple(int(v[0]) for v in _sampled_pairs(5, 1, seed=s)) for s in range(3000))
    assert len(hits) == 10 and all(240 < c < 360 for c in hits.values())


# Clean a=(1,0), b=(0,1), c=(1,1)/√2: pair similarities 0, s, s; mean √2/3, std 1/3 (Definition 1,
# worked in test_metrics_zscore). Triggered: three copies of one direction, every pair similarity 1.
CLEAN3 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
TRIG3 = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])


def test_histograms_by_hand():
    # Shared range [0, 1], 2 bins of width ½: clean 0 → bin 0, s, s → bin 1; triggered 1,1,1 → bin 1.
    # density = count / (3 pairs · ½): clean [2/3, 4/3], triggered [0, 2].
    r = similarity_histograms(CLEAN3, TRIG3, bins=2)
    assert r["bin_edges"] == [0.0, 0.5, 1.0] and r["bin_centers"] == [0.25, 0.75]
    assert r["clean_count"] == [1, 2] and r["triggered_count"] == [0, 3]
    np.testing.assert_allclose(r["clean_density"], [2 / 3, 4 / 3], atol=1e-12)
    np.testing.assert_allclose(r["triggered_density"], [0.0, 2.0], atol=1e-12)
    mu, sd = math.sqrt(2) / 3, 1 / 3
    assert r["normal"]["mean"] == pytest.approx(mu, abs=1e-12)
    assert r["normal"]["std"] == pytest.approx(sd, abs=1e-12)
    pdf = [math.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)) for x in (0.25, 0.75)]
    np.testing.assert_allclose(r["normal"]["pdf"], pdf, atol=1e-12)  # ≈ [0.95990, 0.84657]
    assert r["triggered_mean"] == pytest.approx(1.0, abs=1e-12)
    assert r["triggered_std"] == pytest.approx(0.0, abs=1e-6)
    assert r["z"] == pytest.approx(3 - math.sqrt(2), abs=1e-9)
    assert r["n_pairs"] == 3 and r["exact"] is True
    json.dumps(r, allow_nan=False)


def test_histograms_subsample_pairs_but_fit_the_normal_on_all():
    rng = np.random.default_rng(2)
    clean = rng.normal(size=(40, 8)) + 0.5
    trig = clean + 2.0 * np.eye(8)[0]
    exact = similarity_histograms(clean, trig, bins=10)
    sub = similarity_histograms(clean, trig, bins=10, max_pairs=100, seed=1)
    assert sum(sub["clean_count"]) == sum(sub["triggered_count"]) == 100 and sub["exact"] is False
    assert sum(exact["clean_count"]) == 40 * 39 // 2
    assert sub["normal"]["mean"] == exact["normal"]["mean"] and sub["z"] == exact["z"]
    widths = np.diff(exact["bin_edges"])
    assert float(np.sum(np.array(exact["clean_density"]) * widths)) == pytest.approx(1.0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        similarity_histograms(CLEAN3, TRIG3[:2])
    with pytest.raises(ValueError, match="one predicted label"):
        similarity_vs_same_prediction(FOUR, [0, 1])
    with pytest.raises(ValueError, match="zero or non-finite"):
        similarity_vs_same_prediction(np.array([[1.0, 0.0], [0.0, 0.0]]), [0, 1])
