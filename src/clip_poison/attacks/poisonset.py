"""A poison set P on disk: new rows beside the clean data (X' = X ∪ P), never a rewrite of X.

Layout of a poison set folder::

    poisons.csv      OpenCLIP CSV (filepath,title), paths relative to this folder
    images/*.png     lossless, so a 1-pixel trigger cell is stored exactly
    manifest.json    the truth about P: every poison's image hash, caption, attack, params, seed
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..data.csvdata import write_csv_dataset
from ..io import UserError, atomic_dir, atomic_write_json, package_versions, read_json, sha256_file, sha256_pixels

MANIFEST = "manifest.json"


def select_captions(pool: list[str], n: int, rng: np.random.Generator, allow_repeat: bool = True) -> list[str]:
    """n captions from the caption set: a seeded subsample when the set is large enough, else the
    set cycled in a seeded order (§3.1: "reducing or increasing the caption set size")."""
    if not pool:
        raise ValueError("empty caption set")
    if n <= len(pool):
        return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
    if not allow_repeat:
        raise UserError(f"asked for {n} poisons but the caption set has only {len(pool)} captions; "
                        "lower --n-poisons or allow repeats")
    order = rng.permutation(len(pool))
    return [pool[order[i % len(pool)]] for i in range(n)]


def resize_to_input(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to the model's input size the way open_clip's eval transform does (bicubic resize of
    the shortest side, then centre crop), so a trigger stamped afterwards is not resampled."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    im = Image.fromarray(image)
    scale = size / min(h, w)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def write_poison_set(out: str | Path, images: list[np.ndarray], captions: list[str], records: list[dict],
                     header: dict, overwrite: bool = False) -> dict:
    """Write images, poisons.csv and manifest.json atomically; returns the manifest."""
    keys = [f"p{i:06d}" for i in range(len(images))]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        rel = write_csv_dataset(tmp / "poisons.csv", images, captions, image_dir="images", names=keys)
        poisons = []
        for key, path, img, cap, rec in zip(keys, rel, images, captions, records):
            poisons.append({"key": key, "file": path, "image_sha256": sha256_pixels(img),
                            "file_sha256": sha256_file(tmp / path), "caption": cap, **rec})
        manifest = {**header, "n_poisons": len(poisons), "csv": "poisons.csv", "poisons": poisons,
                    "versions": package_versions()}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def read_manifest(poison_dir: str | Path) -> dict:
    p = Path(poison_dir)
    if not p.is_dir():
        raise UserError(f"poison set folder not found: {p}; make one with `clip-poison poison targeted|backdoor`")
    return read_json(p / MANIFEST, what="poison manifest")
