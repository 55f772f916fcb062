"""Data-scan detectors: one suspicion score per training pair, higher = more suspicious.

Detectors are a registry like ``attacks/triggers.py`` (``DETECTORS``, ``register_detector``,
``score_pairs(name, **inputs)``), so a new scan is one decorator away. Each is a pure function of
numpy arrays (embeddings from ``metrics/embed.py``, captions, optional pixels): inputs are never
modified, and the same inputs give the same scores. Scoring against the manifests' truth lives in
``metrics/detection.py``.

Neighbour-based detectors (``k-dist``, ``slof``, ``dao``) work on L2-normalised image embeddings
with cosine distance 1 − cos, by exact (brute-force) search: no approximate index, so scores are
reproducible to the bit and ties are resolved the same way every time.

Pitfall of every density score here: poisons that outnumber k look *dense*, not outlying. The
targeted attack repeats one image x' many times (with different captions), so its copies are each
other's nearest neighbours, their k-distance is ~0 and they rank as the *least* suspicious points.
Mitigation: pass ``reference=`` a set of clean embeddings (e.g. a held-out clean sample); each point
is then scored against the reference's neighbours, never against the other poisons. A query that
is itself in the reference (distance 0 to its nearest reference point) has that neighbour dropped
as "self". ``near-duplicate`` is the scan aimed at exactly those repeated images.

``loss-dynamics`` needs no embeddings and no reference model: it scans the victim's own training
record (each pair's loss per epoch, ``clip-poison train --record-pair-loss``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..io import UserError, sha256_pixels

DETECTORS: dict[str, Callable[..., np.ndarray]] = {}
_EPS = 1e-12  # floor for distances that divide or go into a log (exact duplicates have distance 0)


def register_detector(name: str):
    def deco(fn: Callable[..., np.ndarray]):
        DETECTORS[name] = fn
        return fn
    return deco


def score_pairs(name: str, **inputs) -> np.ndarray:
    """Run the detector ``name`` on ``inputs``; one float score per training pair."""
    if name not in DETECTORS:
        raise UserError(f"unknown detector {name!r}; available: {sorted(DETECTORS)}")
    return DETECTORS[name](**inputs)


# ---------------------------------------------------------------- input checks and neighbours

def _unit_rows(x, what: str) -> np.ndarray:
    """A float64 copy of ``x`` with unit rows; the caller's array is never touched."""
    arr = np.array(x, dtype=np.float64, copy=True)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"{what} must be a non-empty (N, d) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise UserError(f"{what} contains NaN or infinite values; recompute the embeddings")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UserError(f"{what} has {int((norms == 0).sum())} all-zero rows; they have no direction")
    return arr / norms


def _check_k(k: int, n: int, what: str, minimum: int = 1) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < minimum:
        raise UserError(f"k must be an integer >= {minimum}, got {k!r}")
    if k >= n:
        raise UserError(f"k={k} needs more than k points in {what}, which has {n}; use k < {n}")
    return int(k)


