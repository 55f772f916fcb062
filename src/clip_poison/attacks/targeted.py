"""§3.1 multi-sample targeted poisoning: P = {(x', c) : c ∈ caption set}, for one or several
independent targets (x', y') in one poison set (the paper amortises victims this way)."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config import MAX_TARGETED_POISONS, CraftOptions, TargetedConfig
from ..data.captions import normalise_caption
from ..data.evalsets import EvalSet
from ..data.sources import caption_set, open_training_data
from ..io import UserError, rng_for, sha256_pixels
from .evasion import CaptionEvasion, evade_captions, noisy_copies
from .poisonset import check_mode_format, replaced_rows, select_captions, write_poison_set


def _purpose(k: int, what: str) -> str:
    # Target 0 keeps the single-target stream names, so old single-target sets reproduce exactly.
    return f"targeted/{what}" if k == 0 else f"targeted/{k}/{what}"


def choose_target_index(cfg: TargetedConfig, evalset: EvalSet, k: int = 0, taken: frozenset = frozenset()) -> int:
    if cfg.target_label not in evalset.classnames:
        raise UserError(f"target label {cfg.target_label!r} is not a class of the eval set; "
                        f"choose one of {evalset.classnames}")
    y = evalset.classnames.index(cfg.target_label)
    if cfg.target_index is not None:
        if not 0 <= cfg.target_index < len(evalset):
            raise UserError(f"--target-index {cfg.target_index} is outside the eval set (0..{len(evalset) - 1})")
        if evalset.labels[cfg.target_index] == y:
            raise UserError(f"eval image {cfg.target_index} is already a {cfg.target_label!r}; "
                            "a targeted poison needs x' whose true class differs from y'")
        return int(cfg.target_index)
    candidates = np.asarray([i for i in np.flatnonzero(evalset.labels != y) if int(i) not in taken])
    if len(candidates) == 0:
        raise UserError(f"no eval image left for target {k} ({cfg.target_label!r}); use fewer targets")
    return int(rng_for(cfg.seed, _purpose(k, "x_prime")).choice(candidates))


def craft_targeted_poisons(cfg: TargetedConfig, train, evalset: EvalSet, out: str | Path, overwrite: bool = False,
                           options: CraftOptions | None = None) -> dict:
    """Write ``cfg.n_poisons`` copies of x' (each with its own tiny Gaussian noise, so exact-match
    dedup keeps them all) paired with captions about y'. Returns the manifest."""
    return craft_multi_targeted_poisons([cfg], train, evalset, out, overwrite=overwrite, options=options)


def craft_multi_targeted_poisons(cfgs: list[TargetedConfig], train, evalset: EvalSet, out: str | Path,
                                 overwrite: bool = False, options: CraftOptions | None = None) -> dict:
    """Several independent targets (x'_k, y'_k) in one poison set. Targets may share neither an
    image nor a label (their poisons would otherwise pull one x' towards two labels, or one label
    towards two images, and the per-target success would not be independent). Each poison's
    ``target_id`` names its target in the manifest's ``targets`` list."""
    opt = options or CraftOptions()
    if not cfgs:
        raise UserError("no targets given; pass at least one --label")
    check_mode_format(opt.mode, opt.format)
    ev = CaptionEvasion(opt.caption_substitution, opt.filler_words)
    ev.validate()
    for cfg in cfgs:
        if not 1 <= cfg.n_poisons <= MAX_TARGETED_POISONS:
            raise UserError(f"--n-poisons must be in 1..{MAX_TARGETED_POISONS:,}, got {cfg.n_poisons} (the paper "
                            "uses 1..512; the copies of x' are built in memory); lower --n-poisons")
        if not 0 <= cfg.noise_sigma < math.inf:  # also refuses NaN, which would write NaN images
            raise UserError(f"--noise-sigma must be a finite number >= 0, got {cfg.noise_sigma}")
    labels = [c.target_label for c in cfgs]
    if len(set(labels)) != len(labels):
        raise UserError(f"targets share a label ({labels}); each target of one poison set needs its own y' "
                        "(make a second poison set for a second image of the same label)")
    train = open_training_data(train)
    fmt = opt.format or train.kind
    idxs: list[int] = []
    for k, cfg in enumerate(cfgs):
        idxs.append(choose_target_index(cfg, evalset, k, frozenset(idxs)))
    hashes = [sha256_pixels(evalset.images[i]) for i in idxs]
    if len(set(hashes)) != len(hashes):
        raise UserError(f"targets share an image (eval indices {idxs} hold identical pixels); "
                        "give each target its own --target-index")
    images, captions, records, targets = [], [], [], []
    taken_pixels: set[str] = set()
    for k, (cfg, idx) in enumerate(zip(cfgs, idxs)):
        pool = caption_set(cfg.caption_source, cfg.target_label, train, opt.synonyms, opt.caption_index)
        caps = select_captions(pool, cfg.n_poisons, rng_for(cfg.seed, _purpose(k, "captions")), opt.allow_repeat)
        caps, edits = evade_captions(caps, cfg.target_label, opt.synonyms, ev, rng_for(cfg.seed, _purpose(k, "caption_evasion")),
                                     avoid={normalise_caption(c) for c in pool})
        x_prime = evalset.images[idx]
        copies = noisy_copies(x_prime, cfg.n_poisons, cfg.noise_sigma, rng_for(cfg.seed, _purpose(k, "noise")), taken_pixels)
        for img, cap, ed in zip(copies, caps, edits):
            images.append(img)
            captions.append(cap)
            records.append({"attack": "targeted", "target_id": k, "target_label": cfg.target_label, "eval_index": idx,
                            "noise_sigma": cfg.noise_sigma, **({"caption_edits": ed} if ev.active else {})})
        targets.append({"target_id": k, "label": cfg.target_label, "eval_root": evalset.source, "eval_index": idx,
                        "eval_key": evalset.keys[idx] if evalset.keys else None,
                        "true_label": evalset.classnames[int(evalset.labels[idx])],
                        "image_sha256": hashes[k], "n_poisons": cfg.n_poisons,
                        "caption_set": {"source": cfg.caption_source, "size": len(pool),
                                        "repeated": cfg.n_poisons > len(pool)}})
    n_rows = len(train)
    header = {
        "attack": "targeted",
        "config": asdict(cfgs[0]) if len(cfgs) == 1 else [asdict(c) for c in cfgs],
        "options": asdict(opt),
        "seed": cfgs[0].seed,
        "source": train.describe(),
        "targets": targets,
        "evasion": {"noise_sigma": [c.noise_sigma for c in cfgs], "caption": asdict(ev)},
        "caption_set": targets[0]["caption_set"],
    }
    if len(cfgs) == 1:
        header["target"] = targets[0]  # single-target manifests keep the original shape
    replaces = replaced_rows(opt.mode, n_rows, len(images), cfgs[0].seed)
    return write_poison_set(out, images, captions, records, header, overwrite=overwrite, fmt=fmt,
                            mode=opt.mode, replaces=replaces)
