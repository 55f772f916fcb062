"""Attack success rates (§4.2, §4.3), with the denominators the paper implies.

Peers often get these wrong: a triggered image of the target class counts as a "success" it did
not need, and scoring triggered images against their true labels measures accuracy, not attack
success. Here the backdoor ASR is over triggered images whose true class is not y'.
"""
from __future__ import annotations

import numpy as np


def targeted_success(pred_x_prime: int, target: int) -> dict:
    """§4.2: the targeted attack succeeds on a model when f(x') is classified as y'."""
    return {"success": bool(int(pred_x_prime) == int(target)), "predicted": int(pred_x_prime),
            "target": int(target)}


def targeted_asr(successes: list[bool]) -> dict:
    """Fraction over (model, target) pairs where f(x') = y' (the paper: over 32 models)."""
    s = np.asarray(successes, dtype=bool)
    return {"asr": float(s.mean()) if len(s) else float("nan"), "n": int(len(s))}


def backdoor_asr(preds_triggered: np.ndarray, true_labels: np.ndarray, target: int) -> dict:
    """§4.3: fraction of triggered images x ⊕ bd classified y', over images whose true class ≠ y'."""
    preds, labels = np.asarray(preds_triggered), np.asarray(true_labels)
    keep = labels != target
    n = int(keep.sum())
    asr = float(np.mean(preds[keep] == target)) if n else float("nan")
    return {"asr": asr, "n": n, "n_excluded_target_class": int((~keep).sum())}
