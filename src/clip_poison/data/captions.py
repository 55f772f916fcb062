"""Caption sets (§3.1): training captions that mention a label, or CLIP's 80 prompt templates."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES


def label_pattern(label: str, synonyms: Sequence[str] = ()) -> re.Pattern:
    """Whole-word, case-insensitive match of the label or any synonym ("cat" matches "a cat on a
    mat", not "concatenate"); multi-word labels match across any run of whitespace."""
    words = [w for w in (label, *synonyms) if w.strip()]
    alts = [r"\s+".join(re.escape(p) for p in w.split()) for w in words]
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)


def mine_captions(captions: Iterable[str], label: str, synonyms: Sequence[str] = ()) -> list[int]:
    """Indices of the captions that contain ``label`` (or a synonym) as a whole word (§3.1 naive
    caption set: "we search the training dataset for all sequences that contain this label")."""
    pat = label_pattern(label, synonyms)
    return [i for i, c in enumerate(captions) if pat.search(c)]


def template_captions(label: str) -> list[str]:
    """CLIP's 80 ImageNet prompt templates filled with the label (§3.1, second technique)."""
    return [t(label) for t in OPENAI_IMAGENET_TEMPLATES]
