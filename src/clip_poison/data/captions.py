"""Caption sets (§3.1): training captions that mention a label, or CLIP's 80 prompt templates.

At CC3M scale the captions are read once, streaming, into one Arrow column (a ``CaptionIndex``,
optionally saved as Parquet next to the output, never inside the user's dataset); each label is
then answered from it: a vectorised substring pre-filter on the lower-cased column, followed by
the exact whole-word regex on the few candidate rows, so the answer equals ``mine_captions``.
"""
from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from ..io import UserError, atomic_write_bytes, dumps_json


def check_probabilities(cfg, extra: Sequence[str] = ()) -> None:
    """A world's caption mix (``config.CaptionMix``) and its ``extra`` fields are probabilities."""
    for name in ("p_class_word", "p_synonym", "p_noisy_pair", *extra):
        v = getattr(cfg, name)
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{name}={v} must be a probability in [0, 1]")
    if cfg.p_class_word + cfg.p_synonym > 1.0:
        raise UserError("p_class_word + p_synonym must be <= 1 (the rest are captions with no object word)")


def label_pattern(label: str, synonyms: Sequence[str] = ()) -> re.Pattern:
    """Whole-word, case-insensitive match of the label or any synonym ("cat" matches "a cat on a
    mat", not "concatenate"); multi-word labels match across any run of whitespace."""
    words = [w for w in (label, *synonyms) if w.strip()]
    if not words:
        raise UserError("the label is empty; pass a word or phrase such as --label tent")
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


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def normalise_caption(caption: str) -> str:
    """The key of an exact-duplicate caption filter: lower-case, punctuation stripped, whitespace
    collapsed (what LAION-style exact dedup compares)."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", caption.lower())).strip()


class CaptionIndex:
    """Every training caption, in row order, as one Arrow column plus its lower-cased copy.

    Built by streaming caption batches (never a Python list of the whole corpus); 3M captions take
    a few hundred MB. ``rows(label)`` answers a label in well under a second at that size.
    """

    def __init__(self, captions: pa.ChunkedArray, fingerprint: dict | None = None):
        self.captions = captions
        self.lower = pc.utf8_lower(captions)
        self.fingerprint = fingerprint or {}

    @classmethod
    def build(cls, batches: Iterable[Sequence[str] | pa.Array], fingerprint: dict | None = None) -> "CaptionIndex":
        chunks = [b if isinstance(b, (pa.Array, pa.ChunkedArray)) else pa.array(list(b), type=pa.string())
                  for b in batches]
        flat = []
        for c in chunks:
            flat.extend(c.chunks if isinstance(c, pa.ChunkedArray) else [c])
        return cls(pa.chunked_array(flat, type=pa.string()), fingerprint)

    def __len__(self) -> int:
        return len(self.captions)

    def caption(self, row: int) -> str:
        return self.captions[int(row)].as_py()

    def take(self, rows: Sequence[int]) -> list[str]:
        return self.captions.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def rows(self, label: str, synonyms: Sequence[str] = ()) -> np.ndarray:
        """Sorted row indices whose caption contains ``label`` or a synonym as a whole word;
        identical to ``mine_captions`` over the same captions."""
        pat = label_pattern(label, synonyms)
        mask = None
        for word in (label, *synonyms):
            tokens = re.findall(r"\w+", word.lower())
            if not tokens:
                return self._verify(np.arange(len(self)), pat)
            # Any whole-word match contains the word's longest token as a substring: a cheap,
            # vectorised superset; the exact regex then runs on the candidates only.
            m = pc.match_substring(self.lower, max(tokens, key=len))
            mask = m if mask is None else pc.or_(mask, m)
        cand = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        return self._verify(cand, pat)

    def _verify(self, cand: np.ndarray, pat: re.Pattern) -> np.ndarray:
        if len(cand) == 0:
            return cand.astype(np.int64)
        texts = self.take(cand)
        return np.asarray([r for r, t in zip(cand, texts) if pat.search(t)], dtype=np.int64)

    def save(self, path: str | Path) -> None:
        """Parquet with the source's fingerprint in its metadata (written atomically)."""
        import pyarrow.parquet as pq

        table = pa.table({"caption": self.captions}).replace_schema_metadata(
            {"clip_poison_fingerprint": dumps_json(self.fingerprint)})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        atomic_write_bytes(path, sink.getvalue().to_pybytes())

    @classmethod
    def load(cls, path: str | Path) -> "CaptionIndex":
        import json

        import pyarrow.parquet as pq

        try:
            t = pq.read_table(path)
            meta = json.loads((t.schema.metadata or {}).get(b"clip_poison_fingerprint", b"{}"))
            return cls(t.column("caption").cast(pa.string()), meta)
        except (pa.ArrowException, ValueError, KeyError) as e:  # not Parquet, no caption column, bad metadata
            raise UserError(f"--caption-index {path} is not a caption index written by clip-poison "
                            f"({type(e).__name__}: {e}); delete it (it is rebuilt) or pass a new path") from None
