"""Robust training: SafeCLIP (Yang, Gao & Mirzasoleiman, "Better Safe than Sorry: Pre-training CLIP
against Targeted Data Poisoning and Backdoor Attacks", ICML 2024, PMLR 235, arXiv:2310.05862), as a
``victims.fast.Objective`` for the fast backend.

The algorithm and its defaults are the authors' code, github.com/BigML-CS-UCLA/SafeCLIP
(``SafeCLIP/src/main.py`` worker loop, ``src/train.py`` get_loss, ``src/samplers.py``
fit_gmm_to_cos_sim, ``src/parser.py`` defaults), which the paper's abstract summarises as "warms up
the model by applying unimodal CL on image and text modalities separately. Then, it divides the data
into safe and risky sets, by applying a Gaussian Mixture Model to the cosine similarity of
image-caption pair representations ... applying the CLIP loss to the safe set and applying unimodal
CL to image and text modalities of the risky set separately ... gradually increasing the size of the
safe set":

1. In-modal warm-up, ``INMODAL_WARMUP_EPOCHS`` (``--inmodal_warmup 5``): every pair trains on the
   in-modal loss alone (``inmodal.inmodal_loss``: each image's view must pick its other view among the
   batch's, each caption likewise).
2. Cross-modal warm-up, ``CROSSMODAL_WARMUP_EPOCHS`` (``--multimodal_warmup 1``): the CLIP loss on
   every pair at ``CROSSMODAL_WARMUP_LR_SCALE`` of the learning rate (``--filter_lr 5e-6`` against
   ``--in_lr``/``--cross_lr 5e-4``), so the towers are only slightly aligned before the first split.
3. Every later epoch: every pair embedded under no_grad, the cosine of image and caption, a
   2-component GMM fitted to the cosines (``detectors.gmm_split``: the posterior of the higher-mean
   component, as fit_gmm_to_cos_sim). The first split's safe set is every pair with posterior >=
   ``FIRST_SPLIT_POSTERIOR``; its fraction r becomes min(r + ``SAFE_FRACTION_STEP``,
   ``SAFE_FRACTION_CAP``) (``--update_filter_ratio 0.01``, ``--cap_filter_ratio 0.85``), and each later
   split keeps the top ⌊r·N⌋ pairs by posterior as safe and grows r the same way. Safe pairs get the
   CLIP loss, risky pairs the in-modal loss.

Every loss is on augmented views, as SafeCLIP trains (``--cross_aug``, on by default): two
AutoAugment views of each image drawn every step, two EDA views of each caption drawn once per run
(its ``ImageCaptionDataset`` makes ``augment_captions`` and ``augment_captions_2`` when it loads);
the CLIP loss pairs view 1 of one modality with view 2 of the other. Its code computes CE(image 1 →
captions 2) and CE(caption 1 → images 2); here that is open_clip's symmetric ``ClipLoss`` on (image 1,
caption 2) and (image 2, caption 1), averaged: the same loss in expectation (the views are drawn
alike). The trainer's ``imgs``, ``tokens`` and train crop are therefore not used.

Where this differs from SafeCLIP's code, because the fast trainer has one loader and one schedule:
- One batch holds both sets: a step's safe rows get the CLIP loss and its risky rows the in-modal
  loss, each weighted by its share of the batch, where SafeCLIP runs an in-modal pass over the risky
  set and then a CLIP pass over the safe set with batches of their own. Each pair's loss counts once
  per epoch either way; the CLIP loss here sees fewer negatives (the batch's safe rows only). A set
  with fewer than 2 rows in a batch adds nothing (a 1-row contrastive loss is 0).
- The learning rate follows the run's one cosine schedule (``TrainConfig.lr``, ``warmup``);
  SafeCLIP restarts cosine schedules after its warm-ups. Its low-rate cross-modal epoch is kept, as a
  factor on the scheduled rate (``Objective.lr_scale``) instead of a constant 5e-6.
- The split's cosines are of the un-augmented pairs (the paper's "image-caption pair
  representations"); SafeCLIP's code embeds its training views (one AutoAugment draw, the first EDA
  caption) because it reuses the training dataset.
- No nearest-neighbour memory bank (``--memory_bank``: NNCLR positives in the in-modal loss, off by
  default in its parser, on in its README's command).
- EDA uses ``inmodal.EDA_OPS`` (swap and deletion; WordNet's two operations need a download).
- The run must be longer than the warm-ups (``MIN_EPOCHS``); SafeCLIP's default is 32 epochs.
"""
from __future__ import annotations

