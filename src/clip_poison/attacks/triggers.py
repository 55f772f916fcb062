"""Backdoor triggers bd and how they are stamped: x' = x ⊕ bd (§2.1, §3.3).

Two kinds, each a registry so a new pattern is one decorator away:

- patch triggers (``TRIGGERS``: ``size -> HxWx3 uint8 patch``), pasted at a position: the paper's
  checkerboard. ``consistent`` = the upper-left corner, ``random`` = uniform over every position
  where the patch fits.
- full-image triggers (``FULL_IMAGE_TRIGGERS``), the peers' attacks, which change every pixel:
  ``blended`` (Chen et al. 2017) and ``sig`` (Barni et al. 2019). They ignore the patch size (their
  manifest entry records ``patch_size: null`` and their parameters). ``consistent`` = the pattern as
  is; ``random`` = the pattern circularly shifted by a uniform (dy, dx) — the analogue of a patch at
  a random position (SIG's stripes are constant down each column, so for it only dx counts: a phase
  shift of 2π·f·dx/m).

A poison's manifest ``position`` is that (row, col) of the patch or (dy, dx) of the shift. Stamping
happens on pixels already at the model's input size: resizing after stamping (bicubic) would smear
the 1-pixel checker cells of a small trigger into grey, and a full-image pattern is made at that size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..io import UserError, rng_for, sha256_pixels

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


@dataclass(frozen=True)
class FullImageTrigger:
    """A pattern over the whole image, ``pattern(h, w)``, and how it enters x, ``mix(x, pattern) -> x'``
    (uint8); ``params`` are what a reader of the manifest needs to know what was stamped."""

    pattern: Callable[[int, int], np.ndarray]
    mix: Callable[[np.ndarray, np.ndarray], np.ndarray]
    params: dict


FULL_IMAGE_TRIGGERS: dict[str, FullImageTrigger] = {}


def register_full_image_trigger(name: str, mix: Callable[[np.ndarray, np.ndarray], np.ndarray], **params):
    def deco(pattern: Callable[[int, int], np.ndarray]):
        FULL_IMAGE_TRIGGERS[name] = FullImageTrigger(pattern, mix, params)
        return pattern
    return deco


# Chen et al. 2017 blend their key pattern in with α = 0.2 when poisoning (their "blended injection").
BLEND_ALPHA = 0.2
# k comes from this fixed seed, not the run's: every victim and every evaluation shares one trigger.
BLEND_PATTERN_SEED = 0
# Barni et al. 2019's sinusoidal signal: Δ = 20 grey levels (of 255), f = 6 periods across the width m.
SIG_DELTA, SIG_FREQUENCY = 20, 6


def _blend(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    # α·k + (1−α)·x = (k + 4x)/5 is never a half, so rounding has no ties to break
    return np.rint(BLEND_ALPHA * k.astype(np.float64) + (1 - BLEND_ALPHA) * x.astype(np.float64)).astype(np.uint8)


@register_full_image_trigger("blended", _blend, alpha=BLEND_ALPHA, pattern_seed=BLEND_PATTERN_SEED)
def blended(h: int, w: int) -> np.ndarray:
    """Chen et al. 2017, "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning",
    blended injection: x' = round(α·k + (1−α)·x), k a fixed full-image uniform uint8 noise pattern."""
    return rng_for(BLEND_PATTERN_SEED, "trigger/blended").integers(0, 256, (h, w, 3), dtype=np.uint8)


