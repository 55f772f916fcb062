"""§3.1 multi-sample targeted poisoning: P = {(x', c) : c ∈ caption set}."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config import TargetedConfig
from ..data.captions import mine_captions, template_captions
from ..data.csvdata import CsvDataset
from ..data.evalsets import EvalSet
from ..io import UserError, rng_for, sha256_file, sha256_pixels
from .poisonset import select_captions, write_poison_set


def caption_set(source: str, label: str, train: CsvDataset) -> list[str]:
    if source == "mined":
        pool = [train.captions[i] for i in mine_captions(train.captions, label)]
        if not pool:
            raise UserError(f"no training caption contains the label {label!r} as a whole word, so the "
                            "mined caption set is empty; pick a label that occurs in the captions or "
                            "use --caption-source templates")
        return pool
    if source == "templates":
        return template_captions(label)
    raise UserError(f"unknown caption source {source!r}; use 'mined' or 'templates'")


def choose_target_index(cfg: TargetedConfig, evalset: EvalSet) -> int:
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
    candidates = np.flatnonzero(evalset.labels != y)
    return int(rng_for(cfg.seed, "targeted/x_prime").choice(candidates))


def craft_targeted_poisons(cfg: TargetedConfig, train: CsvDataset, evalset: EvalSet, out: str | Path,
                           overwrite: bool = False) -> dict:
    """Write ``cfg.n_poisons`` copies of x' (each with its own tiny Gaussian noise, so exact-match
    dedup keeps them all) paired with captions about y'. Returns the manifest."""
    if cfg.n_poisons < 1:
        raise UserError(f"--n-poisons must be >= 1, got {cfg.n_poisons}")
    if cfg.noise_sigma < 0:
        raise UserError(f"--noise-sigma must be >= 0, got {cfg.noise_sigma}")
    idx = choose_target_index(cfg, evalset)
    pool = caption_set(cfg.caption_source, cfg.target_label, train)
    captions = select_captions(pool, cfg.n_poisons, rng_for(cfg.seed, "targeted/captions"))
    x_prime = evalset.images[idx]
    noise_rng = rng_for(cfg.seed, "targeted/noise")
    images, records = [], []
    for _ in range(cfg.n_poisons):
        noisy = x_prime.astype(np.float64) + noise_rng.normal(0.0, cfg.noise_sigma, x_prime.shape)
        images.append(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
        records.append({"attack": "targeted", "target_label": cfg.target_label, "eval_index": idx,
                        "noise_sigma": cfg.noise_sigma})
    header = {
        "attack": "targeted",
        "config": asdict(cfg),
        "seed": cfg.seed,
        "source": {"csv": str(train.csv_path), "csv_sha256": sha256_file(train.csv_path), "n_rows": len(train)},
        "target": {"label": cfg.target_label, "eval_root": evalset.source, "eval_index": idx,
                   "eval_key": evalset.keys[idx] if evalset.keys else None,
                   "true_label": evalset.classnames[int(evalset.labels[idx])],
                   "image_sha256": sha256_pixels(x_prime)},
        "caption_set": {"source": cfg.caption_source, "size": len(pool), "repeated": cfg.n_poisons > len(pool)},
    }
    return write_poison_set(out, images, captions, records, header, overwrite=overwrite)
