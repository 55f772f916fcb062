"""Repair a poisoned checkpoint: CleanCLIP (Bansal et al., ICCV 2023).

Fine-tune the checkpoint on clean pairs with

    clip_weight · CLIP loss (originals) + inmodal_weight · in-modal loss (originals vs augmented views),

CleanCLIP's ``get_loss`` with ``--inmodal`` (nishadsinghi/CleanCLIP ``src/train.py``). As there, the
originals and their augmented views go through the model as one concatenated batch of 2B (so a
ModifiedResNet's BatchNorm sees both halves, as CleanCLIP's does), and each caption has one EDA view,
drawn once before training (CleanCLIP's ``MyDataset`` augments every caption at load time), while
images get a fresh AutoAugment draw every step. The in-modal loss and both augmentations are
``defenses/inmodal.py``'s. The trainer is the fast backend's (``train_victim`` with ``init`` = the
checkpoint and this objective), so the recipe, data order, checkpoint format and ``train.json``
are the same as any victim's; the input checkpoint is only read.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import open_clip
import torch

from ..config import REPAIR_LR_DIVISOR, RepairConfig, TrainConfig
from ..data.csvdata import read_csv_dataset
from ..io import UserError, read_json, rng_for
from ..victims.export import CONFIG, WEIGHTS
from ..victims.fast import Objective, TrainContext
from ..victims.train import train_victim
from .inmodal import EDA_ALPHA, EDA_OPS, augment_caption, augment_images, inmodal_loss


class CleanCLIPObjective(Objective):
    """CleanCLIP's loss as a fast-trainer ``Objective``. ``lr_rule`` says how the lr was chosen (recorded)."""

    name = "cleanclip"

    def __init__(self, cfg: RepairConfig, lr_rule: str = "set explicitly"):
        self.cfg, self.lr_rule = cfg, lr_rule
        self.clip_loss = open_clip.ClipLoss()

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        rng = rng_for(self.cfg.seed, "repair/eda")
        self.aug_captions = [augment_caption(c, rng) for c in ctx.captions]
        self.aug_tokens = ctx.tokenizer(self.aug_captions)

    def loss(self, imgs: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        views = self.ctx.normalize(augment_images(self.ctx.pixels[idx]))
        out = self.ctx.forward(torch.cat([imgs, views]), torch.cat([tokens, self.aug_tokens[idx]]))
        return self.split_loss(out["image_features"], out["text_features"], out["logit_scale"])

    def split_loss(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """The loss of a 2B-row forward: rows [0, B) originals, [B, 2B) their augmented views."""
        b = len(image) // 2
        return (self.cfg.clip_weight * self.clip_loss(image[:b], text[:b], logit_scale)
                + self.cfg.inmodal_weight * inmodal_loss(image[:b], image[b:], text[:b], text[b:], logit_scale))

    def info(self) -> dict:
        return {"name": self.name, "method": "CleanCLIP (Bansal et al., ICCV 2023): clip_weight * CLIP loss + "
                "inmodal_weight * in-modal InfoNCE, originals and augmented views in one forward of 2B",
                **asdict(self.cfg), "lr_rule": self.lr_rule,
                "image_augmentation": "torchvision AutoAugment (ImageNet policy), a fresh draw per image and step",
                "text_augmentation": {"method": "EDA (Wei & Zou 2019), one view per caption drawn before training",
                                      "ops": list(EDA_OPS), "alpha": EDA_ALPHA}}


def _recorded_recipe(checkpoint: Path) -> dict:
    """The checkpoint's training recipe from its train.json; {} when it has none."""
    p = checkpoint / "train.json"
    return read_json(p, "checkpoint record").get("recipe", {}) if p.is_file() else {}


def repair(checkpoint, clean_csv, cfg: RepairConfig, out, overwrite: bool = False, progress=None,
           model: str | None = None) -> dict:
    """Fine-tune ``checkpoint`` (a local-dir folder) on ``clean_csv`` with CleanCLIP's loss; writes a
    new local-dir checkpoint at ``out`` and returns its train.json record. ``cfg.lr`` None = the
    checkpoint's recorded lr / ``REPAIR_LR_DIVISOR``; ``model`` names the architecture when the
    checkpoint's train.json does not."""
    ckpt = Path(checkpoint)
    if cfg.clip_weight == 0 and cfg.inmodal_weight == 0:
        raise UserError("--clip-weight and --inmodal-weight are both 0, so there is no loss to repair with; "
                        "give one a weight > 0 (CleanCLIP: 1 and 1)")
    if not ((ckpt / CONFIG).is_file() and (ckpt / WEIGHTS).is_file()):
        raise UserError(f"--checkpoint {ckpt} is not an open_clip local-dir checkpoint ({CONFIG} + {WEIGHTS}); "
                        "pass the folder `clip-poison train` wrote")
    recipe = _recorded_recipe(ckpt)
    model = model or recipe.get("model")
    if not model:
        raise UserError(f"--checkpoint {ckpt} does not record its model name (no train.json recipe.model); "
                        "pass the architecture it was trained as with --model")
    if cfg.lr is not None:
        lr, rule = cfg.lr, "set explicitly"
    elif isinstance(recipe.get("lr"), (int, float)) and recipe["lr"] > 0:
        lr = recipe["lr"] / REPAIR_LR_DIVISOR
        rule = f"1/{REPAIR_LR_DIVISOR} of the checkpoint's lr {recipe['lr']:g}, CleanCLIP's ratio (1e-5 after 5e-4)"
    else:
        raise UserError(f"--checkpoint {ckpt} does not record the lr it was trained with (no train.json recipe.lr), "
                        f"so the default (1/{REPAIR_LR_DIVISOR} of it) is unknown; pass --lr")
    read_csv_dataset(clean_csv)  # a missing or malformed CSV stops here, before the model is built
    cfg = replace(cfg, lr=lr)
    tcfg = TrainConfig(model=model, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr, wd=cfg.wd, warmup=cfg.warmup,
                       seed=cfg.seed, crop_scale=(1.0, 1.0), backend="fast", init=str(ckpt))
    return train_victim(clean_csv, [], tcfg, out, overwrite=overwrite, progress=progress,
                        objective=CleanCLIPObjective(cfg, rule))


__all__ = ["CleanCLIPObjective", "repair"]
