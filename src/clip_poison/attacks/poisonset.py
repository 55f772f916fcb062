"""A poison set P on disk: new rows beside the clean data (X' = X ∪ P), never a rewrite of X.

Layout of a poison set folder (``format`` in the manifest says which)::

    poisons.csv           csv: OpenCLIP CSV (filepath,title), paths relative to this folder
    images/*.png          csv: lossless, so a 1-pixel trigger cell is stored exactly
    poisons-000000.tar    wds: img2dataset layout (KEY.png, KEY.txt, KEY.json), for `clean::poison`
    manifest.json         the truth about P: every poison's image hash, caption, attack, target,
                          params, seed; ``mode`` (add / replace) and the clean rows it ``replaces``
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.csvdata import write_csv_dataset
from ..data.wds import sample_members, write_shards
from ..io import (MANIFEST, UserError, atomic_dir, atomic_write_json, package_versions, png_bytes, rng_for,
                 sha256_bytes, sha256_file, sha256_pixels)

FORMATS = ("csv", "wds")
MODES = ("add", "replace")


def select_captions(pool: list[str], n: int, rng: np.random.Generator, allow_repeat: bool = True) -> list[str]:
    """n captions from the caption set: a seeded subsample when the set is large enough, else the
    set cycled in a seeded order (§3.1: "reducing or increasing the caption set size")."""
    if not pool:
        raise UserError("the caption set is empty; pick a label that occurs in the captions or add --synonyms")
    if n <= len(pool):
        return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
    if not allow_repeat:
        raise UserError(f"asked for {n} poisons but the caption set has only {len(pool)} captions; "
                        "lower --n-poisons or drop --no-repeat-captions to cycle the set")
    order = rng.permutation(len(pool))
    return [pool[order[i % len(pool)]] for i in range(n)]


def check_mode_format(mode: str, fmt: str | None) -> None:
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; use 'add' (X' = X ∪ P) or 'replace' (P replaces as many clean pairs)")
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; use 'csv' or 'wds'")


def replaced_rows(mode: str, n_rows: int, n: int, seed: int) -> list[int]:
    """``--mode replace`` (§5.1 follow-ups): n seeded-random clean rows that training drops, so
    |X'| = |X|. Recorded in the manifest; the clean dataset itself is never rewritten."""
    if mode == "add":
        return []
    if n > n_rows:
        raise UserError(f"--mode replace needs {n} clean rows to replace but the dataset has {n_rows}; "
                        "lower --n-poisons or use --mode add")
    return sorted(int(i) for i in rng_for(seed, "replace/rows").choice(n_rows, size=n, replace=False))


def write_poison_set(out: str | Path, images: list[np.ndarray], captions: list[str], records: list[dict],
                     header: dict, overwrite: bool = False, fmt: str = "csv", mode: str = "add",
                     replaces: list[int] | None = None) -> dict:
    """Write the poisons (CSV + PNGs, or webdataset shard(s) of PNGs) and manifest.json
    atomically; returns the manifest."""
    check_mode_format(mode, fmt)
    keys = [f"p{i:06d}" for i in range(len(images))]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        poisons = []
        if fmt == "csv":
            rel = write_csv_dataset(tmp / "poisons.csv", images, captions, image_dir="images", names=keys)
            for key, path, img, cap, rec in zip(keys, rel, images, captions, records):
                poisons.append({"key": key, "file": path, "image_sha256": sha256_pixels(img),
                                "file_sha256": sha256_file(tmp / path), "caption": cap, **rec})
            where = {"csv": "poisons.csv"}
        else:
            samples = {}
            for key, img, cap, rec in zip(keys, images, captions, records):
                data = png_bytes(img)
                samples[key] = sample_members(data, cap, {"key": key, **{k: rec[k] for k in ("attack", "target_id") if k in rec}})
                poisons.append({"key": key, "file": f"{key}.png", "image_sha256": sha256_pixels(img),
                                "file_sha256": sha256_bytes(data), "caption": cap, **rec})
            shards = write_shards(tmp, samples)
            for p in poisons:
                p["shard"] = shards[keys.index(p["key"]) // 10_000]
            where = {"shards": shards}
        manifest = {**header, "format": fmt, "mode": mode, "replaces": list(replaces or []),
                    "n_poisons": len(poisons), **where, "poisons": poisons, "versions": package_versions()}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


