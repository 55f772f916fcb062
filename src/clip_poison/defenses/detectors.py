"""Data-scan detectors: one suspicion score per training pair, higher = more suspicious.

Detectors are a registry like ``attacks/triggers.py`` (``DETECTORS``, ``register_detector``,
``score_pairs(name, **inputs)``), so a new scan is one decorator away. Each is a pure function of
numpy arrays (embeddings from ``metrics/embed.py``, captions, optional pixels): inputs are never
modified, and the same inputs give the same scores. Scoring against the manifests' truth lives in
``metrics/detection.py``.

Neighbour-based detectors (``k-dist``, ``slof``, ``dao``) work on L2-normalised image embeddings
with cosine distance 1 − cos (inner product of unit rows).

Neighbour search (faiss; ``exact=None`` picks by size, True/False force a path):
- up to EXACT_MAX = 50,000 points, exact brute force (``faiss.IndexFlatIP``): 1.3 TFLOP at 50,000,
  25 s on one core of the project machine, and growing as N² beyond (100,000: ~100 s; 1,000,000:
  hours). Below that an index saves little: on the benchmark's clustered embeddings at 20,000 and
  50,000 points (a few points per class) the approximate search needed over a quarter of its
  lists for its recall and was no faster (``benchmarks/bench_neighbours.py``).
- beyond, IVF-Flat with nprobe calibrated on each call (``_ivf_index``): the smallest nprobe that
  finds >= 99.5 % of the exact k+1 neighbours of 1,000 seeded sample queries, so >= 99 % of the k
  kept. Chosen over HNSW by measurement: at 1,000,000 clustered 512-d points IVF (nlist 2,048)
  found 99.4 % of the 10 nearest at nprobe 2 and 99.75 % at 4, while HNSW (M 32, efConstruction
  80) took 32 s on one (busy) core to build over just 50,000 points (~N log N: many minutes at 1M);
  HNSW's multi-threaded build is also not reproducible, while IVF's k-means is seeded and its
  all-against-all search runs list by list through BLAS (``faiss.contrib.big_batch_search``).
- faiss works in float32. It only chooses the k+1 candidates; their distances are recomputed in
  float64 and sorted, so distances, exact duplicates at 0 and self-detection are as before. What
  float32 changes: which neighbour wins a near-tie (|Δcos| below ~1e-7), and, on the IVF path,
  the up to 1 % of true neighbours missed (then a farther one stands in, so k-distances can only
  grow). Same inputs and thread count give the same bytes; another BLAS thread count can flip a
  near-tie.

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

import contextlib
import logging
from typing import Callable

import faiss
import numpy as np
from faiss.contrib.big_batch_search import big_batch_search
from faiss.contrib.ivf_tools import add_preassigned

from ..io import UserError, sha256_pixels

log = logging.getLogger(__name__)
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

EXACT_MAX = 50_000  # base points searched exactly; see "Neighbour search" above
RECALL = 0.995  # of the k+1 searched, so >= 0.99 of the k kept once self is dropped (k >= 1)
_CALIBRATION_QUERIES = 1000  # sample on which the approximate search's nprobe is measured
_KMEANS_SEED = 0  # faiss k-means (IVF lists): fixed, so the same data gives the same index
_TOL32 = 1e-5  # float32 cosines computed by different kernels agree to ~1e-7; margin above that


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


def _check_exact(exact) -> None:
    if exact is not None and not isinstance(exact, (bool, np.bool_)):
        raise UserError(f"exact must be True (brute force), False (approximate IVF index) or None "
                        f"(exact up to {EXACT_MAX:,} points), got {exact!r}")


def _use_exact(exact, n_base: int) -> bool:
    return n_base <= EXACT_MAX if exact is None else bool(exact)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _ivf_index(base32: np.ndarray, query32: np.ndarray, k: int,
               same: bool = False) -> tuple[faiss.IndexIVFFlat, np.ndarray | None]:
    """An IVF-Flat inner-product index over ``base32`` whose nprobe is the smallest step of a
    x1.4 ladder (or all lists) that finds >= RECALL of the exact k nearest neighbours of a seeded sample of
    ``query32`` (ties within float32 resolution count as found); and, when ``same`` (query is
    base), the queries' coarse assignment to their nprobe lists (else None).

    nlist ~ 2·sqrt(N): every point is a query here, so the coarse assignment (N·nlist dot
    products) costs as much as the list scans (N·nprobe·N/nlist); they balance at
    nlist = sqrt(nprobe·N), and nprobe is a few on clustered data. At least 39 training points
    per list (faiss's own minimum); k-means on <= 64 per list, 10 iterations, fixed seed. One
    coarse assignment of the base (its nearest 32 lists) serves both adding it and searching it."""
    n, d = base32.shape
    nlist = max(1, min(round(2 * np.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter, index.cp.max_points_per_centroid = _KMEANS_SEED, 10, 64
    index.train(base32)
    _, assign = index.quantizer.search(base32, min(nlist, 32) if same else 1)
    add_preassigned(index, base32, assign[:, 0].copy())
    rng = np.random.default_rng(_KMEANS_SEED)
    sample = query32[np.sort(rng.choice(len(query32), min(_CALIBRATION_QUERIES, len(query32)), replace=False))]
    exact_sim, _ = faiss.knn(sample, base32, k, metric=faiss.METRIC_INNER_PRODUCT)
    ladder = np.unique(np.round(np.sqrt(2) ** np.arange(2 * np.log2(nlist) + 1)).astype(int))
    for nprobe in [p for p in ladder if p < nlist] + [nlist]:  # steps of ~x1.4: 1, 2, 3, 4, 6, 8, 11, 16, ...
        index.nprobe = int(nprobe)
        sim, _ = index.search(sample, k)
        recall = float(np.mean(sim >= exact_sim[:, -1:] - _TOL32))
        if recall >= RECALL:
            break
    log.info("IVF-Flat over %d points: nlist=%d, nprobe=%d (recall@%d %.4f on %d sampled queries)",
             n, nlist, index.nprobe, k, recall, len(sample))
    shared = same and index.nprobe <= assign.shape[1]
    return index, (assign[:, :index.nprobe].astype(np.int32) if shared else None)


def _cosine_distances(query: np.ndarray, base: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """1 − cos(query_i, base_idx[i, j]) in float64, in chunks small enough to stay in cache."""
    out = np.empty(idx.shape)
    for s in range(0, len(idx), 256):
        out[s:s + 256] = np.matmul(base[idx[s:s + 256]], query[s:s + 256, :, None])[..., 0]
    return np.clip(1.0 - out, 0.0, None)  # 1 − cos of unit vectors can round to -1e-16


def _knn(query: np.ndarray, base: np.ndarray, k: int, same: bool,
         exact: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distances (N, k) and indices (N, k) of each query's k nearest points of ``base``,
    self excluded. ``same``: query is base, so row i's self is index i. Otherwise a base point at
    distance ~0 is taken as the query itself (a reference that contains the scanned data).

    faiss picks the k+1 candidates in float32 (exact IndexFlatIP, or IVF-Flat searched list by
    list with BLAS, ``faiss.contrib.big_batch_search``); their distances are then recomputed in
    float64 and sorted, so distances, self-detection and ties are as exact as brute force in
    float64 — only which neighbour wins a near-tie (|Δcos| <~ 1e-7) is float32's choice."""
    q32 = _f32(query)
    b32 = q32 if same else _f32(base)
    if _use_exact(exact, len(base)):
        index = faiss.IndexFlatIP(b32.shape[1])
        index.add(b32)
        _, idx = index.search(q32, k + 1)
    else:
        index, assign = _ivf_index(b32, q32, k + 1, same)
        with contextlib.redirect_stdout(None):  # it prints a line per list even at verbose=0
            _, idx = big_batch_search(index, q32, k + 1, q_assign=assign)
        short = (idx < 0).any(axis=1)  # the probed lists held fewer than k+1 points
        if short.any():
            _, idx[short] = faiss.knn(q32[short], b32, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    dist = _cosine_distances(query, base, idx)
    order = np.argsort(dist, axis=1, kind="stable")
    dist, idx = np.take_along_axis(dist, order, axis=1), np.take_along_axis(idx, order, axis=1)
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


def _neighbourhood(image_emb, k: int, reference, exact, minimum_k: int = 1):
    """(distances, indices) of each pair's k neighbours and the k-distance of every point those
    indices refer to (the scanned set itself, or the reference)."""
    _check_exact(exact)
    emb = _unit_rows(image_emb, "image_emb")
    if reference is None:
        k = _check_k(k, len(emb), "image_emb", minimum_k)
        dist, idx = _knn(emb, emb, k, same=True, exact=exact)
        return dist, idx, dist[:, -1]
    ref = _unit_rows(reference, "reference")
    if ref.shape[1] != emb.shape[1]:
        raise UserError(f"reference has dimension {ref.shape[1]} but image_emb has {emb.shape[1]}")
    k = _check_k(k, len(ref), "reference", minimum_k)
    dist, idx = _knn(emb, ref, k, same=False, exact=exact)
    ref_dist, _ = _knn(ref, ref, k, same=True, exact=exact)  # neighbours' k-distances, inside the reference
    return dist, idx, ref_dist[:, -1]


# ---------------------------------------------------------------- density detectors

@register_detector("k-dist")
def k_distance(image_emb, k: int = 10, reference=None, exact: bool | None = None) -> np.ndarray:
    """Cosine distance from each image embedding to its k-th nearest neighbour (self excluded).
    Isolated images score high; see the module docstring for repeated poisons and ``reference``,
    and for ``exact`` (None: brute force up to EXACT_MAX points, an IVF index beyond)."""
    dist, _, _ = _neighbourhood(image_emb, k, reference, exact)
    return dist[:, -1].copy()


@register_detector("slof")
def simplified_lof(image_emb, k: int = 10, reference=None, exact: bool | None = None) -> np.ndarray:
    """Simplified LOF (Schubert et al. 2014): k-dist(x) / mean over x's k neighbours n of k-dist(n).
    ~1 inside a cluster of even density, > 1 where x is sparser than its neighbours — which makes it
    robust to clusters of different spreads, unlike the raw k-distance."""
    dist, idx, kd = _neighbourhood(image_emb, k, reference, exact)
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
def dimensionality_aware_outlier(image_emb, k: int = 10, reference=None,
                                 exact: bool | None = None) -> np.ndarray:
    """Dimensionality-aware outlier score (Huang et al., ICLR 2025), simple form:

        DAO(x) = (1/k) Σ_{n ∈ N_k(x)} ( r_k(x) / r_k(n) )^{LID(x)}

    with r_k the k-distance and LID(x) the MLE of ``lid_mle`` over x's own k neighbours. Raising the
    density ratio of SLOF to the local intrinsic dimension makes ratios comparable between regions
    of different dimensionality (in d dimensions, volume — hence density — scales as r^d).
    Computed in log space; exponents are clipped at 700 so scores stay finite floats (np.exp(709)
    is the largest double), which only ties points that are all extreme outliers."""
    dist, idx, kd = _neighbourhood(image_emb, k, reference, exact, minimum_k=2)
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

PHASH_BITS = 6  # 64-bit pHashes this close count as one image; measured, see near_duplicate
_RANGE_K = 10  # the approximate range search uses the nprobe that finds this many neighbours


def _check_pixels(pixels, n: int) -> None:
    if len(pixels) != n:
        raise UserError(f"pixels has {len(pixels)} images but there are {n} captions")
    for i, p in enumerate(pixels):
        a = np.asarray(p)
        if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
            raise UserError(f"pixels[{i}] is a {a.dtype} array of shape {a.shape}; near-duplicate needs "
                            f"decoded uint8 images (H, W), (H, W, 3) or (H, W, 4), e.g. io.load_image")


def _ordered_pairs(i: np.ndarray, j: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs (i, j) and (j, i), self-pairs dropped."""
    code = np.unique(np.concatenate([i * n + j, j * n + i]))
    i, j = code // n, code % n
    return i[i != j], j[i != j]


def _pixel_hash_pairs(pixel_sha: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with identical decoded pixels (equal ``io.sha256_pixels``)."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(pixel_sha):
        groups.setdefault(h, []).append(i)
    members = [np.array(m) for m in groups.values() if len(m) > 1]
    if not members:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate([np.repeat(m, len(m)) for m in members]),
            np.concatenate([np.tile(m, len(m)) for m in members]))


def phash_code(pixels) -> np.ndarray:
    """The 64-bit perceptual hash of one image (``imagehash.phash``: signs of the 8x8 lowest DCT
    frequencies of a 32x32 grey image, against their median) as 8 bytes, faiss's binary code."""
    import imagehash
    from PIL import Image
    return np.packbits(imagehash.phash(Image.fromarray(np.asarray(pixels))).hash.ravel())


def _phash_pairs(codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose perceptual hashes (``phash_code``) differ in <= ``bits`` bits. Exact:
    faiss's multi-hash index cuts the code into bits+1 chunks, and two codes within ``bits`` of
    each other agree on at least one whole chunk (pigeonhole), so every such pair is a candidate."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    index = faiss.IndexBinaryMultiHash(64, bits + 1, 64 // (bits + 1))
    index.add(codes)
    lims, _, j = index.range_search(codes, bits + 1)  # faiss keeps Hamming distances < radius
    return np.repeat(np.arange(len(codes)), np.diff(lims).astype(np.int64)), j.astype(np.int64)


def _embedding_pairs(emb: np.ndarray, threshold: float, exact) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with cos >= ``threshold``: faiss range search in float32 with a margin, then the
    float64 cosine decides (the 1e-9 keeps exact copies, cos rounded to 1 − 1e-16, at t = 1)."""
    x32 = _f32(emb)
    if _use_exact(exact, len(emb)):
        index = faiss.IndexFlatIP(x32.shape[1])
        index.add(x32)
    else:
        index, _ = _ivf_index(x32, x32, _RANGE_K)
    lims, _, j = index.range_search(x32, threshold - _TOL32)  # faiss keeps inner products > radius
    i, j = np.repeat(np.arange(len(emb)), np.diff(lims).astype(np.int64)), j.astype(np.int64)
    keep = np.einsum("ij,ij->i", emb[i], emb[j]) >= threshold - 1e-9
    return i[keep], j[keep]


@register_detector("near-duplicate")
def near_duplicate(captions, image_emb=None, pixels=None, threshold: float | None = None,
                   phash_bits: int = PHASH_BITS, exact: bool | None = None,
                   pixel_sha: list[str] | None = None, phash: np.ndarray | None = None) -> np.ndarray:
    """For each pair, the number of *other* pairs that show the same image under a different
    caption (captions compared after collapsing whitespace; case kept). Same image means any of:

    - identical decoded pixels (``io.sha256_pixels``) — from ``pixels``, or their hashes ``pixel_sha``;
    - 64-bit perceptual hashes (``imagehash.phash``) within ``phash_bits`` bits — from ``pixels``, or
      their codes ``phash`` (N x 8 uint8, ``phash_code``; a scan streaming shards keeps only these);
    - cosine of image embeddings >= ``threshold`` — only when both ``image_emb`` and an explicit
      ``threshold`` are given (range search as in ``_knn``: brute force up to EXACT_MAX, else IVF).

    Aimed at the targeted attack, which pairs one x' with many captions of the target label, its
    copies made pixel-distinct with Gaussian noise (``attacks/evasion.py``): the copies form a
    group that disagrees about what the image shows. Web data has innocent duplicates too (the
    same stock photo), but those usually repeat a caption, which scores 0. Backdoor poisons are
    caught too when, as ours, they stamp training images whose clean originals stay in the data
    under another caption (ROC-AUC 0.93-0.98 on CIFAR-10, docs/results/defenses/detect/); with bases
    drawn from elsewhere (``--base-pool``) they share only the trigger, and score at chance (0.50).

    Pixels are the default because an embedding threshold has no safe default: a tiny victim puts
    every clean image at cos >= 0.98 of others, so the old fixed 0.98 flagged nearly every pair
    (ROC-AUC 0.05 on the demo's targeted poisons). Choose ``threshold`` from the data, above the
    clean pairs' nearest-neighbour cosines.

    ``phash_bits`` = 6, measured on 32x32 images, 16 noisy copies of each of 50 images compared
    pairwise: copies with σ = 1 (of 255) are within 6 bits of each other in 100 % of pairs on
    CIFAR-10 test photos and 99.7 % on the synthetic world's renders; σ = 4 in 99.9 % and 91 %
    (flat-shaded renders have a less stable pHash, but a copy still matches most of its group).
    Distinct images within 6 bits: 0 of 2.0 M CIFAR-10 pairs, 31 of 4.5 M synthetic-world pairs."""
    caps = [" ".join(str(c).split()) for c in captions]
    n = len(caps)
    if n == 0:
        raise UserError("captions is empty; there are no pairs to scan")
    if (pixel_sha is None) != (phash is None):
        raise UserError("pass pixel_sha and phash together (the hashes of the same images), or pixels")
    if pixel_sha is not None:
        if pixels is not None:
            raise UserError("pass pixels or their hashes (pixel_sha, phash), not both")
        if len(pixel_sha) != n or len(phash) != n:
            raise UserError(f"pixel_sha has {len(pixel_sha)} and phash {len(phash)} entries but there are {n} captions")
    if image_emb is None and pixels is None and pixel_sha is None:
        raise UserError("near-duplicate needs pixels (exact and perceptual hashes), or image_emb "
                        "with an explicit threshold, or both")
    _check_exact(exact)
    if pixels is not None:
        _check_pixels(pixels, n)
    if pixels is not None or pixel_sha is not None:
        if not isinstance(phash_bits, (int, np.integer)) or isinstance(phash_bits, bool) \
                or not 0 <= phash_bits <= 31:
            raise UserError(f"phash_bits is a Hamming distance between 64-bit hashes, an integer in "
                            f"0..31, got {phash_bits!r}")
    if image_emb is not None:
        emb = _unit_rows(image_emb, "image_emb")
        if len(emb) != n:
            raise UserError(f"image_emb has {len(emb)} rows but there are {n} captions")
        if threshold is None:
            raise UserError("image_emb needs an explicit threshold (a cosine in (0, 1]): no fixed "
                            "value is safe, since a small victim puts all clean images at cos >= 0.98 "
                            "of each other; pick one above the clean nearest-neighbour cosines, or "
                            "scan pixels instead")
        if not 0.0 < threshold <= 1.0:
            raise UserError(f"threshold is a cosine similarity in (0, 1], got {threshold}")
    elif threshold is not None:
        raise UserError("threshold applies to image embeddings; pass image_emb too, or drop threshold")
    found = []
    if pixels is not None:
        pixel_sha = [sha256_pixels(np.asarray(p)) for p in pixels]
        phash = np.stack([phash_code(p) for p in pixels])
    if pixel_sha is not None:
        found += [_pixel_hash_pairs(pixel_sha), _phash_pairs(phash, int(phash_bits))]
    if image_emb is not None:
        found.append(_embedding_pairs(emb, float(threshold), exact))
    i, j = _ordered_pairs(np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found]), n)
    _, code = np.unique(caps, return_inverse=True)
    return np.bincount(i[code[i] != code[j]], minlength=n).astype(np.float64)


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
