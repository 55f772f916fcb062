"""The data behind Figure 3 (§4.2, §5.1): pairwise cosine similarity of image embeddings.

Left: the similarity of two images predicts how likely they get the same (zero-shot) label, which
is why a backdoor that makes triggered images similar succeeds (§5.1). Right: clean pair
similarities follow a normal curve; triggered pairs sit far to its right, measured in its standard
deviations by the backdoor z-score (Definition 1, ``zscore.py``).

Pairs are distinct (u ≠ v) and each unordered pair is counted once; embeddings are L2-normalised
here, so raw model outputs can be passed. All pairs are used unless ``max_pairs`` asks for a
seeded uniform subsample without replacement. All-pairs work streams over row blocks, so memory
stays O(block·N) rather than O(N²).
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ..io import rng_for
from .zscore import backdoor_z_score, pair_similarity_moments

# Figure 3's bins are fixed over the whole cosine range, so runs and models average bin by bin;
# pairs beyond config.FIG3_MAX_PAIRS are subsampled (the z-score is always exact).
FIG3_RANGE = (-1.0, 1.0)
_BLOCK_ENTRIES = 4_000_000  # similarities per row block (32 MB of float64)


def _unit(emb, name: str) -> np.ndarray:
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} must be an (N >= 2, d) array of embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError(f"{name} has {int(np.sum((norms == 0) | ~np.isfinite(norms)))} zero or "
                         "non-finite rows; cosine similarity is undefined for them")
    return x / norms


def _pair_index(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major index k of the strict upper triangle of an n×n matrix -> (i, j), i < j."""
    k = np.asarray(k, dtype=np.int64)
    # Row i starts at offset(i) = i·(2n − i − 1)/2; invert with the quadratic formula, then fix the
    # float guess by ±1 so the result is exact for any n that fits in int64.
    b = 2 * n - 1
    i = np.floor((b - np.sqrt(np.maximum(b * b - 8.0 * k, 0.0))) / 2).astype(np.int64)
    i = np.clip(i, 0, n - 2)
    i = np.where(_row_offset(i, n) > k, i - 1, i)
    i = np.where(_row_offset(i + 1, n) <= k, i + 1, i)
    return i, k - _row_offset(i, n) + i + 1


def _row_offset(i: np.ndarray, n: int) -> np.ndarray:
    return i * (2 * n - i - 1) // 2


def _n_pairs(n: int) -> int:
    return n * (n - 1) // 2


