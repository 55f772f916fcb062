"""§2.3 text-side poisoning: P = {(x_i, t')}, one caption t' paired with many images x_i of a
concept y', so that the text encoder maps t' near y' (the mirror image of §3.1, which moves one
image towards a label). The x_i are training images whose caption mentions y' (mined, §3.1)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..config import CraftOptions, TextConfig
from ..data.captions import label_pattern
from ..data.sources import mined_rows, open_training_data
from ..io import UserError, rng_for
from .evasion import CaptionEvasion, evade_captions
from .poisonset import check_mode_format, replaced_rows, write_poison_set


def craft_text_poisons(cfg: TextConfig, train, out: str | Path, overwrite: bool = False,
                       options: CraftOptions | None = None) -> dict:
    """Pair ``cfg.caption`` (t') with ``cfg.n_poisons`` distinct training images whose caption
    mentions ``cfg.target_label`` (y'), chosen seeded. Returns the manifest."""
    opt = options or CraftOptions()
    check_mode_format(opt.mode, opt.format)
    ev = CaptionEvasion(opt.caption_substitution, opt.filler_words)
    ev.validate()
    if not cfg.caption.strip():
        raise UserError("the target caption t' is empty; pass --caption 'a photo of my backyard'")
    if cfg.n_poisons < 1:
        raise UserError(f"--n-poisons must be >= 1, got {cfg.n_poisons}")
    if label_pattern(cfg.target_label, opt.synonyms).search(cfg.caption):
        raise UserError(f"the target caption {cfg.caption!r} already names {cfg.target_label!r}; text poisoning "
                        "moves a caption that does not mention y', so pick another --caption")
    train = open_training_data(train)
    fmt = opt.format or train.kind
    rows = mined_rows(train, cfg.target_label, opt.synonyms, opt.caption_index)
    if len(rows) == 0:
        raise UserError(f"no training caption contains {cfg.target_label!r} as a whole word, so there are no "
                        "images of y' to pair with t'; pick a label that occurs in the captions or add --synonyms")
    if cfg.n_poisons > len(rows):
        raise UserError(f"--n-poisons {cfg.n_poisons} exceeds the {len(rows)} training images whose caption "
                        f"mentions {cfg.target_label!r} (each image is used once); lower --n-poisons or add --synonyms")
    chosen = sorted(int(r) for r in rng_for(cfg.seed, "text/images").choice(rows, size=cfg.n_poisons, replace=False))
    loaded = train.load_rows(chosen)
    captions, edits = evade_captions([cfg.caption] * len(chosen), cfg.target_label, opt.synonyms, ev,
                                     rng_for(cfg.seed, "text/caption_evasion"))
    images, records = [], []
    for r, ed in zip(chosen, edits):
        images.append(loaded[r])
        records.append({"attack": "text", "target_label": cfg.target_label, "base_index": r,
                        "base_file": train.ref(r), **({"caption_edits": ed} if ev.active else {})})
    header = {
        "attack": "text",
        "config": asdict(cfg),
        "options": asdict(opt),
        "seed": cfg.seed,
        "source": train.describe(),
        "target": {"label": cfg.target_label, "caption": cfg.caption},
        "evasion": {"caption": asdict(ev)},
        "image_set": {"source": "mined", "size": len(rows)},
    }
    replaces = replaced_rows(opt.mode, len(train), cfg.n_poisons, cfg.seed)
    return write_poison_set(out, images, captions, records, header, overwrite=overwrite, fmt=fmt,
                            mode=opt.mode, replaces=replaces)
