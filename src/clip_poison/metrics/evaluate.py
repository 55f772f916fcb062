"""Evaluate one checkpoint on one labelled eval set against the poison sets that describe attacks.

Everything attack-specific (x', y', trigger, patch size) is read from each poison set's
``manifest.json``; nothing is passed by convention. A clean model is evaluated with the same
manifests, so its numbers are the baseline on exactly the same inputs.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..attacks.triggers import make_trigger, trigger_position
from ..data.evalsets import EvalSet, load_wds_evalset
from ..io import UserError, package_versions, rng_for, sha256_file, sha256_pixels
from ..victims.export import WEIGHTS, load_victim
from .asr import backdoor_asr, targeted_success
from .embed import EmbeddingCache, embed_images
from .zeroshot import zero_shot_accuracy, zero_shot_predict, zero_shot_weights
from .zscore import backdoor_z_score

EVAL_PLACEMENTS = ("consistent", "random")


def _label_index(evalset: EvalSet, label: str) -> int:
    if label not in evalset.classnames:
        raise UserError(f"the attack's target label {label!r} is not a class of this eval set "
                        f"({evalset.classnames}); evaluate on the eval set the poisons were made for")
    return evalset.classnames.index(label)


def evaluate_checkpoint(ckpt_dir: str | Path, evalset: EvalSet, manifests: list[dict], seed: int = 0,
                        cache_dir: str | Path | None = None) -> dict:
    """Zero-shot accuracy, targeted success, backdoor ASR (consistent and random test placement)
    and the backdoor z-score, as one plain dict."""
    t0 = time.time()
    torch.manual_seed(seed)
    model, preprocess, tokenizer = load_victim(ckpt_dir)
    weights_hash = sha256_file(Path(ckpt_dir) / WEIGHTS)
    size = model.visual.image_size
    image_size = int(size if isinstance(size, int) else size[0])
    cache = EmbeddingCache(cache_dir)
    base_key = {"weights": weights_hash, "eval": evalset.source, "n": len(evalset)}

    w = zero_shot_weights(model, tokenizer, evalset.classnames, evalset.templates)
    clean_emb = cache.get({**base_key, "trigger": None}, lambda: embed_images(model, preprocess, evalset.images))
    preds = zero_shot_predict(clean_emb, w)
    out: dict = {"zeroshot": zero_shot_accuracy(preds, evalset.labels), "targeted": [], "backdoor": []}

    for m in manifests:
        target = _label_index(evalset, m["target"]["label"])
        if m["attack"] == "targeted":
            idx = int(m["target"]["eval_index"])
            if idx >= len(evalset) or sha256_pixels(evalset.images[idx]) != m["target"]["image_sha256"]:
                raise UserError("the eval set's image at the manifest's eval_index is not the poisoned x' "
                                "(hash differs); evaluate on the eval set the poisons were made from")
            out["targeted"].append({"eval_index": idx, "label": m["target"]["label"],
                                    **targeted_success(preds[idx], target)})
        elif m["attack"] == "backdoor":
            trig = m["trigger"]
            patch = make_trigger(trig["name"], trig["patch_size"])
            res = {"label": m["target"]["label"], "trigger": trig}
            for placement in EVAL_PLACEMENTS:
                rng = rng_for(seed, f"eval/{placement}")
                # Positions on the model-input-size image (the trigger goes on after resizing).
                pos = [trigger_position((image_size, image_size), trig["patch_size"], placement, rng)
                       for _ in evalset.images]
                emb = cache.get({**base_key, "trigger": trig["name"], "size": trig["patch_size"],
                                 "placement": placement, "seed": seed},
                                lambda: embed_images(model, preprocess, evalset.images, patch, pos))
                res[placement] = {**backdoor_asr(zero_shot_predict(emb, w), evalset.labels, target),
                                  "z": backdoor_z_score(clean_emb, emb)}
            out["backdoor"].append(res)
        else:
            raise UserError(f"unknown attack {m['attack']!r} in a manifest")
    out["checkpoint"] = str(ckpt_dir)
    out["seconds"] = round(time.time() - t0, 2)
    out["versions"] = package_versions()
    return out


def load_evalset(root: str | Path, split: str = "test", max_n: int | None = None) -> EvalSet:
    return load_wds_evalset(root, split, max_n)


__all__ = ["evaluate_checkpoint", "load_evalset", "np"]
