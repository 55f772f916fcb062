"""Backdoor z-score (§5.1, Definition 1): the O(N·d²) form against the definition and by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from clip_poison.metrics.zscore import (backdoor_z_score, pair_similarity_moments,
                                        pair_similarity_moments_naive)

# Three unit vectors in 2-D: a=(1,0), b=(0,1), c=(1,1)/√2. Pair similarities (u ≠ v):
#   <a,b> = 0, <a,c> = <b,c> = 1/√2 =: s
#   mean = 2s/3 = √2/3 ≈ 0.471405
#   var  = (mean² + 2(s − mean)²)/3 = (4s²/9 + 2s²/9)/3 = 2s²/9 = 1/9, so std = 1/3
# Triggered: all three the same direction, every pair similarity 1, mean 1.
#   z = (1 − √2/3) / (1/3) = 3 − √2 ≈ 1.585786
HAND_CLEAN = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
HAND_TRIGGERED = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
HAND_MEAN, HAND_STD, HAND_Z = math.sqrt(2) / 3, 1 / 3, 3 - math.sqrt(2)
# What the wrong definitions give on the same data:
#   dividing by the variance: (1 − √2/3) / (1/9) = 9 − 3√2 ≈ 4.757359
#   keeping self-pairs (9 ordered pairs: three 1s, two 0s, four s):
#     mean = (3 + 4s)/9 ≈ 0.647603, E[x²] = (3 + 4·½)/9 = 5/9, std = √(5/9 − mean²) ≈ 0.369007,
#     triggered mean still 1, z ≈ (1 − 0.647603)/0.369007 ≈ 0.954988
Z_IF_VARIANCE = 9 - 3 * math.sqrt(2)
Z_IF_SELF_PAIRS = 0.954988


def test_hand_computed_three_vectors():
    r = backdoor_z_score(HAND_CLEAN, HAND_TRIGGERED)
    assert r["clean_mean"] == pytest.approx(HAND_MEAN, abs=1e-12)
    assert r["clean_std"] == pytest.approx(HAND_STD, abs=1e-12)
    assert r["triggered_mean"] == pytest.approx(1.0, abs=1e-12)
    assert r["z"] == pytest.approx(HAND_Z, abs=1e-9)
    assert r["n"] == 3


@pytest.mark.parametrize("naive", [False, True])
def test_z_uses_std_and_excludes_self_pairs(naive):
    z = backdoor_z_score(HAND_CLEAN, HAND_TRIGGERED, naive=naive)["z"]
    # The hand numbers for the two wrong definitions really are far from the right one...
    assert abs(HAND_Z - Z_IF_VARIANCE) > 3 and abs(HAND_Z - Z_IF_SELF_PAIRS) > 0.6
    # ...and the implementation gives the right one.
    assert z == pytest.approx(HAND_Z, abs=1e-9)
    assert abs(z - Z_IF_VARIANCE) > 3 and abs(z - Z_IF_SELF_PAIRS) > 0.6


def test_self_pair_alternative_really_is_what_the_hand_number_says():
    # Guards the hand-computed Z_IF_SELF_PAIRS used above against an arithmetic slip.
    e = HAND_CLEAN / np.linalg.norm(HAND_CLEAN, axis=1, keepdims=True)
    all_pairs = (e @ e.T).ravel()
    assert (1 - all_pairs.mean()) / all_pairs.std() == pytest.approx(Z_IF_SELF_PAIRS, abs=1e-6)


def test_inputs_are_normalised_first():
    scaled = HAND_CLEAN * np.array([[2.0], [5.0], [0.3]])
    assert backdoor_z_score(scaled, HAND_TRIGGERED * 7.0)["z"] == pytest.approx(HAND_Z, abs=1e-9)


@pytest.mark.parametrize("n,d", [(3, 2), (5, 3), (17, 8), (64, 32), (300, 64)])
@pytest.mark.parametrize("normalised", [True, False])
def test_fast_matches_naive_on_random_data(n, d, normalised):
    rng = np.random.default_rng(n * 1000 + d)
    clean = rng.normal(size=(n, d)) + 0.3  # offset: a nonzero mean similarity, as real embeddings have
    trig = clean + rng.normal(size=(n, d)) * 0.5 + rng.normal(size=(1, d))
    if normalised:
        clean /= np.linalg.norm(clean, axis=1, keepdims=True)
        trig /= np.linalg.norm(trig, axis=1, keepdims=True)
    else:
        clean *= rng.uniform(0.01, 100, size=(n, 1))
        trig *= rng.uniform(0.01, 100, size=(n, 1))
    fast, naive = backdoor_z_score(clean, trig), backdoor_z_score(clean, trig, naive=True)
    for key in ("z", "clean_mean", "clean_std", "triggered_mean"):
        assert fast[key] == pytest.approx(naive[key], abs=1e-6), key
    for a, b in zip(pair_similarity_moments(clean), pair_similarity_moments_naive(clean)):
        assert a == pytest.approx(b, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_two_embeddings_moments_match_naive(seed):
    rng = np.random.default_rng(seed)
    clean, trig = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    fast, naive = backdoor_z_score(clean, trig), backdoor_z_score(clean, trig, naive=True)
    e = clean / np.linalg.norm(clean, axis=1, keepdims=True)
    # One unordered pair: its similarity is the mean, and there is no spread at all.
    assert fast["clean_mean"] == pytest.approx(float(e[0] @ e[1]), abs=1e-12)
    for key in ("clean_mean", "clean_std", "triggered_mean"):
        assert fast[key] == pytest.approx(naive[key], abs=1e-6), key
    assert naive["clean_std"] == 0.0 and math.isnan(naive["z"])


@pytest.mark.parametrize("seed", [1, 2, 4])
def test_two_embeddings_z_matches_naive(seed):
    rng = np.random.default_rng(seed)
    clean, trig = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    fast, naive = backdoor_z_score(clean, trig)["z"], backdoor_z_score(clean, trig, naive=True)["z"]
    assert math.isnan(naive)
    assert math.isnan(fast), f"fast z = {fast} where the definition's std is exactly 0"


def test_rejects_a_single_embedding():
    with pytest.raises(ValueError, match="N >= 2"):
        backdoor_z_score(np.ones((1, 4)), np.ones((1, 4)))
