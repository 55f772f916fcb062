"""Training-recipe presets and the model-size ladder (§4.1, §5.1.2 / Figure 5 right).

A recipe is a ``TrainConfig``; a preset is a named one. ``laptop`` is the package default (tiny
32 px victims on 2 CPU cores); ``paper-rn50`` is §4.1's recipe for GPU users, on open_clip's
built-in ``RN50`` and OpenCLIP's own trainer.

The size ladder varies the image tower only, as the paper does ("we artificially decrease the size
of our model"); every rung shares one text tower and embedding size. Sizes are counted by the
image tower: the 49,408-token embedding (49,408 × 128 = 6.3 M) dominates every tiny model's total,
so a total count would hide the variable. ``describe()`` reports both.
"""
from __future__ import annotations

from dataclasses import replace

from ..config import TrainConfig
from ..io import UserError

# Paper §4.1: "batch size 1024, ... 30 epochs using a learning rate of .0002 training with Momentum
# SGD and weight decay of 0.02". OpenCLIP (the implementation the paper cites) trains with AdamW and
# open_clip_train offers no SGD, so this preset keeps AdamW with the paper's lr/wd: the one
# deliberate difference from the text. Warmup: open_clip_train's default (10,000 steps, about 3 of
# the 30 epochs at 3 M pairs); the paper does not state one. Crop: OpenCLIP's default train
# transform (RandomResizedCrop scale 0.9–1.0), at 224 px where a 16 px trigger survives it.
PAPER_RN50 = TrainConfig(model="RN50", epochs=30, batch_size=1024, lr=2e-4, wd=0.02, warmup=10_000,
                         crop_scale=(0.9, 1.0), backend="open_clip_train", workers=8)

# open_clip built-ins the presets use (listed by `clip-poison list models` beside our victims).
PAPER_MODELS = ("RN50",)

RECIPES: dict[str, tuple[TrainConfig, str]] = {
    "laptop": (TrainConfig(), "tiny 32 px victims on a CPU (package defaults)"),
    "paper-rn50": (PAPER_RN50, "§4.1 on GPUs: RN50, batch 1024, 30 epochs, lr 2e-4, wd 0.02; "
                               "AdamW (OpenCLIP's optimizer), not the paper's momentum SGD"),
}

# Figure 5 (right): ~1 M, ~5 M and ~30 M parameters, counted by the image tower. rn-tiny-32 is the
# ~1 M ModifiedResNet rung (its image tower is 1.3 M, mostly the attention pool).
SIZE_LADDER: dict[str, dict[str, str]] = {
    "ModifiedResNet": {"1M": "rn-tiny-32", "5M": "rn-5m-32", "30M": "rn-30m-32"},
    "ViT": {"1M": "vit-1m-32", "5M": "vit-5m-32", "30M": "vit-30m-32"},
}
# The image-tower parameter range each rung must fall in (tests assert it).
RUNG_RANGES: dict[str, tuple[float, float]] = {"1M": (0.7e6, 1.5e6), "5M": (3.5e6, 6.5e6), "30M": (25e6, 35e6)}


def recipe(name: str, **overrides) -> TrainConfig:
    """A preset recipe as a fresh ``TrainConfig``, with optional field overrides."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe preset {name!r}; use one of {sorted(RECIPES)}")
    return replace(RECIPES[name][0], **overrides)


def ladder_models() -> list[str]:
    return [m for rungs in SIZE_LADDER.values() for m in rungs.values()]
