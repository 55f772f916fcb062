"""Evaluate one checkpoint on one labelled eval set against the poison sets that describe attacks.

Everything attack-specific (x', y', trigger, patch size) is read from each poison set's
``manifest.json``; nothing is passed by convention. A clean model is evaluated with the same
manifests, so its numbers are the baseline on exactly the same inputs.

Metrics (any subset, ``metrics=``): ``zeroshot`` accuracy (§4.1), ``probe`` — a linear probe fit
on frozen embeddings of a separate labelled set, its accuracy and the targeted and backdoor
success under it (§4.2) —, ``targeted`` success f(x') = y' (§4.2), ``backdoor`` ASR with the
trigger at the upper-left and at random positions (§4.3; a full-image trigger: as is and randomly
shifted), ``zscore`` (§5.1, Definition 1) and ``fig3``, the data of Figure 3. Embeddings are
computed once per (weights, eval set, trigger, placement, seed) and cached on disk (``metrics/embed.py``).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..io import check_stamped_size
from ..attacks.triggers import load_trigger
from ..config import FIG3_MAX_PAIRS
from ..data.evalsets import EvalSet, evalset_identity
from ..io import UserError, package_versions, read_json, rng_for, sha256_file, sha256_pixels
from ..victims.device import device_fingerprint, train_device
from ..victims.export import CONFIG, WEIGHTS, load_victim
from . import text_attack
from .asr import backdoor_asr, targeted_success
from .embed import EmbeddingCache, cache_key, embed_images
from .probe import evaluate_linear_probe, fit_linear_probe
from .similarity import FIG3_RANGE, similarity_histograms, similarity_vs_same_prediction
from .zeroshot import zero_shot_accuracy, zero_shot_predict, zero_shot_weights
from .zscore import backdoor_z_score

EVAL_PLACEMENTS = ("consistent", "random")
METRICS = ("zeroshot", "probe", "targeted", "backdoor", "zscore", "fig3")
DEFAULT_METRICS = ("zeroshot", "targeted", "backdoor", "zscore")
CACHE_SUBDIR = "embeddings"


def resolve_metrics(metrics, probe_train: EvalSet | None) -> tuple[str, ...]:
    """The metrics to compute, validated: None = the defaults (plus ``probe`` with a probe set)."""
    if metrics is None:
        chosen = DEFAULT_METRICS + (("probe",) if probe_train is not None else ())
    else:
        chosen = tuple(m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip())
        bad = [m for m in chosen if m not in METRICS]
        if bad or not chosen:
            raise UserError(f"unknown metric(s) {bad or chosen}; choose from {','.join(METRICS)}")
    if "probe" in chosen and probe_train is None:
        raise UserError("the probe metric needs a labelled set to fit the linear probe on: pass --probe-train "
                        "(a labelled train split, or a synthetic world folder to render one)")
    return tuple(m for m in METRICS if m in chosen)


def _label_index(evalset: EvalSet, label: str) -> int:
    if label not in evalset.classnames:
        raise UserError(f"the attack's target label {label!r} is not a class of this eval set "
                        f"({evalset.classnames}); evaluate on the eval set the poisons were made for")
    return evalset.classnames.index(label)


def evaluate_checkpoint(ckpt_dir: str | Path, evalset: EvalSet, manifests: list[dict], seed: int = 0,
                        cache_dir: str | Path | None | bool = None, metrics=None,
                        probe_train: EvalSet | None = None, fig3_max_pairs: int | None = FIG3_MAX_PAIRS) -> dict:
    """Zero-shot accuracy, linear-probe accuracy, targeted success, backdoor ASR (consistent and
    random test placement), the backdoor z-score and Figure 3's data, as one plain dict.

    ``metrics``: a subset of ``METRICS`` (list or comma string); None = ``DEFAULT_METRICS`` plus
    ``probe`` when ``probe_train`` is given. ``probe_train``: a labelled set, disjoint from
    ``evalset``, whose frozen embeddings train the §4.2 linear probe. ``cache_dir``: where
    embeddings are cached; None = ``CKPT/embeddings``, False = no cache. ``fig3_max_pairs``:
    pairs sampled for Figure 3 (None = all; the z-score is always exact); its bins span ``FIG3_RANGE``.
    """
    t0 = time.time()
    chosen = resolve_metrics(metrics, probe_train)
    torch.manual_seed(seed)
    device = train_device()  # the victim is evaluated where victims train: the GPU when there is one
    model, preprocess, tokenizer = load_victim(ckpt_dir, device=device)
    device = device_fingerprint(device)  # "cpu", or the GPU's name and TF32 flags (its rounding)
    weights_hash = sha256_file(Path(ckpt_dir) / WEIGHTS)
    pre_cfg = read_json(Path(ckpt_dir) / CONFIG, what="checkpoint config").get("preprocess_cfg")
    size = model.visual.image_size
    image_size = int(size if isinstance(size, int) else size[0])
    if cache_dir is None or cache_dir is True:
        cache_dir = Path(ckpt_dir) / CACHE_SUBDIR
    cache = EmbeddingCache(cache_dir or None)
    ev_id = evalset_identity(evalset)

    def embed(ev: EvalSet, ev_key: dict, trigger=None, placement: str | None = None, pos=None) -> np.ndarray:
        return cache.get(cache_key(weights_hash, ev_key, trigger, placement, seed, pre_cfg, device),
                         lambda: embed_images(model, preprocess, ev.images, trigger, pos))

    w = zero_shot_weights(model, tokenizer, evalset.classnames, evalset.templates)
    clean_emb = embed(evalset, ev_id)
    preds = zero_shot_predict(clean_emb, w)
    out: dict = {"metrics": list(chosen), "targeted": [], "backdoor": [], "text": []}
    if "zeroshot" in chosen:
        out["zeroshot"] = zero_shot_accuracy(preds, evalset.labels)
    probe = probe_preds = None
    if "probe" in chosen:
        pt_id = evalset_identity(probe_train)
        if pt_id == ev_id:
            raise UserError("the probe's training set is the eval set itself; fit it on a disjoint labelled split "
                            "(e.g. --probe-train ROOT --probe-split train)")
        if list(probe_train.classnames) != list(evalset.classnames):
            raise UserError(f"the probe set's classes {probe_train.classnames[:5]}... differ from the eval set's "
                            f"{evalset.classnames[:5]}...; use a train split of the same dataset")
        probe = fit_linear_probe(embed(probe_train, pt_id), probe_train.labels, seed)
        probe_preds = probe.predict(clean_emb)
        out["probe"] = {**evaluate_linear_probe(probe, clean_emb, evalset.labels), "n_train": probe.n_train,
                        "train_set": pt_id}

    for m in manifests:
        if m["attack"] == "targeted":
            if "targeted" not in chosen and "probe" not in chosen:
                continue
            # A multi-target set lists its targets; each is scored on its own (x'_k, y'_k).
            for tg in m.get("targets") or [m["target"]]:
                target = _label_index(evalset, tg["label"])
                idx = int(tg["eval_index"])
                if idx >= len(evalset) or sha256_pixels(evalset.images[idx]) != tg["image_sha256"]:
                    raise UserError("the eval set's image at the manifest's eval_index is not the poisoned x' "
                                    "(hash differs); evaluate on the eval set the poisons were made from")
                entry = {"eval_index": idx, "label": tg["label"], "target_id": tg.get("target_id", 0),
                         **targeted_success(preds[idx], target)}
                if probe is not None:
                    entry["probe"] = targeted_success(probe_preds[idx], target)
                out["targeted"].append(entry)
            continue
        target = _label_index(evalset, m["target"]["label"])
        if m["attack"] == "text":
            # §2.3: where does the poisoned caption t' land among the eval images and class centroids?
            with torch.no_grad():
                g = model.encode_text(tokenizer([m["target"]["caption"]]).to(next(model.parameters()).device),
                                      normalize=True)[0].float().cpu().numpy()
            out["text"].append({"label": m["target"]["label"], "caption": m["target"]["caption"],
                                **text_attack.evaluate(g, clean_emb, evalset.labels, target)})
        elif m["attack"] == "backdoor":
            if not {"backdoor", "zscore", "fig3", "probe"} & set(chosen):
                continue
            check_stamped_size(m, image_size, f"(target {m['target']['label']!r})")
            trigger = load_trigger(m["trigger"], image_size)
            res = {"label": m["target"]["label"], "trigger": m["trigger"]}
            for placement in EVAL_PLACEMENTS:
                rng = rng_for(seed, f"eval/{placement}")
                # Positions (or full-image shifts) on the model-input-size image: it is stamped after resizing.
                pos = [trigger.position((image_size, image_size), placement, rng) for _ in evalset.images]
                emb = embed(evalset, ev_id, trigger, placement, pos)
                r: dict = {}
                if "backdoor" in chosen:
                    r.update(backdoor_asr(zero_shot_predict(emb, w), evalset.labels, target))
                if probe is not None:
                    r["probe"] = backdoor_asr(probe.predict(emb), evalset.labels, target)
                if "zscore" in chosen:
                    r["z"] = backdoor_z_score(clean_emb, emb)
                if "fig3" in chosen and placement == "consistent":
                    res["fig3_histograms"] = similarity_histograms(clean_emb, emb, max_pairs=fig3_max_pairs,
                                                                   seed=seed, value_range=FIG3_RANGE)
                res[placement] = r
            out["backdoor"].append(res)
        else:
            raise UserError(f"unknown attack {m['attack']!r} in a manifest")
    if "fig3" in chosen:
        out["fig3"] = {"similarity_vs_same_prediction": similarity_vs_same_prediction(
            clean_emb, preds, max_pairs=fig3_max_pairs, seed=seed, value_range=FIG3_RANGE)}
    out["embedding_cache"] = {"dir": str(cache_dir) if cache_dir else None, "hits": cache.hits,
                              "misses": cache.misses}
    out["eval_set"] = ev_id
    out["checkpoint"] = str(ckpt_dir)
    out["device"] = device
    out["seconds"] = round(time.time() - t0, 2)
    out["versions"] = package_versions()
    return out


__all__ = ["evaluate_checkpoint", "resolve_metrics", "METRICS", "DEFAULT_METRICS"]
