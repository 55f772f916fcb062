"""In-modal contrastive learning: each image against an augmented view of itself, each caption
against an augmented caption. CleanCLIP's repair loss (Bansal et al., ICCV 2023) adds it to the CLIP
loss; SafeCLIP warms up with it. One home for the loss and the two augmentations.

Follows CleanCLIP's code (nishadsinghi/CleanCLIP): ``src/train.py`` ``get_loss`` (the originals'
logits against the augmented views', one cross-entropy per modality, averaged), images augmented by
torchvision's ``AutoAugment`` (``utils/augment_image.py``), captions by EDA (Wei & Zou 2019,
``utils/eda.py``, α = 0.1, one of its operations per caption). EDA's synonym replacement and
insertion read WordNet, which nothing here may download; the two operations that need no
vocabulary (random swap, random deletion) are used, and ``EDA_OPS`` says so in every record.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

EDA_ALPHA = 0.1  # CleanCLIP's eda(): alpha_rs = p_rd = 0.1
EDA_OPS = ("random swap", "random deletion")  # of EDA's four; synonym replacement and insertion need WordNet


def inmodal_loss(image: torch.Tensor, image_aug: torch.Tensor, text: torch.Tensor, text_aug: torch.Tensor,
                 logit_scale: torch.Tensor) -> torch.Tensor:
    """CleanCLIP's in-modal InfoNCE on L2-normalised features (B x D each): row i of the originals
    must pick row i of the augmented views among the batch's, images and captions separately,
    the two cross-entropies averaged."""
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logit_scale * image @ image_aug.T, target)
            + F.cross_entropy(logit_scale * text @ text_aug.T, target)) / 2


_AUTOAUGMENT = v2.AutoAugment()  # ImageNet policy, torchvision's default, as CleanCLIP's transforms.AutoAugment()


def augment_images(pixels: torch.Tensor) -> torch.Tensor:
    """AutoAugment each uint8 image (B x 3 x H x W) with its own draw of the policy (one call on
    the batch would apply one sub-policy to every image). Draws from torch's global generator,
    which training seeds."""
    return torch.stack([_AUTOAUGMENT(im) for im in pixels])


def _words(caption: str) -> list[str]:
    # EDA's get_only_chars: lower case, letters and spaces only
    return re.sub(r"[^a-z ]", " ", caption.lower().replace("’", "").replace("'", "").replace("-", " ")).split()


def augment_caption(caption: str, rng: np.random.Generator) -> str:
    """One EDA operation, drawn uniformly from ``EDA_OPS``: swap max(1, ⌊α·n⌋) random word pairs, or
    delete each word with probability α (keeping one word if all would go)."""
    words = _words(caption)
    if len(words) < 2:
        return " ".join(words)
    if EDA_OPS[int(rng.integers(len(EDA_OPS)))] == "random swap":
        for _ in range(max(1, int(EDA_ALPHA * len(words)))):
            i, j = rng.choice(len(words), size=2, replace=False)
            words[i], words[j] = words[j], words[i]
        return " ".join(words)
    kept = [w for w in words if rng.random() > EDA_ALPHA]
    return " ".join(kept) if kept else words[int(rng.integers(len(words)))]


__all__ = ["EDA_ALPHA", "EDA_OPS", "augment_caption", "augment_images", "inmodal_loss"]
