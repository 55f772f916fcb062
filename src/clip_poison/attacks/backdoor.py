"""§3.3 backdoor: P = {(x_i ⊕ bd, c_i)}, x_i clean images (from X, or a held-out pool),
c_i captions mined from the training data for y'; bd the paper's patch or a full-image trigger
(``attacks/triggers.py``)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..config import BackdoorConfig, CraftOptions
from ..data.captions import normalise_caption
from ..data.sources import caption_set, open_training_data
from ..io import UserError, resize_to_input, rng_for
from .evasion import CaptionEvasion, evade_captions
from .poisonset import check_mode_format, replaced_rows, select_captions, write_poison_set
from .triggers import get_trigger


def craft_backdoor_poisons(cfg: BackdoorConfig, train, image_size: int, out: str | Path,
                           overwrite: bool = False, options: CraftOptions | None = None) -> dict:
    """Stamp the trigger on ``cfg.n_poisons`` distinct base images (resized to the model's
    ``image_size`` first; a full-image trigger ignores ``cfg.patch_size``) and pair each with a caption mined from the training data for y'
    (§3.3: only captions found in the training set, no knowledge of zero-shot prompts).

    ``train`` is a CSV path, webdataset spec, ``CsvDataset`` or opened training data; only the
    chosen base images are decoded, so a 3M-row dataset costs one caption scan."""
    opt = options or CraftOptions()
    check_mode_format(opt.mode, opt.format)
    ev = CaptionEvasion(opt.caption_substitution, opt.filler_words)
    ev.validate()
    if cfg.n_poisons < 1:
        raise UserError(f"--n-poisons must be >= 1, got {cfg.n_poisons}")
    trigger = get_trigger(cfg.trigger, cfg.patch_size, image_size)
    trigger.position((image_size, image_size), cfg.placement,
                     rng_for(cfg.seed, "backdoor/check"))  # validates size and placement up front
    train = open_training_data(train)
    fmt = opt.format or train.kind
    bases = open_training_data(opt.base_pool) if opt.base_pool else train
    if cfg.n_poisons > len(bases):
        raise UserError(f"--n-poisons {cfg.n_poisons} exceeds the {len(bases)} "
                        f"{'--base-pool' if opt.base_pool else 'training'} images to stamp; lower it")
    pool = caption_set("mined", cfg.target_label, train, opt.synonyms, opt.caption_index, has_templates=False)
    captions = select_captions(pool, cfg.n_poisons, rng_for(cfg.seed, "backdoor/captions"), opt.allow_repeat)
    captions, edits = evade_captions(captions, cfg.target_label, opt.synonyms, ev, rng_for(cfg.seed, "backdoor/caption_evasion"),
                                     avoid={normalise_caption(c) for c in pool})
    base = rng_for(cfg.seed, "backdoor/base_images").choice(len(bases), size=cfg.n_poisons, replace=False)
    loaded = bases.load_rows(base)
    pos_rng = rng_for(cfg.seed, "backdoor/placement")
    images, records = [], []
    for i, ed in zip(base, edits):
        img = resize_to_input(loaded[int(i)], image_size)
        pos = trigger.position(img.shape, cfg.placement, pos_rng)
        images.append(trigger.stamp(img, pos))
        records.append({"attack": "backdoor", "target_label": cfg.target_label, "base_index": int(i),
                        "base_source": "pool" if opt.base_pool else "train",
                        "base_file": bases.ref(int(i)), "position": list(pos),
                        **({"caption_edits": ed} if ev.active else {})})
    header = {
        "attack": "backdoor",
        "config": asdict(cfg),
        "options": asdict(opt),
        "seed": cfg.seed,
        "source": train.describe(),
        "base_pool": bases.describe() if opt.base_pool else None,
        "target": {"label": cfg.target_label},
        "trigger": trigger.entry(cfg.placement, image_size),
        "evasion": {"caption": asdict(ev)},
        "caption_set": {"source": "mined", "size": len(pool), "repeated": cfg.n_poisons > len(pool)},
    }
    replaces = replaced_rows(opt.mode, len(train), cfg.n_poisons, cfg.seed)
    return write_poison_set(out, images, captions, records, header, overwrite=overwrite, fmt=fmt,
                            mode=opt.mode, replaces=replaces)
