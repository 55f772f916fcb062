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


def targeted_asr_over_runs(results: list[dict]) -> dict:
    """§4.2's headline number: the fraction of (model, target) pairs where f(x') = y'.

    ``results``: one dict per (model, target) pair with a boolean ``success`` (as in an evaluation's
    ``targeted`` list); ``model`` (any id) and ``eval_index``/``label`` are counted when present.
    Each pair counts once, so a model attacked on 4 targets weighs 4 and one on 1 target weighs 1,
    as in the paper's "success over 32 models" per poison count.
    """
    succ = [bool(r["success"]) for r in results]
    out = targeted_asr(succ)
    out["n_success"] = int(sum(succ))
    out["n_models"] = len({r["model"] for r in results if "model" in r}) or None
    out["n_targets"] = len({(r.get("eval_index"), r.get("label")) for r in results
                            if "eval_index" in r or "label" in r}) or None
    return out
