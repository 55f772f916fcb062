"""§3.3 patch backdoor: P = {(x_i ⊕ bd, c_i)}, x_i clean training images, c_i about y'."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..config import BackdoorConfig
from ..data.csvdata import CsvDataset
from ..io import UserError, rng_for, sha256_file
from .poisonset import resize_to_input, select_captions, write_poison_set
from .targeted import caption_set
from .triggers import apply_trigger, make_trigger, trigger_position


def craft_backdoor_poisons(cfg: BackdoorConfig, train: CsvDataset, image_size: int, out: str | Path,
                           overwrite: bool = False) -> dict:
    """Stamp the trigger on ``cfg.n_poisons`` distinct training images (resized to the model's
    ``image_size`` first) and pair each with a caption mined from the training data for y'
    (§3.3: only captions found in the training set, no knowledge of zero-shot prompts)."""
    if cfg.n_poisons < 1:
        raise UserError(f"--n-poisons must be >= 1, got {cfg.n_poisons}")
    if cfg.n_poisons > len(train):
        raise UserError(f"--n-poisons {cfg.n_poisons} exceeds the {len(train)} training images to stamp; "
                        "lower it")
    patch = make_trigger(cfg.trigger, cfg.patch_size)
    trigger_position((image_size, image_size), cfg.patch_size, cfg.placement,
                     rng_for(cfg.seed, "backdoor/check"))  # validates size and placement up front
    pool = caption_set("mined", cfg.target_label, train)
    captions = select_captions(pool, cfg.n_poisons, rng_for(cfg.seed, "backdoor/captions"))
    base = rng_for(cfg.seed, "backdoor/base_images").choice(len(train), size=cfg.n_poisons, replace=False)
    pos_rng = rng_for(cfg.seed, "backdoor/placement")
    images, records = [], []
    for i in base:
        img = resize_to_input(train.load(int(i)), image_size)
        pos = trigger_position(img.shape, cfg.patch_size, cfg.placement, pos_rng)
        images.append(apply_trigger(img, patch, pos))
        records.append({"attack": "backdoor", "target_label": cfg.target_label, "base_index": int(i),
                        "base_file": Path(train.paths[int(i)]).name, "position": list(pos)})
    header = {
        "attack": "backdoor",
        "config": asdict(cfg),
        "seed": cfg.seed,
        "source": {"csv": str(train.csv_path), "csv_sha256": sha256_file(train.csv_path), "n_rows": len(train)},
        "target": {"label": cfg.target_label},
        "trigger": {"name": cfg.trigger, "patch_size": cfg.patch_size, "placement": cfg.placement,
                    "image_size": image_size},
        "caption_set": {"source": "mined", "size": len(pool), "repeated": cfg.n_poisons > len(pool)},
    }
    return write_poison_set(out, images, captions, records, header, overwrite=overwrite)