import numpy as np
import open_clip
import torch

from ..config import TrainConfig
from ..io import UserError, rng_for
from ..victims.fast import Objective, TrainContext
from .detectors import gmm_split
from .inmodal import EDA_OPS, augment_caption, augment_images, inmodal_loss

PAPER = ("Yang, Gao & Mirzasoleiman, Better Safe than Sorry: Pre-training CLIP against Targeted Data Poisoning "
         "and Backdoor Attacks, ICML 2024 (arXiv:2310.05862)")
CODE = "https://github.com/BigML-CS-UCLA/SafeCLIP (SafeCLIP/src/main.py, train.py, samplers.py, parser.py)"
INMODAL_WARMUP_EPOCHS = 5  # parser.py --inmodal_warmup
CROSSMODAL_WARMUP_EPOCHS = 1  # parser.py --multimodal_warmup
CROSSMODAL_WARMUP_LR_SCALE = 5e-6 / 5e-4  # parser.py --filter_lr over --cross_lr (= --in_lr)
FIRST_SPLIT_POSTERIOR = 0.9  # main.py: safe = GMM posterior of the high-cosine component >= 0.9 (first split)
SAFE_FRACTION_STEP = 0.01  # parser.py --update_filter_ratio: the safe set grows by 1 % of the data per epoch
SAFE_FRACTION_CAP = 0.85  # parser.py --cap_filter_ratio
WARMUP_EPOCHS = INMODAL_WARMUP_EPOCHS + CROSSMODAL_WARMUP_EPOCHS
MIN_EPOCHS = WARMUP_EPOCHS + 1  # at least one epoch trains on the split
EMBED_BATCH = 512  # pairs per no_grad forward when the split embeds the data (eval mode: no effect on values)
DEFENSES = ("none", "safeclip")


def safe_split(image_features: np.ndarray, text_features: np.ndarray, fraction: float | None,
               seed: int) -> np.ndarray:
    """SafeCLIP's split of N pairs (L2-normalised N x D features) into safe (True) and risky: the
    cosine of each image and its caption, a 2-component GMM on the cosines, and either every pair
    whose posterior of the high-cosine component is >= ``FIRST_SPLIT_POSTERIOR`` (``fraction`` None:
    the first split) or the top ⌊fraction·N⌋ pairs by that posterior, ties broken by cosine."""
    cos = np.einsum("nd,nd->n", np.asarray(image_features, np.float64), np.asarray(text_features, np.float64))
    posterior = gmm_split(cos, seed)
    if fraction is None:
        return posterior >= FIRST_SPLIT_POSTERIOR
    safe = np.zeros(len(cos), dtype=bool)
    safe[np.lexsort((-cos, -posterior))[:int(len(cos) * fraction)]] = True
    return safe


