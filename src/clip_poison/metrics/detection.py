"""Scoring a data-scan detector against the truth (the poison sets' manifests): ROC-AUC, PR-AUC
and the false-positive rate at 95 % true-positive rate, from one score per pair (higher = more
suspicious, as every ``defenses/detectors.py`` detector returns)."""
from __future__ import annotations

import numpy as np

from ..io import UserError

TPR_TARGET = 0.95


def detection_metrics(scores, is_poison) -> dict:
    """``roc_auc``; ``pr_auc`` as average precision (the step-wise area, no interpolation between
    operating points, which would overstate it); ``fpr_at_95tpr``: the FPR at the highest
    threshold whose TPR is >= 0.95, i.e. the fewest clean pairs a filter must also drop to remove
    95 % of the poisons. Ties in the scores are one threshold, so they cannot be split favourably."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    s = np.array(scores, dtype=np.float64, copy=True)
    y = np.array(is_poison, copy=True)
    if s.ndim != 1 or len(s) == 0:
        raise UserError(f"scores must be a non-empty 1-d array, got shape {s.shape}")
    if y.shape != s.shape:
        raise UserError(f"scores ({len(s)}) and is_poison ({y.size}) must have one entry per pair")
    if not np.isfinite(s).all():
        raise UserError("scores contain NaN or infinite values")
    if not np.isin(y, (0, 1)).all():
        raise UserError("is_poison must be booleans or 0/1")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise UserError(f"need both poisons and clean pairs to score a detector; got "
                        f"{int(y.sum())} poisons among {len(y)} pairs")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "roc_auc": float(roc_auc_score(y, s)),
        "pr_auc": float(average_precision_score(y, s)),
        # tpr is non-decreasing along the curve, so the first point reaching 0.95 has the lowest fpr
        "fpr_at_95tpr": float(fpr[np.argmax(tpr >= TPR_TARGET)]),
        "n": int(len(y)),
        "n_poison": int(y.sum()),
    }
