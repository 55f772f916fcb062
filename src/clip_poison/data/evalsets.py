"""Labelled evaluation sets: images + labels + class names + prompt templates.

The on-disk layout is CLIP_benchmark's webdataset one, so the embedded world's eval split, the
shared CIFAR-10 copy and any user's existing CLIP_benchmark data load the same way::

    ROOT/classnames.txt                           one class name a line
    ROOT/zeroshot_classification_templates.txt    one prompt a line, {c} for the class name
    ROOT/SPLIT/nshards.txt, ROOT/SPLIT/0.tar ...  members KEY.png|jpg|webp + KEY.cls

ImageFolder trees (ImageNet layout, ``ROOT/SPLIT/CLASS/*.jpg``) load too; ``load_evalset``
detects which layout a folder holds.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import UserError, atomic_write_bytes, decode_image, png_bytes
from .wds import IMAGE_EXTS, iter_samples, tar_bytes


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
    split: str = ""

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
    n_shards, expected = split_counts(split_dir)
    if n_shards is not None and n_shards != len(shards):
        raise UserError(f"{split_dir}/nshards.txt says {n_shards} shards but {len(shards)} are there "
                        f"({[p.name for p in shards][:10]}); restore the missing shards or re-create the split")
    images, labels, keys = [], [], []
    per_shard: dict[str, int] = {}
    for shard in shards:
        start = len(labels)
        # Every shard read is read whole, so a cut one is refused even when max_n stops inside it.
        for s in iter_samples([shard]):
            img_ext = s.image_ext
            if img_ext is None or "cls" not in s.members or (max_n is not None and len(labels) >= max_n):
                continue
            images.append(s.image())
            try:
                labels.append(int(s.members["cls"].decode().strip()))
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"{shard}:{s.key}.cls holds {s.members['cls'][:40]!r}, not a class index; each .cls "
                                "must hold one whole number (a line of classnames.txt, counting from 0)") from None
            keys.append(s.key)
        per_shard[shard.name] = len(labels) - start
        if max_n is not None and len(labels) >= max_n:
            break
    if max_n is None and expected is not None and len(labels) != expected:
        # A shard cut at a member boundary is a valid smaller tar: only the recorded count shows it.
        raise UserError(f"split {split_dir} holds {len(labels)} labelled images but its metadata says {expected} "
                        f"(images per shard: {dict(list(per_shard.items())[:20])}); a shard is short or damaged: "
                        "re-create or re-download the split")
    if not labels:
        raise UserError(f"split {split_dir} has no (image, .cls) pairs; check the shard contents")
    labels_arr = np.asarray(labels, dtype=np.int64)
    if labels_arr.min() < 0 or labels_arr.max() >= len(classnames):
        raise UserError(f"labels in {split_dir} run outside 0..{len(classnames) - 1} (classnames.txt "
                        "has too few lines for this split)")
    return EvalSet(images, labels_arr, classnames, templates, keys, source=str(root), split=split)


def split_counts(split_dir: Path) -> tuple[int | None, int | None]:
    """(shards, samples) a CLIP_benchmark split records: ``nshards.txt``; ``count.txt`` (written by
    DataComp-style conversions and by ``write_wds_evalset``) or else a ``manifest.tsv`` with a
    header and one line per sample. None where the split does not say."""
    def number(name: str) -> int | None:
        p = split_dir / name
        try:
            return int(p.read_text().strip()) if p.is_file() else None
        except ValueError:
            raise UserError(f"{p} should hold one whole number; fix or delete it") from None

    count = number("count.txt")
    if count is None and (split_dir / "manifest.tsv").is_file():
        lines = [ln for ln in (split_dir / "manifest.tsv").read_text().splitlines() if ln.strip()]
        count = len(lines) - bool(lines and lines[0].split("\t")[0] == "key")  # less a header line
    return number("nshards.txt"), count


def write_wds_evalset(root: str | Path, images: np.ndarray, labels: np.ndarray, classnames: list[str],
                      templates: list[str], split: str = "test", shard_size: int = 5000) -> None:
    """Write an eval set in CLIP_benchmark's layout with lossless PNG members."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / "classnames.txt", ("\n".join(classnames) + "\n").encode())
    atomic_write_bytes(root / "zeroshot_classification_templates.txt", ("\n".join(templates) + "\n").encode())
    n_shards = max(1, -(-len(labels) // shard_size))
    for s in range(n_shards):
        rows = range(s * shard_size, min(len(labels), (s + 1) * shard_size))
        atomic_write_bytes(root / split / f"{s}.tar", tar_bytes(
            (name, data) for i in rows
            for name, data in ((f"s{i:07d}.png", png_bytes(images[i])), (f"s{i:07d}.cls", f"{int(labels[i])}".encode()))))
    atomic_write_bytes(root / split / "nshards.txt", f"{n_shards}\n".encode())
    atomic_write_bytes(root / split / "count.txt", f"{len(labels)}\n".encode())


# ---------------------------------------------------------------------------------------------
# ImageFolder trees (ImageNet layout) and layout detection

TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def default_templates() -> list[str]:
    """open_clip's 80 OpenAI ImageNet prompts as ``{c}`` strings (CLIP_benchmark's placeholder)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def _templates_for(root: Path, templates: str | Path | list[str] | None) -> list[str]:
    if isinstance(templates, (list, tuple)):
        out = [str(t) for t in templates]
    elif templates is not None:
        out = _read_lines(Path(templates), "templates file", "pass a file with one prompt per line, {c} for the class")
    elif (root / TEMPLATES_FILE).is_file():
        out = _read_lines(root / TEMPLATES_FILE, TEMPLATES_FILE, "write one prompt per line with {c} for the class name")
    else:
        return default_templates()
    bad = [t for t in out if "{c}" not in t]
    if bad:
        raise UserError(f"templates {bad[:3]} lack the {{c}} placeholder; write prompts like 'a photo of a {{c}}.'")
    return out


def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS


def _class_dirs(d: Path) -> list[tuple[Path, list[Path]]]:
    """Class sub-folders in sorted name order (torchvision ImageFolder's label order), with their
    images (sorted, recursive); folders holding no image are skipped."""
    dirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    pairs = [(c, sorted(p for p in c.rglob("*") if _is_image_file(p))) for c in dirs]
    return [(c, files) for c, files in pairs if files]


def _imagefolder_dir(root: Path, split: str) -> Path | None:
    """ROOT/SPLIT/CLASS/*.jpg, else ROOT/CLASS/*.jpg (when ROOT has no SPLIT folder), else None."""
    if (root / split).is_dir() and _class_dirs(root / split):
        return root / split
    if not (root / split).exists() and _class_dirs(root):
        return root
    return None


def load_imagefolder_evalset(root: str | Path, split: str = "test", max_n: int | None = None,
                             templates: str | Path | list[str] | None = None) -> EvalSet:
    """An ImageNet-layout eval set: ``ROOT/SPLIT/CLASS/*.jpg`` or ``ROOT/CLASS/*.jpg``.

    Labels follow the sorted class-folder names (torchvision's ImageFolder order). Class names come
    from ``ROOT/classnames.txt`` (line i names folder i, for folders like ``n01440764``) or else
    from the folder names with ``_`` read as a space. Prompts come from ``templates`` (a file or a
    list), else ``ROOT/zeroshot_classification_templates.txt``, else open_clip's 80 ImageNet ones.

    Images are ordered round-robin over classes (1st image of each class, then the 2nd, ...) so
    the first ``max_n`` are class-balanced and image i is the same whatever ``max_n`` is.
    """
    root = Path(root)
    d = _imagefolder_dir(root, split) if root.is_dir() else None
    if d is None:
        raise UserError(f"{root} holds no ImageFolder tree for split {split!r}: expected "
                        f"{root}/{split}/CLASS/*.jpg or {root}/CLASS/*.jpg; point --eval-root at such a folder")
    classes = _class_dirs(d)
    folder_names = [c.name for c, _ in classes]
    if (root / "classnames.txt").is_file():
        classnames = _read_lines(root / "classnames.txt", "classnames.txt", "write one class name per line")
        if len(classnames) != len(classes):
            raise UserError(f"{root}/classnames.txt has {len(classnames)} names but {d} has {len(classes)} class "
                            "folders holding images; write one name per folder, in sorted folder order")
    else:
        classnames = [n.replace("_", " ") for n in folder_names]
    prompts = _templates_for(root, templates)
    order = [(lab, fs[rank]) for rank in range(max(len(fs) for _, fs in classes))
             for lab, (_, fs) in enumerate(classes) if rank < len(fs)]
    if max_n is not None:
        order = order[:max_n]
    images = [decode_image(f.read_bytes(), what=f"image {f}") for _, f in order]
    labels = np.asarray([lab for lab, _ in order], dtype=np.int64)
    keys = [str(f.relative_to(d)) for _, f in order]
    return EvalSet(images, labels, classnames, prompts, keys, source=str(root), split=split)


def evalset_layout(root: str | Path, split: str = "test") -> str:
    """"wds" (CLIP_benchmark webdataset) or "imagefolder"; a teaching UserError for anything else."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"eval set folder not found: {root}; pass a CLIP_benchmark webdataset folder "
                        "(classnames.txt, SPLIT/*.tar) or an ImageFolder tree (SPLIT/CLASS/*.jpg)")
    if any((root / split).glob("*.tar")):
        return "wds"
    if _imagefolder_dir(root, split) is not None:
        return "imagefolder"
    splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    raise UserError(f"{root} has no split {split!r} in either layout: neither {root}/{split}/*.tar "
                    f"(CLIP_benchmark webdataset) nor {root}/{split}/CLASS/*.jpg (ImageFolder); "
                    f"sub-folders there: {splits}. Pass --split, or point at the right folder")


def load_evalset(root: str | Path, split: str = "test", max_n: int | None = None,
                 templates: str | Path | list[str] | None = None) -> EvalSet:
    """Any labelled eval set, its layout detected: CLIP_benchmark webdataset or ImageFolder."""
    if max_n is not None and max_n < 1:
        raise UserError(f"max_n={max_n} must be a positive number of images (or None for all)")
    if evalset_layout(root, split) == "wds":
        ev = load_wds_evalset(root, split, max_n)
        if templates is not None:
            ev.templates = _templates_for(Path(root), templates)
        return ev
    return load_imagefolder_evalset(root, split, max_n, templates)


def evalset_identity(ev: EvalSet) -> dict:
    """What makes two eval sets the same for caching: source, split, size, a hash of the keys and
    labels (a re-ordered or re-labelled set is a different one) and one hash of every decoded image
    (names alone once served a changed set's stale embeddings: 0.70 accuracy for a true 0.16)."""
    h, px = hashlib.sha256(), hashlib.sha256()
    for k, lab in zip(ev.keys, ev.labels.tolist()):
        h.update(f"{k}\t{lab}\n".encode())
    for im in ev.images:
        im = np.ascontiguousarray(im)
        px.update(str(im.shape).encode())
        px.update(im)
    return {"source": str(Path(ev.source).resolve()) if ev.source else "", "split": ev.split,
            "n": len(ev), "keys_sha256": h.hexdigest(), "pixels_sha256": px.hexdigest()}
