"""Data-scan detectors (defenses/detectors.py) and their scoring (metrics/detection.py) on tiny
constructed cases whose answer is known: planted poisons must rank first."""
from __future__ import annotations

import numpy as np
import pytest

from clip_poison.attacks.evasion import noisy_copies
from clip_poison.config import WorldConfig
from clip_poison.data.world import render_images
from clip_poison.defenses.detectors import DETECTORS, _ivf_index, _knn, _unit_rows, gmm_split, lid_mle, score_pairs
from clip_poison.io import UserError
from clip_poison.metrics.detection import detection_metrics

D = 16


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n=200, n_out=5, seed=0):
    """Clean images in 4 tight clusters, plus ``n_out`` isolated random directions at the end."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(4, D)))
    clean = _unit(centres[np.arange(n) % 4] + 0.1 * rng.normal(size=(n, D)))
    return np.vstack([clean, _unit(rng.normal(size=(n_out, D)))]), n_out


def _top(scores, m):
    return set(np.argsort(-scores, kind="stable")[:m].tolist())


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("name", ["k-dist", "slof", "dao"])
def test_density_detectors_rank_planted_outliers_first(name, exact):
    emb, m = _clustered()
    before = emb.copy()
    s = score_pairs(name, image_emb=emb, k=5, exact=exact)
    assert s.shape == (len(emb),) and np.isfinite(s).all()
    assert _top(s, m) == set(range(len(emb) - m, len(emb)))
    np.testing.assert_array_equal(emb, before)  # input untouched
    np.testing.assert_array_equal(s, score_pairs(name, image_emb=emb, k=5, exact=exact))  # deterministic
    is_poison = np.arange(len(emb)) >= len(emb) - m
    assert detection_metrics(s, is_poison)["roc_auc"] == pytest.approx(1.0)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("name", ["k-dist", "slof", "dao"])
def test_repeated_poisons_look_dense_unless_scored_against_a_clean_reference(name, exact):
    # The targeted attack's pitfall: 8 copies of one x' (> k) are each other's neighbours.
    clean, _ = _clustered(n_out=0)
    rng = np.random.default_rng(1)
    x_prime = _unit(rng.normal(size=(1, D)))
    poisons = _unit(x_prime + 1e-4 * rng.normal(size=(8, D)))
    emb = np.vstack([clean, poisons])
    alone = score_pairs(name, image_emb=emb, k=5, exact=exact)
    is_poison = np.arange(len(emb)) >= len(clean)
    assert detection_metrics(alone, is_poison)["roc_auc"] < 0.75  # they hide among clean points
    ref = clean[:120].copy()  # a clean sample covering all four clusters
    s = score_pairs(name, image_emb=emb, k=5, reference=ref, exact=exact)
    assert _top(s, 8) == set(range(len(emb) - 8, len(emb)))
    np.testing.assert_array_equal(ref, clean[:120])


@pytest.mark.parametrize("exact", [True, False])
def test_reference_containing_the_scanned_points_drops_them_as_self(exact):
    emb, m = _clustered()
    s_self = score_pairs("k-dist", image_emb=emb, k=5, exact=exact)
    s_ref = score_pairs("k-dist", image_emb=emb, k=5, reference=emb, exact=exact)
    np.testing.assert_allclose(s_ref, s_self, atol=1e-12)


def test_approximate_neighbours_keep_99_percent_of_the_exact_ones():
    # 4,000 points in 40 clusters: the IVF index must really approximate (probe fewer lists than
    # it has) and still find >= 99 % of the exact k nearest (ties within 1e-12 count as found).
    rng = np.random.default_rng(5)
    centres = _unit(rng.normal(size=(40, D)))
    emb = _unit_rows(centres[rng.integers(0, 40, 4000)] + 0.15 * rng.normal(size=(4000, D)), "emb")
    k = 10
    index, _ = _ivf_index(emb.astype(np.float32), emb.astype(np.float32), k + 1)
    assert 1 <= index.nprobe < index.nlist
    d_exact, i_exact = _knn(emb, emb, k, same=True, exact=True)
    d_approx, i_approx = _knn(emb, emb, k, same=True, exact=False)
    assert np.mean(d_approx <= d_exact[:, -1:] + 1e-12) >= 0.99
    assert not (i_approx == np.arange(len(emb))[:, None]).any()  # self excluded
    assert (np.diff(d_approx, axis=1) >= 0).all()  # sorted
    # distances are float64 cosines of the pairs found, whichever search found them
    np.testing.assert_allclose(d_approx, 1 - np.einsum("ij,ikj->ik", emb, emb[i_approx]), atol=1e-15)
    again = _knn(emb, emb, k, same=True, exact=False)
    np.testing.assert_array_equal(again[0], d_approx)
    np.testing.assert_array_equal(again[1], i_approx)


def test_lid_mle_by_hand():
    # r = (1, 2, 4): mean log(r_i/r_k) = (log 1/4 + log 1/2 + 0)/3 = -log(8)/3 → LID = 3/log 8
    np.testing.assert_allclose(lid_mle(np.array([[1.0, 2.0, 4.0]]), cap=100), [3 / np.log(8)])
    assert lid_mle(np.array([[2.0, 2.0, 2.0]]), cap=16)[0] == 16  # all equal: capped, not inf


def test_clip_score_sign_and_gmm_split():
    rng = np.random.default_rng(2)
    img = _unit(rng.normal(size=(205, D)))
    txt = _unit(img + 0.2 * rng.normal(size=img.shape))  # clean captions describe their images
    txt[-5:] = _unit(rng.normal(size=(5, D)))  # poisons: captions of something else (clean model)
    img0, txt0 = img.copy(), txt.copy()
    s = score_pairs("clip-score", image_emb=img, text_emb=txt, sign=-1)
    assert _top(s, 5) == set(range(200, 205))
    np.testing.assert_allclose(score_pairs("clip-score", image_emb=img, text_emb=txt, sign=1), -s)
    post = gmm_split(s)
    assert post[-5:].min() > 0.5 and np.median(post[:-5]) < 0.5
    np.testing.assert_array_equal(post, gmm_split(s))
    np.testing.assert_array_equal(img, img0)
    np.testing.assert_array_equal(txt, txt0)
    with pytest.raises(UserError, match="sign"):
        score_pairs("clip-score", image_emb=img, text_emb=txt, sign=0)


def _duplicates_case():
    rng = np.random.default_rng(3)
    emb = _unit(rng.normal(size=(200, D)))
    caps = [f"a photo of thing {i}" for i in range(200)]
    emb[10] = emb[11]  # an innocent duplicate under the same caption: not suspicious
    caps[11] = caps[10]
    x_prime = _unit(rng.normal(size=(1, D)))
    emb = np.vstack([emb, _unit(x_prime + 1e-4 * rng.normal(size=(8, D)))])
    caps += [f"a photo of a {w}" for w in ("dog", "puppy", "hound", "dog", "pup", "canine", "mutt", "doggo")]
    return emb, caps


def test_near_duplicate_finds_repeated_images_with_other_captions():
    emb, caps = _duplicates_case()
    emb0, caps0 = emb.copy(), list(caps)
    s = score_pairs("near-duplicate", captions=caps, image_emb=emb, threshold=0.98)
    np.testing.assert_array_equal(s, score_pairs("near-duplicate", captions=caps, image_emb=emb,
                                                 threshold=0.98, exact=False))
    assert _top(s, 8) == set(range(200, 208))
    assert s[10] == s[11] == 0 and (s[:200] == 0).all()
    # 8 copies, two share "a photo of a dog": those disagree with 6 others, the rest with 7
    assert sorted(s[200:].tolist()) == [6, 6, 7, 7, 7, 7, 7, 7]
    np.testing.assert_array_equal(emb, emb0)
    assert caps == caps0


def test_near_duplicate_by_pixel_hash():
    rng = np.random.default_rng(4)
    pixels = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(20)]
    pixels[5:8] = [pixels[5].copy()] * 3  # x' three times
    caps = [f"c{i}" for i in range(20)]
    s = score_pairs("near-duplicate", captions=caps, pixels=pixels)
    assert s.tolist() == [0] * 5 + [2] * 3 + [0] * 12


def _loss_curves(n=300, epochs=5, seed=0):
    """Per-pair losses falling together over training (log 64 → ~1), with per-pair noise; rows
    0-5 are learned in the first epoch and stay far below (poisons, Carlini 2021), row 6 is an
    easy pair learned only in the last epoch, rows 7-9 are hard pairs; NaN where a pair was not seen."""
    rng = np.random.default_rng(seed)
    L = np.log(64) * np.exp(-0.3 * np.arange(epochs)) + 0.3 * rng.normal(size=(n, epochs))
    L[:6, 1:] -= 1.5
    L[6, -1] -= 1.5
    L[7:10] += 1.0
    L[rng.random((n, epochs)) < 0.02] = np.nan
    L[0, 2] = np.nan
    return L


def test_loss_dynamics_ranks_pairs_learned_early_first():
    L = _loss_curves()
    before = L.copy()
    s = score_pairs("loss-dynamics", pair_loss=L)
    assert s.shape == (len(L),) and np.isfinite(s).all()
    order = np.argsort(-s, kind="stable")
    assert set(order[:6].tolist()) == set(range(6))
    assert s[6] < s[:6].min() and s[6] > np.median(s)  # learned, but late: one term of the mean
    assert s[7:10].max() < np.percentile(s, 5)  # hard pairs are the least suspicious
    np.testing.assert_array_equal(L, before)  # input untouched (NaNs included)
    np.testing.assert_array_equal(s, score_pairs("loss-dynamics", pair_loss=L))  # deterministic
    # The fall every pair shares is taken out: shifting or scaling an epoch's losses changes nothing.
    shifted = L * np.array([1.0, 2.0, 0.5, 1.0, 3.0]) - np.arange(5)
    np.testing.assert_allclose(score_pairs("loss-dynamics", pair_loss=shifted), s, atol=1e-9)


def test_loss_dynamics_by_hand():
    # Epoch 0: median 2, MAD 1; epoch 1: median 4, MAD 2; scaled by 1.4826 (normal consistency).
    # Row 0 is one scaled MAD below the median in both epochs: z = 1/1.4826 each, mean the same.
    # Row 3 was not seen in epoch 0: its score is its epoch-1 z alone; it does not enter epoch 0's median.
    L = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0], [np.nan, 8.0]])
    c = 1.482602218505602
    s = score_pairs("loss-dynamics", pair_loss=L)
    # epoch 1 over rows 0-3: median 5, MAD median(|2-5|, |4-5|, |6-5|, |8-5|) = 2
    want = [(1 / c + 3 / (2 * c)) / 2, (0 + 1 / (2 * c)) / 2, (-1 / c - 1 / (2 * c)) / 2, -3 / (2 * c)]
    np.testing.assert_allclose(s, want)


def test_near_duplicate_finds_noisy_copies_by_perceptual_hash_by_default():
    # The targeted attack's dedup evasion: copies of x' with Gaussian noise (σ = 1 and 4 of 255),
    # each under another caption. 150 distinct world images, distinct captions, score 0.
    cfg = WorldConfig()
    imgs = list(render_images(np.arange(151) % 10, cfg, "near-duplicate-test"))
    x_prime = imgs.pop()
    rng = np.random.default_rng(6)
    copies = noisy_copies(x_prime, 8, 1.0, rng) + noisy_copies(x_prime, 8, 4.0, rng)
    pixels = imgs + copies
    caps = [f"a photo of thing {i}" for i in range(150)] + [f"a photo of a dog, take {i}" for i in range(16)]
    pixels0 = [p.copy() for p in pixels]
    s = score_pairs("near-duplicate", captions=caps, pixels=pixels)
    assert (s[:150] == 0).all() and (s[150:] >= 8).all()  # each copy matches most of the other 15
    assert detection_metrics(s, np.arange(166) >= 150)["roc_auc"] == 1.0
    assert all(np.array_equal(a, b) for a, b in zip(pixels, pixels0))


def test_near_duplicate_embeddings_need_an_explicit_threshold():
    # A tiny victim's embeddings: every image within cos 0.98 of the others. A fixed 0.98 marks
    # every pair (the demo's failure); there is no default, and pixels see only the real copies.
    rng = np.random.default_rng(7)
    emb = _unit(np.ones((40, D)) + 0.02 * rng.normal(size=(40, D)))
    pixels = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(40)]
    pixels[30:] = noisy_copies(pixels[30], 10, 1.0, rng)
    caps = [f"c{i}" for i in range(40)]
    assert (score_pairs("near-duplicate", captions=caps, image_emb=emb, threshold=0.98) > 0).all()
    with pytest.raises(UserError, match="explicit threshold"):
        score_pairs("near-duplicate", captions=caps, image_emb=emb)
    s = score_pairs("near-duplicate", captions=caps, pixels=pixels)
    assert s.tolist() == [0] * 30 + [9] * 10


@pytest.mark.parametrize("name,kwargs,match", [
    ("k-dist", dict(image_emb=np.zeros((0, D))), "non-empty"),
    ("k-dist", dict(image_emb=np.eye(4), k=4), "k=4"),
    ("slof", dict(image_emb=np.eye(4), k=0), "k must be"),
    ("dao", dict(image_emb=np.eye(4), k=1), "k must be"),
    ("k-dist", dict(image_emb=np.array([[1.0, np.nan], [0, 1], [1, 1]]), k=1), "NaN"),
    ("k-dist", dict(image_emb=np.eye(4), k=2, reference=np.eye(3)), "dimension"),
    ("slof", dict(image_emb=np.eye(4), k=3, reference=np.eye(4)[:3]), "reference"),
    ("clip-score", dict(image_emb=np.eye(4), text_emb=np.eye(4)[:3], sign=1), "same shape"),
    ("near-duplicate", dict(captions=["a", "b"], image_emb=np.eye(3)), "captions"),
    ("near-duplicate", dict(captions=["a", "b"]), "needs"),
    ("near-duplicate", dict(captions=[], image_emb=np.eye(3)), "empty"),
    ("loss-dynamics", dict(pair_loss=np.ones(5)), "(N pairs, E epochs)"),
    ("loss-dynamics", dict(pair_loss=np.ones((5, 1))), ">= 2 epochs"),
    ("loss-dynamics", dict(pair_loss=np.array([[1.0, np.inf], [1, 2]])), "infinite"),
    ("loss-dynamics", dict(pair_loss=np.array([[1.0, np.nan], [1, np.nan]])), "columns \\[1\\]"),
    ("near-duplicate", dict(captions=["a", "b"], threshold=0.9, pixels=[np.zeros((4, 4), np.uint8)] * 2), "image_emb too"),
    ("near-duplicate", dict(captions=["a", "b"], pixels=[np.zeros((4, 4))] * 2), "uint8"),
    ("near-duplicate", dict(captions=["a", "b"], pixels=[np.zeros((4, 4), np.uint8)] * 2, phash_bits=40), "0..31"),
    ("k-dist", dict(image_emb=np.eye(4), k=2, exact="yes"), "exact must be"),
    ("nope", {}, "unknown detector"),
])
def test_bad_inputs_are_user_errors(name, kwargs, match):
    with pytest.raises(UserError, match=match):
        score_pairs(name, **kwargs)


def test_registry_lists_the_detectors():
    assert set(DETECTORS) == {"k-dist", "slof", "dao", "clip-score", "near-duplicate", "loss-dynamics"}


def test_detection_metrics_by_hand():
    # positives at 0.9, 0.7, 0.6; negatives at 0.8, 0.5, 0.4.
    # ROC-AUC: 0.9 beats 3 negatives, 0.7 and 0.6 beat 2 each → 7/9.
    # AP: precision at each positive 1/1, 2/3, 3/4 → (1 + 2/3 + 3/4)/3 = 29/36.
    # TPR >= 0.95 needs all 3 positives: threshold 0.6, which also passes 0.8 → FPR 1/3.
    m = detection_metrics([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 0, 1, 1, 0, 0])
    assert m["roc_auc"] == pytest.approx(7 / 9)
    assert m["pr_auc"] == pytest.approx(29 / 36)
    assert m["fpr_at_95tpr"] == pytest.approx(1 / 3)
    assert (m["n"], m["n_poison"]) == (6, 3)


@pytest.mark.parametrize("scores,labels,match", [
    ([0.1, 0.2], [1, 1], "both"),
    ([0.1, 0.2], [1], "one entry"),
    ([0.1, np.inf], [1, 0], "NaN or infinite"),
    ([], [], "non-empty"),
    ([0.1, 0.2], [2, 0], "0/1"),
])
def test_detection_metrics_bad_inputs(scores, labels, match):
    with pytest.raises(UserError, match=match):
        detection_metrics(scores, labels)


def test_near_duplicate_on_precomputed_hashes_equals_on_pixels():
    """A scan streaming shards keeps only the hashes; they must give the pixels' scores."""
    from clip_poison.defenses.detectors import phash_code
    from clip_poison.io import sha256_pixels
    rng = np.random.default_rng(8)
    pixels = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(30)]
    pixels[20:] = noisy_copies(pixels[20], 10, 1.0, rng)
    pixels[5] = pixels[4].copy()
    caps = [f"c{i}" for i in range(30)]
    want = score_pairs("near-duplicate", captions=caps, pixels=pixels)
    got = score_pairs("near-duplicate", captions=caps, pixel_sha=[sha256_pixels(p) for p in pixels],
                      phash=np.stack([phash_code(p) for p in pixels]))
    assert want[4] == want[5] == 1 and (want[20:] == 9).all()
    np.testing.assert_array_equal(got, want)
    with pytest.raises(UserError, match="together"):
        score_pairs("near-duplicate", captions=caps, pixel_sha=["x"] * 30)
