"""§2.3 text-side poisoning: does the poisoned caption t' now embed as the concept y'?

Two views, both pure functions of embeddings: (1) text→image retrieval with t' as the query over
the eval images (where do the y'-class images rank?), (2) g(t') classified against the class
centroids of the eval images' embeddings (is the nearest centroid y'?). Evaluated on a clean
model with the same inputs, the same numbers are the baseline.
"""
from __future__ import annotations

import numpy as np


def evaluate(text_emb: np.ndarray, image_emb: np.ndarray, labels: np.ndarray, target: int,
             ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """``text_emb``: g(t') (d,), L2-normalised; ``image_emb``: N x d, L2-normalised; ``labels``:
    the eval labels; ``target``: the class index of y'."""
    labels = np.asarray(labels)
    sims = image_emb @ text_emb
    order = np.argsort(-sims, kind="stable")
    is_t = labels[order] == target
    n_t = int(is_t.sum())
    ranks = np.flatnonzero(is_t) + 1  # 1-based ranks of the y' images
    out = {"n_images": int(len(labels)), "n_target_images": n_t,
           "precision_at": {str(k): float(is_t[:k].mean()) for k in ks if k <= len(labels)},
           "recall_at": {str(k): float(is_t[:k].sum() / max(n_t, 1)) for k in ks if k <= len(labels)},
           # R-precision: of the top n_t images, the fraction that are y' (1.0 = all y' ranked first).
           "r_precision": float(is_t[:n_t].mean()) if n_t else float("nan"),
           "best_rank": int(ranks[0]) if n_t else None,
           "median_rank": float(np.median(ranks)) if n_t else None,
           # Chance level of the median rank is about N / 2.
           "median_rank_chance": float(len(labels) / 2)}
    classes = np.unique(labels)
    cents = np.stack([image_emb[labels == c].mean(0) for c in classes])
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    csims = cents @ text_emb
    corder = classes[np.argsort(-csims, kind="stable")]
    out["centroid"] = {"predicted": int(corder[0]), "success": bool(corder[0] == target),
                       "target_rank": int(np.flatnonzero(corder == target)[0] + 1) if target in classes else None,
                       "cosine_target": float(csims[classes == target][0]) if target in classes else None,
                       "cosine_max": float(csims.max())}
    return out
