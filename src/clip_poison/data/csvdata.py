"""OpenCLIP CSV datasets: one row per pair, an image path column and a caption column.

Paths inside a CSV are resolved relative to the CSV's folder (so a dataset folder can move);
absolute paths are kept as they are. Clean datasets are only ever read here, never rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import UserError, atomic_write_bytes, load_image, png_bytes

IMG_KEY = "filepath"
CAPTION_KEY = "title"


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
                     sep: str = ",") -> CsvDataset:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"dataset CSV not found: {csv_path}; pass the CSV written by "
                        "`clip-poison world` or your own OpenCLIP CSV (columns filepath,title)")
    try:
        df = pd.read_csv(csv_path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:
        raise UserError(f"could not parse {csv_path} as CSV ({e}); check --csv-separator") from None
    missing = [k for k in (img_key, caption_key) if k not in df.columns]
    if missing:
        raise UserError(f"{csv_path} has no column(s) {missing} (columns are {list(df.columns)}); "
                        "pass --csv-img-key/--csv-caption-key to name yours")
    if len(df) == 0:
        raise UserError(f"{csv_path} has no rows; a dataset needs at least one image–caption pair")
    base = csv_path.parent.resolve()
    paths = [p if Path(p).is_absolute() else str(base / p) for p in df[img_key].tolist()]
    return CsvDataset(csv_path, paths, df[caption_key].tolist(), img_key, caption_key)


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