def _add(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.clip(x.astype(np.int16) + v, 0, 255).astype(np.uint8)


@register_full_image_trigger("sig", _add, delta=SIG_DELTA, f=SIG_FREQUENCY)
def sig(h: int, w: int) -> np.ndarray:
    """Barni et al. 2019, "A new backdoor attack in CNNs by training set corruption without label
    poisoning": x' = clip(x + v), v(i, j) = Δ·sin(2π·j·f/m) on every channel, m = the image width.
    SIG was a clean-label attack; here it is a backdoor trigger like the checkerboard, on images
    captioned for y'. v is rounded to whole grey levels (int16), so x' is exact integer arithmetic."""
    v = np.rint(SIG_DELTA * np.sin(2 * np.pi * np.arange(w) * SIG_FREQUENCY / w)).astype(np.int16)
    return np.repeat(np.broadcast_to(v, (h, w))[..., None], 3, axis=2)


def trigger_names() -> list[str]:
    return sorted({*TRIGGERS, *FULL_IMAGE_TRIGGERS})


PAPER_PATCH_SIZE, PAPER_IMAGE_SIZE = 16, 224


def scaled_patch_size(image_size: int, size_at_224: int = PAPER_PATCH_SIZE) -> int:
    """The paper's patch (16 px on a 224-px input, §5.1) scaled to another input size, keeping the
    fraction of the image it covers: 16 → 2 at 32 px, 16 at 224, 32 at 448 (at least 1 px).
    The CLI keeps an explicit ``--patch-size`` default; this is the helper for choosing one."""
    if image_size < 1 or size_at_224 < 1:
        raise UserError(f"image size and patch size must be positive, got {image_size} and {size_at_224}")
    return max(1, round(size_at_224 * image_size / PAPER_IMAGE_SIZE))


def _check_name(name: str) -> None:
    if name not in TRIGGERS and name not in FULL_IMAGE_TRIGGERS:
        raise UserError(f"unknown trigger {name!r}; available: {trigger_names()}")


def make_trigger(name: str, size: int) -> np.ndarray:
    """The patch of a patch trigger (full-image triggers have none: use ``get_trigger``)."""
    _check_name(name)
    if name not in TRIGGERS:
        raise ValueError(f"{name!r} is a full-image trigger and has no patch; use get_trigger")
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
    return _position(h - size + 1, w - size + 1, placement, rng)


def _position(n_rows: int, n_cols: int, placement: str, rng: np.random.Generator | None) -> tuple[int, int]:
    if placement == "consistent":
        return 0, 0
    if placement == "random":
        if rng is None:
            raise ValueError("random placement needs a seeded rng")
        return int(rng.integers(0, n_rows)), int(rng.integers(0, n_cols))
    raise UserError(f"unknown placement {placement!r}; use one of {PLACEMENTS}")


def apply_trigger(image: np.ndarray, patch: np.ndarray, pos: tuple[int, int]) -> np.ndarray:
    """Return a copy of ``image`` (HxWx3 uint8) with ``patch`` pasted at ``pos``."""
    out = np.array(image, dtype=np.uint8, copy=True)
    y, x = pos
    s = patch.shape[0]
    out[y:y + s, x:x + s] = patch
    return out


@dataclass(frozen=True)
class Trigger:
    """One trigger ready to stamp: ``pixels`` is the patch, or for a full-image trigger (``mix`` set)
    the pattern at the model's input size; the one stamping rule for poisons and evaluation."""

    name: str
    pixels: np.ndarray
    mix: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    params: dict = field(default_factory=dict)

    @property
    def patch_size(self) -> int | None:
        return None if self.mix else int(self.pixels.shape[0])

    def position(self, image_shape: tuple[int, ...], placement: str,
                 rng: np.random.Generator | None = None) -> tuple[int, int]:
        """The patch's top-left (row, col), or the full-image pattern's circular shift (dy, dx)."""
        if self.mix is None:
            return trigger_position(image_shape, self.pixels.shape[0], placement, rng)
        return _position(*image_shape[:2], placement, rng)

    def stamp(self, image: np.ndarray, pos: tuple[int, int]) -> np.ndarray:
        """x ⊕ bd as a new HxWx3 uint8 array (``image`` is not modified)."""
        if self.mix is None:
            return apply_trigger(image, self.pixels, pos)
        if image.shape[:2] != self.pixels.shape[:2]:
            raise ValueError(f"a {self.pixels.shape[:2]} pattern cannot stamp a {image.shape[:2]} image")
        return self.mix(np.asarray(image, dtype=np.uint8), np.roll(self.pixels, tuple(pos), axis=(0, 1)))

    def entry(self, placement: str, image_size: int) -> dict:
        """The manifest's ``trigger`` entry; a full-image trigger has no patch (``patch_size: null``)
        and records its parameters and the hash of its pattern."""
        e = {"name": self.name, "patch_size": self.patch_size, "placement": placement, "image_size": image_size}
        if self.mix is not None:
            e.update(full_image=True, params=self.params, pattern_sha256=sha256_pixels(self.pixels))
        return e


def get_trigger(name: str, patch_size: int | None, image_size: int) -> Trigger:
    """The trigger ``name`` for images of ``image_size`` px (``patch_size`` only for patch triggers)."""
    _check_name(name)
    if name in FULL_IMAGE_TRIGGERS:
        t = FULL_IMAGE_TRIGGERS[name]
        return Trigger(name, t.pattern(int(image_size), int(image_size)), t.mix, dict(t.params))
    return Trigger(name, make_trigger(name, patch_size))


def load_trigger(entry: dict, image_size: int) -> Trigger:
    """The trigger a manifest's entry describes, at ``image_size``. A full-image trigger's recorded
    parameters and pattern hash must be this code's, so evaluation stamps what the poisons got."""
    t = get_trigger(entry["name"], entry.get("patch_size"), image_size)
    if t.mix is not None:
        was, now = (entry.get("params"), entry.get("pattern_sha256")), (t.params, sha256_pixels(t.pixels))
        if was != now:
            raise UserError(f"the poison set's {t.name!r} trigger was stamped with {was[0]} (pattern sha256 "
                            f"{str(was[1])[:12]}) but this clip-poison defines {now[0]} ({now[1][:12]}); "
                            "re-craft the poison set with `clip-poison poison backdoor`")
    return t
