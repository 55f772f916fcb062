"""Backdoor triggers bd and how they are stamped: x' = x ⊕ bd (§2.1, §3.3).

Triggers are a registry of functions ``size -> HxWx3 uint8 patch``, so new patterns are one
decorator away. Stamping happens on pixels already at the model's input size: resizing after
stamping (bicubic) would smear the 1-pixel checker cells of a small trigger into grey.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..io import UserError

TRIGGERS: dict[str, Callable[[int], np.ndarray]] = {}
PLACEMENTS = ("consistent", "random")


def register_trigger(name: str):
    def deco(fn: Callable[[int], np.ndarray]):
        TRIGGERS[name] = fn
        return fn
    return deco


@register_trigger("checkerboard")
def checkerboard(size: int) -> np.ndarray:
    """The standard checkerboard (Gu et al. 2017; the paper's Figure 1): 1-pixel black/white cells,
    black at the patch's top-left pixel."""
    yy, xx = np.mgrid[0:size, 0:size]
    cells = ((yy + xx) % 2 * 255).astype(np.uint8)
    return np.repeat(cells[..., None], 3, axis=2)


PAPER_PATCH_SIZE, PAPER_IMAGE_SIZE = 16, 224


def scaled_patch_size(image_size: int, size_at_224: int = PAPER_PATCH_SIZE) -> int:
    """The paper's patch (16 px on a 224-px input, §5.1) scaled to another input size, keeping the
    fraction of the image it covers: 16 → 2 at 32 px, 16 at 224, 32 at 448 (at least 1 px).
    The CLI keeps an explicit ``--patch-size`` default; this is the helper for choosing one."""
    if image_size < 1 or size_at_224 < 1:
        raise UserError(f"image size and patch size must be positive, got {image_size} and {size_at_224}")
    return max(1, round(size_at_224 * image_size / PAPER_IMAGE_SIZE))


def make_trigger(name: str, size: int) -> np.ndarray:
    if name not in TRIGGERS:
        raise UserError(f"unknown trigger {name!r}; available: {sorted(TRIGGERS)}")
    if size < 1:
        raise UserError(f"patch size must be a positive number of pixels, got {size}")
    return TRIGGERS[name](int(size))


def trigger_position(image_shape: tuple[int, ...], size: int, placement: str,
                     rng: np.random.Generator | None = None) -> tuple[int, int]:
    """Top-left (row, col) of the patch: (0, 0) when consistent (the paper's upper-left corner),
    uniform over every position where the patch fits when random."""
    h, w = image_shape[:2]
    if size > h or size > w:
        raise UserError(f"a {size}x{size} patch does not fit a {h}x{w} image; "
                        f"use --patch-size <= {min(h, w)}")
    if placement == "consistent":
        return 0, 0
    if placement == "random":
        if rng is None:
            raise ValueError("random placement needs a seeded rng")
        return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    raise UserError(f"unknown placement {placement!r}; use one of {PLACEMENTS}")


def apply_trigger(image: np.ndarray, patch: np.ndarray, pos: tuple[int, int]) -> np.ndarray:
    """Return a copy of ``image`` (HxWx3 uint8) with ``patch`` pasted at ``pos``."""
    out = np.array(image, dtype=np.uint8, copy=True)
    y, x = pos
    s = patch.shape[0]
    out[y:y + s, x:x + s] = patch
    return out
