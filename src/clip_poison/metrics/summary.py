"""Numbers over several trained models: what the paper's tables and figures report (§4.1–§5.1).

``summarize_runs`` takes the ``evaluate_checkpoint`` results of k poisoned models and (optionally)
k' clean models evaluated against the *same* manifests, and returns, as one plain dict:

* zero-shot (and probe) accuracy: mean, std and 95% CI over models, and the one-sided test
  "poisoned lower than clean" (§4.1: "none ... statistically significantly lower"): paired over
  seeds when ``paired`` (poisoned[i] and clean[i] share seed i), else Welch;
* targeted ASR: the fraction of (model, target) pairs with f(x') = y' (§4.2), beside the clean
  models' rate of calling the same x' y' — what chance alone gives;
* backdoor ASR and z-score per trigger and placement: mean/std/CI over models, poisoned and clean.
"""
from __future__ import annotations

import math

from .asr import targeted_asr_over_runs
from .stats import compare_accuracy, compare_accuracy_paired, summarize


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _summary(values, ci: float) -> dict | None:
    vals = _finite(values)
    if not vals:
        return None
    out = summarize(vals, ci=ci)
    out["n_dropped_nan"] = len(list(values)) - len(vals)
    return out


def _targeted_pairs(results: list[dict], key: str | None) -> list[dict]:
    pairs = []
    for m, r in enumerate(results):
        for t in r.get("targeted", []):
            src = t if key is None else t.get(key)
            if src is not None:
                pairs.append({"model": m, "eval_index": t["eval_index"], "label": t["label"],
                              "success": src["success"]})
    return pairs


def _targeted_block(poisoned: list[dict], clean: list[dict], key: str | None, ci: float) -> dict | None:
    p = _targeted_pairs(poisoned, key)
    if not p:
        return None
    targets = {(t["eval_index"], t["label"]) for t in p}
    # The clean baseline: clean models on exactly the (x', y') pairs the poisoned models were attacked with.
    c = [t for t in _targeted_pairs(clean, key) if (t["eval_index"], t["label"]) in targets]
    per_model = {}
    for t in p:
        per_model.setdefault(t["model"], []).append(float(t["success"]))
    return {"poisoned": targeted_asr_over_runs(p),
            "clean_same_x_prime": targeted_asr_over_runs(c) if c else None,
            "per_model_rate": _summary([sum(v) / len(v) for v in per_model.values()], ci)}


def _backdoor_groups(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        for b in r.get("backdoor", []):
            trig = b["trigger"]
            groups.setdefault(f"{b['label']}/{trig['name']}/{trig['patch_size']}", []).append(b)
    return groups


def _backdoor_block(entries: list[dict], placement: str, ci: float) -> dict:
    rows = [e[placement] for e in entries if placement in e]
    out = {"asr": _summary([r.get("asr") for r in rows if "asr" in r], ci),
           "z": _summary([r["z"]["z"] for r in rows if "z" in r], ci)}
    probe = [r["probe"]["asr"] for r in rows if "probe" in r]
    if probe:
        out["probe_asr"] = _summary(probe, ci)
    return out


def summarize_runs(poisoned: list[dict], clean: list[dict] | None = None, ci: float = 0.95,
                   alpha: float = 0.05, paired: bool = False) -> dict:
    """Aggregate per-model evaluation results (see the module docstring). Values that are NaN for
    a model (e.g. an ASR with an empty denominator) are dropped and counted in ``n_dropped_nan``."""
    if not poisoned:
        raise ValueError("summarize_runs needs at least one poisoned model's evaluation result")
    clean = clean or []
    out: dict = {"n_poisoned_models": len(poisoned), "n_clean_models": len(clean), "ci": ci}
    for name, get in (("zeroshot", lambda r: r.get("zeroshot", {}).get("accuracy")),
                      ("probe", lambda r: r.get("probe", {}).get("accuracy"))):
        p, c = _finite(get(r) for r in poisoned), _finite(get(r) for r in clean)
        if not p and not c:
            continue
        test = None
        if p and c:
            test = compare_accuracy_paired(p, c, ci, alpha) if paired else compare_accuracy(p, c, alpha)
        out[name] = {"poisoned": _summary(p, ci), "clean": _summary(c, ci), "poisoned_vs_clean": test}
    for name, key in (("targeted", None), ("targeted_probe", "probe")):
        block = _targeted_block(poisoned, clean, key, ci)
        if block is not None:
            out[name] = block
    pg, cg = _backdoor_groups(poisoned), _backdoor_groups(clean)
    if pg:
        out["backdoor"] = {
            g: {pl: {"poisoned": _backdoor_block(entries, pl, ci),
                     "clean": _backdoor_block(cg[g], pl, ci) if g in cg else None}
                for pl in ("consistent", "random")}
            for g, entries in pg.items()}
    return out
