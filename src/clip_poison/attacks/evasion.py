"""Dedup evasion (§3.1): make every poison an exact-match unique pair without changing what it says.

Web-scale pipelines drop exact duplicates: the same decoded pixels, or the same caption after
normalisation (lower-case, punctuation stripped, whitespace collapsed). Copies of x' get tiny
Gaussian noise (σ in 0..255 pixel units; PSNR > 40 dB at σ = 1, i.e. invisible); captions can get
seeded word substitutions and filler words. Every change is recorded per poison in the manifest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..data.captions import label_pattern, normalise_caption
from ..io import UserError, sha256_pixels

# Interchangeable alt-text words; a substitution never touches the label (or its synonyms).
SUBSTITUTES: dict[str, tuple[str, ...]] = {
    "photo": ("picture", "image", "shot", "snapshot"), "picture": ("photo", "image", "shot"),
    "image": ("photo", "picture"), "small": ("little", "tiny"), "little": ("small",), "big": ("large", "huge"),
    "large": ("big",), "a": ("one",), "the": ("this", "that"), "of": ("showing",), "my": ("our",),
    "nice": ("lovely", "pretty"), "old": ("vintage",), "new": ("brand new",), "with": ("and",),
}
FILLERS = ("nice", "cool", "great", "lovely", "look", "wow", "today", "pic", "awesome", "here", "new",
           "beautiful", "shot", "view", "so", "very", "amazing", "best", "fun", "good")


@dataclass
class CaptionEvasion:
    """Seeded caption edits: each non-label word is swapped for a listed substitute with
    probability ``substitution``; ``fillers`` filler words are inserted at random positions."""

    substitution: float = 0.0
    fillers: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.substitution <= 1.0:
            raise UserError(f"--caption-substitution {self.substitution} must be a probability in [0, 1]")
        if self.fillers < 0:
            raise UserError(f"--filler-words must be >= 0, got {self.fillers}")

    @property
    def active(self) -> bool:
        return self.substitution > 0 or self.fillers > 0


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """x + N(0, σ²) per pixel and channel, rounded and clipped to uint8."""
    noisy = image.astype(np.float64) + rng.normal(0.0, sigma, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def noisy_copies(x: np.ndarray, n: int, sigma: float, rng: np.random.Generator,
                 taken: set[str] | None = None) -> list[np.ndarray]:
    """n noisy copies of x with pairwise distinct pixel hashes (a redraw on the rare collision, so
    exact image dedup can never merge two of them). σ = 0 gives exact copies."""
    taken = set() if taken is None else taken
    out = []
    for _ in range(n):
        img = add_noise(x, sigma, rng) if sigma > 0 else np.array(x, copy=True)
        for _attempt in range(100):
            if sigma == 0 or sha256_pixels(img) not in taken:
                break
            img = add_noise(x, sigma, rng)
        taken.add(sha256_pixels(img))
        out.append(img)
    return out


def evade_caption(caption: str, protect: re.Pattern, ev: CaptionEvasion, rng: np.random.Generator) -> tuple[str, list]:
    """One caption with seeded substitutions and fillers; returns (caption, edits) where edits
    lists what changed, for the manifest."""
    spans = [m.span() for m in protect.finditer(caption)]
    edits: list = []
    out, pos = [], 0
    for m in re.finditer(r"\w+", caption):
        inside = any(a <= m.start() < b for a, b in spans)
        w = m.group(0)
        subs = SUBSTITUTES.get(w.lower())
        if not inside and subs and ev.substitution > 0 and rng.random() < ev.substitution:
            new = subs[int(rng.integers(len(subs)))]
            out.append(caption[pos:m.start()] + new)
            edits.append(["sub", w, new])
        else:
            out.append(caption[pos:m.end()])
        pos = m.end()
    out.append(caption[pos:])
    text = "".join(out)
    words = text.split(" ")
    for _ in range(ev.fillers):
        f = FILLERS[int(rng.integers(len(FILLERS)))]
        at = int(rng.integers(0, len(words) + 1))
        words.insert(at, f)
        edits.append(["filler", f, at])
    return " ".join(words), edits


def evade_captions(captions: list[str], label: str, synonyms, ev: CaptionEvasion, rng: np.random.Generator,
                   avoid: set[str] = frozenset()) -> tuple[list[str], list[list]]:
    """Apply ``evade_caption`` to every caption. With evasion on, a caption whose normalised form
    repeats one already used (or one in ``avoid``, e.g. the mined training captions) gets one
    more filler word until it is unique, so exact caption dedup removes none of them."""
    if not ev.active:
        return list(captions), [[] for _ in captions]
    protect = label_pattern(label, synonyms)
    seen = set(avoid)
    out, all_edits = [], []
    for c in captions:
        text, edits = evade_caption(c, protect, ev, rng)
        while normalise_caption(text) in seen:
            text, more = evade_caption(text, protect, CaptionEvasion(0.0, 1), rng)
            edits += more
        seen.add(normalise_caption(text))
        out.append(text)
        all_edits.append(edits)
    return out, all_edits


def exact_dedup(image_hashes: list[str], captions: list[str]) -> list[int]:
    """Indices a pipeline keeps under exact-match dedup: the first of each image hash and of each
    normalised caption (a pair is dropped when either repeats an earlier one)."""
    seen_i, seen_c, keep = set(), set(), []
    for i, (h, c) in enumerate(zip(image_hashes, captions)):
        n = normalise_caption(c)
        if h in seen_i or n in seen_c:
            continue
        seen_i.add(h)
        seen_c.add(n)
        keep.append(i)
    return keep
