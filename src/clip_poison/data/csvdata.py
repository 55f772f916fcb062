"""OpenCLIP CSV datasets: one row per pair, an image path column and a caption column.

Paths inside a CSV are resolved relative to the CSV's folder (so a dataset folder can move);
absolute paths are kept as they are. Clean datasets are only ever read here, never rewritten.
"""
from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import CAPTION_KEY, IMG_KEY
from ..io import UserError, atomic_write_bytes, load_image, png_bytes

# `clip-poison train` has no CSV-format flags (it writes open_clip_train's CSV itself).
FORMAT_FIX = ("save it comma-separated with columns filepath,title (the poison commands also take "
              "--csv-separator, --csv-img-key and --csv-caption-key)")


def separator_hint(columns: list[str]) -> str:
    """A one-column header holding a tab or ';' means the wrong separator, not missing columns."""
    sep = next((c for c in "\t;|" if len(columns) == 1 and c in columns[0]), None)
    return f"; the header looks {sep!r}-separated: pass --csv-separator {sep!r}" if sep else ""


@dataclass
class CsvDataset:
    """A CSV dataset with paths resolved to absolute ones; images are loaded lazily."""

    csv_path: Path
    paths: list[str]
    captions: list[str]
    img_key: str = IMG_KEY
    caption_key: str = CAPTION_KEY

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        return load_image(self.paths[i])


def read_csv_dataset(csv_path: str | Path, img_key: str = IMG_KEY, caption_key: str = CAPTION_KEY,
                     sep: str = ",", own_files_only: bool = False) -> CsvDataset:
    """``own_files_only`` (a poison set's CSV): every path, absolute or not, must resolve (links
    followed) inside the CSV's folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"dataset CSV not found: {csv_path}; pass the CSV written by "
                        "`clip-poison world` or your own OpenCLIP CSV (columns filepath,title)")
    try:
        df = pd.read_csv(csv_path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:
        raise UserError(f"could not parse {csv_path} as CSV ({e}); {FORMAT_FIX}") from None
    missing = [k for k in (img_key, caption_key) if k not in df.columns]
    if missing:
        raise UserError(f"{csv_path} has no column(s) {missing} (columns are {list(df.columns)}); {FORMAT_FIX}")
    if len(df) == 0:
        raise UserError(f"{csv_path} has no rows; a dataset needs at least one image–caption pair")
    base = csv_path.parent.resolve()
    paths = [p if Path(p).is_absolute() else str(base / p) for p in df[img_key].tolist()]
    if own_files_only:
        bad = [r for r, p in zip(df[img_key], paths) if not Path(p).resolve().is_relative_to(base)]
        if bad:
            raise UserError(f"{csv_path} names {bad[0]!r}, outside its folder; a poison set may name only its own "
                            "files, so re-craft it with `clip-poison poison` or remove it from --poisons")
    check_paths_inside(df[img_key].tolist(), csv_path)
    return CsvDataset(csv_path, paths, df[caption_key].tolist(), img_key, caption_key)


# `--allow-outside-paths`: set for one command by the CLI (a context variable, so every reader of the
# user's CSV sees it without threading a flag through each training backend).
ALLOW_OUTSIDE_PATHS: ContextVar[bool] = ContextVar("allow_outside_paths", default=False)


def check_paths_inside(rel_paths: list[str], csv_path: Path) -> None:
    """A relative path in a CSV must stay inside the CSV's folder (a row like ``../../etc/passwd``
    would otherwise be opened); absolute paths are the user's explicit choice and stay allowed."""
    if ALLOW_OUTSIDE_PATHS.get():
        return
    for p in rel_paths:
        if ".." in p and not os.path.isabs(p) and os.path.normpath(p).split(os.sep)[0] == "..":
            raise UserError(f"{csv_path} names the image {p!r}, which leaves the CSV's folder; write it as an "
                            "absolute path, or pass --allow-outside-paths if the CSV is yours and you mean it")


def write_csv_dataset(csv_path: str | Path, images: np.ndarray | list[np.ndarray], captions: list[str],
                      image_dir: str, names: list[str] | None = None) -> list[str]:
    """Write images as lossless PNG under ``csv_path.parent/image_dir`` and the CSV beside them.

    Returns the relative image paths written. PNG keeps 1-pixel trigger cells exact.
    """
    csv_path = Path(csv_path)
    folder = csv_path.parent / image_dir
    folder.mkdir(parents=True, exist_ok=True)
    rel = []
    for i, (img, cap) in enumerate(zip(images, captions)):
        name = names[i] if names else f"{i:06d}"
        rp = f"{image_dir}/{name}.png"
        atomic_write_bytes(csv_path.parent / rp, png_bytes(img))
        rel.append(rp)
    write_csv_rows(csv_path, rel, captions)
    return rel


def write_csv_rows(csv_path: str | Path, paths: list[str], captions: list[str]) -> None:
    df = pd.DataFrame({IMG_KEY: paths, CAPTION_KEY: captions})
    atomic_write_bytes(csv_path, df.to_csv(index=False, lineterminator="\n").encode())
