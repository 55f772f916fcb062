"""Backdoor z-score (§5.1, Definition 1), exact in O(N·d²) and a naive O(N²·d) reference.

    z = ( Mean_{u≠v} <f(u⊕bd), f(v⊕bd)>  −  Mean_{u≠v} <f(u), f(v)> ) / Std_{u≠v} <f(u), f(v)>

f is the L2-normalised image embedding; pairs are distinct (u ≠ v: a self-pair has similarity 1
and would bias both means); Std is the population standard deviation over those pairs (the paper's
"five standard deviations"; peers that divide by the variance or keep self-pairs get other numbers).

The fast form needs only sums: for unit rows E (N×d), with s = Σ e_i and G = EᵀE,
  Σ_{u≠v} <e_u, e_v>   = ‖s‖² − Σ‖e_i‖²
  Σ_{u≠v} <e_u, e_v>²  = ‖G‖_F² − Σ‖e_i‖⁴
so 50,000 × 512 embeddings cost one 512×512 Gram matrix instead of 2.5·10⁹ dot products.
"""
from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need an (N >= 2, d) array of embeddings, got shape {x.shape}")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pair_similarity_moments(emb: np.ndarray) -> tuple[float, float]:
    """Mean and population variance of cosine similarity over ordered pairs u ≠ v, in O(N·d²)."""
    e = _unit(emb)
    n = len(e)
    sq = np.einsum("ij,ij->i", e, e)  # ‖e_i‖² (= 1 up to rounding; kept exact)
    s = e.sum(axis=0)
    gram = e.T @ e
    n_pairs = n * (n - 1)
    mean = (s @ s - sq.sum()) / n_pairs
    mean_sq = (np.sum(gram * gram) - np.sum(sq * sq)) / n_pairs
    var = mean_sq - mean * mean
    # E[s²] − E[s]² cancels catastrophically when the pairs have no spread (e.g. N = 2): treat a
    # variance within rounding error of E[s²] as the exact 0 it is, so z is NaN as defined.
    if var <= 64 * np.finfo(np.float64).eps * max(mean_sq, 1.0):
        var = 0.0
    return float(mean), float(var)


def pair_similarity_moments_naive(emb: np.ndarray) -> tuple[float, float]:
    """The definition itself: every pair u ≠ v, O(N²·d). Reference for tests and benchmarks."""
    e = _unit(emb)
    sims = e @ e.T
    off = sims[~np.eye(len(e), dtype=bool)]
    return float(off.mean()), float(off.var())


def backdoor_z_score(clean_emb: np.ndarray, triggered_emb: np.ndarray, naive: bool = False) -> dict:
    """Definition 1 (§5.1): how atypically similar triggered images are, in clean-pair stds.

    ``clean_emb[i]`` and ``triggered_emb[i]`` embed the same image without / with the trigger.
    Returns ``{"z", "clean_mean", "clean_std", "triggered_mean", "n"}``.
    """
    moments = pair_similarity_moments_naive if naive else pair_similarity_moments
    c_mean, c_var = moments(clean_emb)
    t_mean, _ = moments(triggered_emb)
    std = float(np.sqrt(c_var))
    z = (t_mean - c_mean) / std if std > 0 else float("nan")
    return {"z": float(z), "clean_mean": c_mean, "clean_std": std, "triggered_mean": t_mean,
            "n": int(len(clean_emb))}