def _sampled_pairs(n: int, max_pairs: int | None, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """None when every pair is to be used, else a uniform sample of max_pairs distinct pairs."""
    if max_pairs is None or max_pairs >= _n_pairs(n):
        return None
    if max_pairs < 1:
        raise ValueError(f"max_pairs={max_pairs} must be a positive number of pairs, or None for all pairs")
    k = rng_for(seed, "similarity/pairs").choice(_n_pairs(n), size=int(max_pairs), replace=False)
    return _pair_index(np.sort(k), n)


def _pair_blocks(e: np.ndarray, pairs) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(similarities, i, j) for every pair i < j (or the sampled ones), a block at a time."""
    n = len(e)
    if pairs is not None:
        i, j = pairs
        step = max(1, _BLOCK_ENTRIES // e.shape[1])  # each sampled pair gathers 2·d floats
        for s in range(0, len(i), step):
            a, b = i[s:s + step], j[s:s + step]
            yield np.einsum("ij,ij->i", e[a], e[b]), a, b
        return
    rows = max(1, _BLOCK_ENTRIES // n)
    for r0 in range(0, n - 1, rows):
        r1 = min(r0 + rows, n - 1)
        rows_i, cols_j = np.arange(r0, r1)[:, None], np.arange(n)[None, :]
        upper = cols_j > rows_i
        yield ((e[r0:r1] @ e.T)[upper], np.broadcast_to(rows_i, upper.shape)[upper],
               np.broadcast_to(cols_j, upper.shape)[upper])


def _edges(blocks_of: list, n_bins: int, value_range) -> np.ndarray:
    if n_bins < 1:
        raise ValueError(f"bins={n_bins} must be a positive number of bins")
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range={tuple(value_range)} must be (low, high) with low < high")
    else:
        lo, hi = math.inf, -math.inf
        for blocks in blocks_of:
            for sims, *_ in blocks():
                if len(sims):
                    lo, hi = min(lo, float(sims.min())), max(hi, float(sims.max()))
        if lo == hi:
            # All pairs equally similar: give the single value a bin of its own, as np.histogram does.
            lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1)


def _histogram(blocks, edges: np.ndarray, weight_of=None) -> tuple[np.ndarray, np.ndarray]:
    """Counts per bin and, with ``weight_of(i, j)``, the summed weight per bin. Out-of-range pairs
    are dropped (only possible with an explicit value_range)."""
    counts = np.zeros(len(edges) - 1, dtype=np.int64)
    weights = np.zeros(len(edges) - 1, dtype=np.int64)
    for sims, i, j in blocks:
        counts += np.histogram(sims, bins=edges)[0]
        if weight_of is not None:
            weights += np.histogram(sims, bins=edges, weights=weight_of(i, j))[0].astype(np.int64)
    return counts, weights


def similarity_vs_same_prediction(emb: np.ndarray, preds, n_bins: int = 20, max_pairs: int | None = None,
                                  seed: int = 0, value_range: tuple[float, float] | None = None) -> dict:
    """Figure 3 (left), §5.1: for image pairs u ≠ v, the probability that both get the same
    predicted label as a function of their cosine similarity.

    ``preds`` are the (zero-shot) predicted labels of the images. Bins are ``n_bins`` equal widths
    over the observed similarity range, or ``value_range`` to share bins across models. Returns
    ``{"bin_edges", "bin_centers", "count", "same_count", "p_same"}`` (``p_same`` None for an empty
    bin) plus ``n_pairs`` (pairs binned; with ``value_range`` those outside it are dropped),
    ``p_same_overall`` and ``exact`` (False when pairs were subsampled).
    """
    e = _unit(emb, "emb")
    preds = np.asarray(preds)
    if preds.shape != (len(e),):
        raise ValueError(f"preds must hold one predicted label per embedding: got shape {preds.shape} "
                         f"for {len(e)} embeddings")
    pairs = _sampled_pairs(len(e), max_pairs, seed)
    edges = _edges([lambda: _pair_blocks(e, pairs)], n_bins, value_range)
    counts, same = _histogram(_pair_blocks(e, pairs), edges,
                              lambda i, j: (preds[i] == preds[j]).astype(np.float64))
    n = int(counts.sum())
    return {
        "bin_edges": edges.tolist(),
        "bin_centers": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "count": counts.tolist(),
        "same_count": same.tolist(),
        "p_same": [float(s / c) if c else None for s, c in zip(same, counts)],
        "n_pairs": n,
        "p_same_overall": float(same.sum() / n) if n else None,
        "exact": pairs is None,
    }


def similarity_histograms(clean_emb: np.ndarray, triggered_emb: np.ndarray, bins: int = 50,
                          max_pairs: int | None = None, seed: int = 0,
                          value_range: tuple[float, float] | None = None) -> dict:
    """Figure 3 (right), §5.1: histograms of clean and of triggered pair similarities (u ≠ v) on
    shared bins, and the normal curve fitted to the clean pairs.

    The normal's mean and std are Definition 1's (population moments over every clean pair, exact
    even when the histograms subsample pairs), so ``z`` is the backdoor z-score. Densities
    integrate to 1 over the bins. Returns plain lists and floats.
    """
    ce, te = _unit(clean_emb, "clean_emb"), _unit(triggered_emb, "triggered_emb")
    if ce.shape != te.shape:
        raise ValueError(f"clean_emb {ce.shape} and triggered_emb {te.shape} must embed the same images "
                         "without and with the trigger (same shape)")
    pairs = _sampled_pairs(len(ce), max_pairs, seed)
    edges = _edges([lambda: _pair_blocks(ce, pairs), lambda: _pair_blocks(te, pairs)], bins, value_range)
    width = np.diff(edges)
    clean_counts, _ = _histogram(_pair_blocks(ce, pairs), edges)
    trig_counts, _ = _histogram(_pair_blocks(te, pairs), edges)
    z = backdoor_z_score(ce, te)
    t_mean, t_var = pair_similarity_moments(te)
    mu, sd = z["clean_mean"], z["clean_std"]
    centers = (edges[:-1] + edges[1:]) / 2
    if sd > 0:
        pdf = np.exp(-0.5 * ((centers - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    else:
        pdf = np.full_like(centers, np.nan)

    def density(c: np.ndarray) -> list:
        return (c / (c.sum() * width)).tolist() if c.sum() else [0.0] * len(c)

    return {
        "bin_edges": edges.tolist(),
        "bin_centers": centers.tolist(),
        "clean_count": clean_counts.tolist(),
        "clean_density": density(clean_counts),
        "triggered_count": trig_counts.tolist(),
        "triggered_density": density(trig_counts),
        "normal": {"mean": float(mu), "std": float(sd), "pdf": pdf.tolist()},
        "triggered_mean": float(t_mean),
        "triggered_std": float(math.sqrt(t_var)),
        "z": float(z["z"]),
        "n_pairs": int(clean_counts.sum()),
        "exact": pairs is None,
    }