class SafeCLIPObjective(Objective):
    """SafeCLIP's per-epoch phases and per-step losses (module docstring)."""

    name = "safeclip"

    def __init__(self, cfg: TrainConfig):
        if cfg.epochs < MIN_EPOCHS:
            raise UserError(f"--defense safeclip needs --epochs >= {MIN_EPOCHS}: SafeCLIP warms up for "
                            f"{INMODAL_WARMUP_EPOCHS} in-modal and {CROSSMODAL_WARMUP_EPOCHS} cross-modal epoch(s) "
                            f"before its first split (its code's defaults, 32 epochs in all); got --epochs {cfg.epochs}")
        self.fraction: float | None = None  # the safe fraction of the next split; None until the first
        self.safe: torch.Tensor | None = None  # bool per training row, from the latest split
        self.splits: list[dict] = []
        self.clip_loss = open_clip.ClipLoss()

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        rng = rng_for(ctx.cfg.seed, "safeclip-eda")
        # two EDA views of every caption, drawn once per run as SafeCLIP's dataset draws them
        self.caption_views = [ctx.tokenizer([augment_caption(c, rng) for c in ctx.captions]) for _ in range(2)]
        self.tokens = ctx.tokenizer(ctx.captions)

    def lr_scale(self, epoch: int) -> float:
        return CROSSMODAL_WARMUP_LR_SCALE if INMODAL_WARMUP_EPOCHS <= epoch < WARMUP_EPOCHS else 1.0

    @torch.no_grad()
    def _embed(self) -> tuple[np.ndarray, np.ndarray]:
        ctx = self.ctx
        ctx.model.eval()
        img, txt = [], []
        for s in range(0, len(ctx.captions), EMBED_BATCH):
            out = ctx.model(ctx.normalize(ctx.pixels[s:s + EMBED_BATCH]), self.tokens[s:s + EMBED_BATCH])
            img.append(out["image_features"])
            txt.append(out["text_features"])
        ctx.model.train()
        return torch.cat(img).cpu().numpy(), torch.cat(txt).cpu().numpy()  # the model may train on a GPU

    def begin_epoch(self, epoch: int) -> None:
        if epoch < WARMUP_EPOCHS:
            return
        safe = safe_split(*self._embed(), self.fraction, self.ctx.cfg.seed)
        n_clean = self.ctx.n_clean
        self.splits.append({"epoch": epoch, "n_safe": int(safe.sum()), "n_risky": int((~safe).sum()),
                            "poison_rows_risky": int((~safe[n_clean:]).sum())})
        r = float(safe.mean()) if self.fraction is None else self.fraction
        self.fraction = min(r + SAFE_FRACTION_STEP, SAFE_FRACTION_CAP)
        self.safe = torch.from_numpy(safe)

    def _clip(self, i1, i2, t1, t2, scale) -> torch.Tensor:
        return (self.clip_loss(i1, t2, scale) + self.clip_loss(i2, t1, scale)) / 2

    def loss(self, imgs: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        ctx = self.ctx
        raw = ctx.pixels[idx]
        out = ctx.forward(ctx.normalize(torch.cat([augment_images(raw), augment_images(raw)])),
                          torch.cat([self.caption_views[0][idx], self.caption_views[1][idx]]))
        b = len(idx)
        i1, i2 = out["image_features"][:b], out["image_features"][b:]
        t1, t2 = out["text_features"][:b], out["text_features"][b:]
        scale = out["logit_scale"]
        if epoch < INMODAL_WARMUP_EPOCHS:
            return inmodal_loss(i1, i2, t1, t2, scale)
        if epoch < WARMUP_EPOCHS:
            return self._clip(i1, i2, t1, t2, scale)
        safe = self.safe[idx]
        loss = 0.0 * scale  # a graph-connected zero for a batch where neither set has 2 rows
        if int(safe.sum()) >= 2:
            s = safe
            loss = loss + s.sum() / b * self._clip(i1[s], i2[s], t1[s], t2[s], scale)
        if int((~safe).sum()) >= 2:
            r = ~safe
            loss = loss + r.sum() / b * inmodal_loss(i1[r], i2[r], t1[r], t2[r], scale)
        return loss

    def info(self) -> dict:
        return {"name": self.name, "paper": PAPER, "code": CODE,
                "settings": {"inmodal_warmup_epochs": INMODAL_WARMUP_EPOCHS,
                             "crossmodal_warmup_epochs": CROSSMODAL_WARMUP_EPOCHS,
                             "crossmodal_warmup_lr_scale": CROSSMODAL_WARMUP_LR_SCALE,
                             "first_split_posterior": FIRST_SPLIT_POSTERIOR,
                             "safe_fraction_step": SAFE_FRACTION_STEP, "safe_fraction_cap": SAFE_FRACTION_CAP,
                             "eda_ops": list(EDA_OPS)},
                "views": "every loss on augmented views: 2 AutoAugment views per image per step, 2 EDA views per "
                         "caption per run; the recipe's crop_scale is not applied",
                # epochs count from 0, as the trainer and pair_loss.npy count them. poison_rows_risky: a
                # diagnostic only (poison rows are the tail of the training rows, from n_clean on); the
                # split never reads it
                "split": self.splits}


def objective_for(cfg: TrainConfig) -> Objective | None:
    """The training objective of ``cfg.defense``: None for "none" (the plain CLIP loss)."""
    if cfg.defense not in DEFENSES:
        raise UserError(f"unknown defense {cfg.defense!r}; use one of {list(DEFENSES)}")
    return SafeCLIPObjective(cfg) if cfg.defense == "safeclip" else None


__all__ = ["CROSSMODAL_WARMUP_EPOCHS", "CROSSMODAL_WARMUP_LR_SCALE", "DEFENSES", "FIRST_SPLIT_POSTERIOR",
           "INMODAL_WARMUP_EPOCHS", "MIN_EPOCHS", "SAFE_FRACTION_CAP", "SAFE_FRACTION_STEP", "SafeCLIPObjective",
           "objective_for", "safe_split"]
