"""Labelled evaluation sets: images + labels + class names + prompt templates.

The on-disk layout is CLIP_benchmark's webdataset one, so the embedded world's eval split, the
shared CIFAR-10 copy and any user's existing CLIP_benchmark data load the same way::

    ROOT/classnames.txt                           one class name a line
    ROOT/zeroshot_classification_templates.txt    one prompt a line, {c} for the class name
    ROOT/SPLIT/nshards.txt, ROOT/SPLIT/0.tar ...  members KEY.png|jpg|webp + KEY.cls
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import UserError, atomic_write_bytes, decode_image, png_bytes

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class EvalSet:
    """Decoded eval images (N x H x W x 3 uint8, at their stored size) and their labels.

    Held in memory: fine for CIFAR-scale sets (10k x 32 px = 30 MB); pass ``max_n`` for big ones.
    """

    images: list[np.ndarray]
    labels: np.ndarray
    classnames: list[str]
    templates: list[str]
    keys: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)


def _read_lines(path: Path, what: str, fix: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}; {fix}")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"{path} is empty; {fix}")
    return lines


def load_wds_evalset(root: str | Path, split: str = "test", max_n: int | None = None) -> EvalSet:
    """Load a CLIP_benchmark-layout webdataset eval set (streamed shard by shard, tar order)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"eval set folder not found: {root}; pass --eval-root DIR in CLIP_benchmark's "
                        "webdataset layout (classnames.txt, zeroshot_classification_templates.txt, SPLIT/*.tar)")
    classnames = _read_lines(root / "classnames.txt", "classnames.txt",
                             "an eval set needs one class name per line in ROOT/classnames.txt")
    templates = _read_lines(root / "zeroshot_classification_templates.txt",
                            "zeroshot_classification_templates.txt",
                            "write one prompt per line with {c} for the class name")
    if not all("{c}" in t for t in templates):
        raise UserError(f"every template in {root}/zeroshot_classification_templates.txt must contain {{c}}")
    split_dir = root / split
    shards = sorted(split_dir.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    if not shards:
        available = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise UserError(f"no shards in {split_dir}; available splits: {available} (pass --split)")
    images, labels, keys = [], [], []
    for shard in shards:
        pending: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    pending.setdefault(key, {})[ext.lower()] = tf.extractfile(m).read()
        except tarfile.TarError as e:
            raise UserError(f"shard {shard} is not a readable tar ({e}); re-create it") from None
        for key, members in pending.items():
            img_ext = next((e for e in IMAGE_EXTS if e in members), None)
            if img_ext is None or "cls" not in members:
                continue
            images.append(decode_image(members[img_ext], what=f"{shard}:{key}.{img_ext}"))
            labels.append(int(members["cls"].decode().strip()))
            keys.append(key)
            if max_n is not None and len(labels) >= max_n:
                break
        if max_n is not None and len(labels) >= max_n:
            break
    if not labels:
        raise UserError(f"split {split_dir} has no (image, .cls) pairs; check the shard contents")
    labels_arr = np.asarray(labels, dtype=np.int64)
    if labels_arr.min() < 0 or labels_arr.max() >= len(classnames):
        raise UserError(f"labels in {split_dir} run outside 0..{len(classnames) - 1} (classnames.txt "
                        "has too few lines for this split)")
    return EvalSet(images, labels_arr, classnames, templates, keys, source=str(root))


def _tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime 0, root owner) so the same content gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "root", "root"
    tf.addfile(info, io.BytesIO(data))


def write_wds_evalset(root: str | Path, images: np.ndarray, labels: np.ndarray, classnames: list[str],
                      templates: list[str], split: str = "test", shard_size: int = 5000) -> None:
    """Write an eval set in CLIP_benchmark's layout with lossless PNG members."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / "classnames.txt", ("\n".join(classnames) + "\n").encode())
    atomic_write_bytes(root / "zeroshot_classification_templates.txt", ("\n".join(templates) + "\n").encode())
    n_shards = max(1, -(-len(labels) // shard_size))
    for s in range(n_shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(s * shard_size, min(len(labels), (s + 1) * shard_size)):
                _tar_member(tf, f"s{i:07d}.png", png_bytes(images[i]))
                _tar_member(tf, f"s{i:07d}.cls", f"{int(labels[i])}".encode())
        atomic_write_bytes(root / split / f"{s}.tar", buf.getvalue())
    atomic_write_bytes(root / split / "nshards.txt", f"{n_shards}\n".encode())