def _knn(query: np.ndarray, base: np.ndarray, k: int, same: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distances (N, k) and indices (N, k) of each query's k nearest points of ``base``,
    self excluded. ``same``: query is base, so row i's self is index i. Otherwise a base point at
    distance ~0 is taken as the query itself (a reference that contains the scanned data)."""
    from sklearn.neighbors import NearestNeighbors
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(base)
    dist, idx = nn.kneighbors(query)
    dist = np.clip(dist, 0.0, None)  # 1 − cos of unit vectors can round to -1e-16
    if same:
        # With exact duplicates self need not come first; drop it where it is, else the (k+1)-th.
        is_self = idx == np.arange(len(query))[:, None]
        is_self[~is_self.any(axis=1), -1] = True
    else:
        is_self = np.zeros_like(idx, dtype=bool)
        is_self[:, 0] = dist[:, 0] <= _EPS
        is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    return dist[keep].reshape(len(query), k), idx[keep].reshape(len(query), k)


def _neighbourhood(image_emb, k: int, reference, minimum_k: int = 1):
    """(distances, indices) of each pair's k neighbours and the k-distance of every point those
    indices refer to (the scanned set itself, or the reference)."""
    emb = _unit_rows(image_emb, "image_emb")
    if reference is None:
        k = _check_k(k, len(emb), "image_emb", minimum_k)
        dist, idx = _knn(emb, emb, k, same=True)
        return dist, idx, dist[:, -1]
    ref = _unit_rows(reference, "reference")
    if ref.shape[1] != emb.shape[1]:
        raise UserError(f"reference has dimension {ref.shape[1]} but image_emb has {emb.shape[1]}")
    k = _check_k(k, len(ref), "reference", minimum_k)
    dist, idx = _knn(emb, ref, k, same=False)
    ref_dist, _ = _knn(ref, ref, k, same=True)  # neighbours' k-distances, measured inside the reference
    return dist, idx, ref_dist[:, -1]


# ---------------------------------------------------------------- density detectors

@register_detector("k-dist")
def k_distance(image_emb, k: int = 10, reference=None) -> np.ndarray:
    """Cosine distance from each image embedding to its k-th nearest neighbour (self excluded).
    Isolated images score high; see the module docstring for repeated poisons and ``reference``."""
    dist, _, _ = _neighbourhood(image_emb, k, reference)
    return dist[:, -1].copy()


@register_detector("slof")
def simplified_lof(image_emb, k: int = 10, reference=None) -> np.ndarray:
    """Simplified LOF (Schubert et al. 2014): k-dist(x) / mean over x's k neighbours n of k-dist(n).
    ~1 inside a cluster of even density, > 1 where x is sparser than its neighbours — which makes it
    robust to clusters of different spreads, unlike the raw k-distance."""
    dist, idx, kd = _neighbourhood(image_emb, k, reference)
    return dist[:, -1] / np.maximum(kd[idx].mean(axis=1), _EPS)


def lid_mle(dist: np.ndarray, cap: float) -> np.ndarray:
    """Local intrinsic dimensionality by maximum likelihood (Levina & Bickel; Amsaleg et al. 2015)
    from each row's sorted neighbour distances r_1 <= ... <= r_k:

        LID(x) = −( (1/k) Σ_i log(r_i / r_k) )^{-1}

    All r_i equal gives 0 in the parentheses (LID → ∞); the estimate is capped at ``cap`` (the
    ambient dimension, beyond which an intrinsic dimension means nothing)."""
    r = np.maximum(dist, _EPS)
    mean_log = np.log(r / r[:, -1:]).mean(axis=1)  # <= 0
    with np.errstate(divide="ignore"):
        lid = np.where(mean_log < 0, -1.0 / mean_log, np.inf)
    return np.minimum(lid, cap)


@register_detector("dao")
def dimensionality_aware_outlier(image_emb, k: int = 10, reference=None) -> np.ndarray:
    """Dimensionality-aware outlier score (Huang et al., ICLR 2025), simple form:

        DAO(x) = (1/k) Σ_{n ∈ N_k(x)} ( r_k(x) / r_k(n) )^{LID(x)}

    with r_k the k-distance and LID(x) the MLE of ``lid_mle`` over x's own k neighbours. Raising the
    density ratio of SLOF to the local intrinsic dimension makes ratios comparable between regions
    of different dimensionality (in d dimensions, volume — hence density — scales as r^d).
    Computed in log space; exponents are clipped at 700 so scores stay finite floats (np.exp(709)
    is the largest double), which only ties points that are all extreme outliers."""
    dist, idx, kd = _neighbourhood(image_emb, k, reference, minimum_k=2)
    lid = lid_mle(dist, cap=float(np.shape(image_emb)[1]))
    log_ratio = np.log(np.maximum(dist[:, -1:], _EPS)) - np.log(np.maximum(kd[idx], _EPS))
    from scipy.special import logsumexp
    log_dao = logsumexp(lid[:, None] * log_ratio, axis=1) - np.log(dist.shape[1])
    return np.exp(np.minimum(log_dao, 700.0))


# ---------------------------------------------------------------- image–caption agreement

@register_detector("clip-score")
def clip_score(image_emb, text_emb, *, sign: int) -> np.ndarray:
    """sign × cos(image_i, caption_i) for every pair.

    ``sign`` is required, because which end is suspicious depends on the model that embedded the
    pairs: ``+1`` under the poisoned victim (it learned the poison pairs, so they agree unusually
    well: poisons score high), ``-1`` under a clean reference model (a poison's caption does not
    describe its image, so it agrees badly). ``gmm_split`` turns the scores into a posterior."""
    if sign not in (1, -1):
        raise UserError(f"sign must be +1 (embeddings from the poisoned victim) or -1 (from a clean "
                        f"reference model), got {sign!r}")
    img, txt = _unit_rows(image_emb, "image_emb"), _unit_rows(text_emb, "text_emb")
    if img.shape != txt.shape:
        raise UserError(f"image_emb {img.shape} and text_emb {txt.shape} must have the same shape "
                        f"(one caption embedding per image, same model)")
    return sign * np.einsum("ij,ij->i", img, txt)


def gmm_split(scores, seed: int = 0) -> np.ndarray:
    """Posterior probability of the suspicious component (the one with the higher mean) of a
    2-component Gaussian mixture fitted to the 1-d scores: a threshold-free split into clean and
    suspicious, as in loss-based poison filters. Seeded, so the same scores give the same split."""
    from sklearn.mixture import GaussianMixture
    s = np.array(scores, dtype=np.float64, copy=True)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise UserError(f"scores must be a 1-d array of finite numbers, got shape {s.shape}")
    if len(np.unique(s)) < 2:
        raise UserError("gmm_split needs at least two distinct scores to fit two components")
    gmm = GaussianMixture(n_components=2, random_state=seed).fit(s[:, None])
    return gmm.predict_proba(s[:, None])[:, int(np.argmax(gmm.means_[:, 0]))]


# ---------------------------------------------------------------- repeated images, other captions

@register_detector("near-duplicate")
def near_duplicate(captions, image_emb=None, pixels=None, threshold: float = 0.98) -> np.ndarray:
    """For each pair, the number of *other* pairs that show the same image — cosine of image
    embeddings >= ``threshold``, or identical decoded pixels (``io.sha256_pixels``) — under a
    different caption (compared after collapsing whitespace; case kept).

    Aimed at the targeted attack, which pairs one x' with many captions of the target label: its
    copies form a group that disagrees about what the image shows. Web data has innocent
    duplicates too (the same stock photo), but those usually repeat a caption, which scores 0.
    Backdoor poisons are different images sharing only a small patch and are not caught here."""
    caps = [" ".join(str(c).split()) for c in captions]
    n = len(caps)
    if n == 0:
        raise UserError("captions is empty; there are no pairs to scan")
    if image_emb is None and pixels is None:
        raise UserError("near-duplicate needs image_emb, pixels or both")
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"threshold is a cosine similarity in (0, 1], got {threshold}")
    same = [set() for _ in range(n)]  # indices of other pairs showing the same image
    if image_emb is not None:
        emb = _unit_rows(image_emb, "image_emb")
        if len(emb) != n:
            raise UserError(f"image_emb has {len(emb)} rows but there are {n} captions")
        from sklearn.neighbors import NearestNeighbors
        nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(emb)
        # cos >= t  <=>  1 − cos <= 1 − t; the 1e-9 keeps exact copies (cos rounded to 1 − 1e-16)
        # in at t = 1. radius_neighbors works in chunks, so memory stays O(N · group size).
        for i, nbrs in enumerate(nn.radius_neighbors(emb, radius=1.0 - threshold + 1e-9,
                                                     return_distance=False)):
            same[i].update(int(j) for j in nbrs if j != i)
    if pixels is not None:
        if len(pixels) != n:
            raise UserError(f"pixels has {len(pixels)} images but there are {n} captions")
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(sha256_pixels(np.asarray(p)), []).append(i)
        for members in groups.values():
            for i in members:
                same[i].update(j for j in members if j != i)
    return np.array([sum(caps[j] != caps[i] for j in same[i]) for i in range(n)], dtype=np.float64)


# ---------------------------------------------------------------- training dynamics

@register_detector("loss-dynamics")
def loss_dynamics(pair_loss) -> np.ndarray:
    """How early and how far each pair's contrastive loss falls below the other pairs' during
    training. Carlini & Terzis (§6) suggest monitoring training dynamics, after Carlini (2021), where
    poisons are learned early and fast. From ``pair_loss`` L (N pairs × E epochs, the victim's
    ``pair_loss.npy``), a robust z per epoch and its mean over the epochs:

        z[i, e]  = (median_e(L) − L[i, e]) / MAD_e(L)
        score[i] = mean over e ∈ S_i of z[i, e]

    median_e and MAD_e (scaled to a normal's standard deviation, floored at 1e-12) are taken over
    the pairs seen in epoch e, and S_i is the set of epochs pair i was seen in. NaN means "not seen
    that epoch" (training drops each epoch's partial last batch); a pair never seen scores 0, the
    typical pair. The z takes out the fall every pair's loss shares as training goes on, so every
    epoch weighs the same; the mean is then the area between the pair's loss curve and the
    typical one, largest for a pair that drops below the others early and stays far below (one
    learned only in the last epoch adds a single term). At least 2 epochs: with one there are no
    dynamics, only a loss ranking."""
    from scipy.stats import median_abs_deviation
    L = np.array(pair_loss, dtype=np.float64, copy=True)
    if L.ndim != 2 or L.shape[0] == 0:
        raise UserError(f"pair_loss must be a non-empty (N pairs, E epochs) array, got shape {L.shape}")
    if L.shape[1] < 2:
        raise UserError(f"pair_loss has {L.shape[1]} epoch(s); loss dynamics need >= 2 epochs: train with --epochs 2 "
                        "or more and --record-pair-loss")
    if np.isinf(L).any():
        raise UserError("pair_loss contains infinite values; a recorded loss is finite (NaN marks a pair not seen)")
    seen = ~np.isnan(L)
    if not seen.any(axis=0).all():
        empty = np.flatnonzero(~seen.any(axis=0)).tolist()
        raise UserError(f"pair_loss has epochs with no loss recorded (columns {empty}); pass the array "
                        "pair_loss.npy as written by training")
    mad = np.maximum(median_abs_deviation(L, axis=0, scale="normal", nan_policy="omit"), _EPS)
    z = (np.nanmedian(L, axis=0) - L) / mad
    n_seen = seen.sum(axis=1)
    return np.where(seen, z, 0.0).sum(axis=1) / np.maximum(n_seen, 1)
