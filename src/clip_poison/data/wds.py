"""Webdataset shards as img2dataset writes them: one tar per shard, members ``KEY.jpg|png``,
``KEY.txt`` (caption) and ``KEY.json`` (metadata) per sample.

Reading streams shard by shard with ``tarfile`` (never the whole dataset in memory); writing is
deterministic (mtime 0, fixed owner, sorted keys), so the same poisons give byte-identical shards.
Poisons always go to new shards beside the clean ones (DESIGN: X is never rewritten).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import braceexpand

from ..io import UserError, atomic_write_bytes, decode_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"


def expand_shards(pattern: str | Path) -> list[Path]:
    """``'dir/{0..9}.tar'`` (brace patterns, as open_clip_train and webdataset take them) or a
    folder of ``*.tar`` → the list of shard files, in pattern (or sorted) order."""
    pattern = str(pattern)
    if Path(pattern).is_dir():
        shards = sorted(Path(pattern).glob("*.tar"))
    else:
        shards = [Path(p) for part in pattern.split("::") for p in braceexpand.braceexpand(part)]
    if not shards:
        raise UserError(f"no .tar shards found for {pattern!r}; pass 'dir/{{00000..00009}}.tar' or a folder of shards")
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise UserError(f"{len(missing)} shard(s) of {pattern!r} do not exist (first: {missing[0]}); "
                        "check the brace range against the files on disk")
    return shards


def is_wds_spec(data: str | Path) -> bool:
    s = str(data)
    return s.endswith(".tar") or "{" in s or (Path(s).is_dir() and any(Path(s).glob("*.tar")))


def _split_key(name: str) -> tuple[str, str]:
    # webdataset's rule: the key is the path up to the first dot of the basename.
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


@dataclass
class WdsSample:
    key: str
    shard: str
    members: dict[str, bytes]

    @property
    def caption(self) -> str:
        if TEXT_EXT not in self.members:
            raise UserError(f"sample {self.key!r} in {self.shard} has no .txt caption; every sample needs one")
        return self.members[TEXT_EXT].decode("utf-8", errors="replace")

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.members), None)

    def image(self):
        ext = self.image_ext
        if ext is None:
            raise UserError(f"sample {self.key!r} in {self.shard} has no image member "
                            f"({'/'.join(IMAGE_EXTS)}); remove it or fix the shard")
        return decode_image(self.members[ext], what=f"image {self.key}.{ext} in {self.shard}")


def check_complete(tf: tarfile.TarFile, shard: str | Path) -> None:
    """After reading every member: tarfile stops quietly at a cut header, so a shard cut short (even
    at a member boundary, where it reads as a valid smaller tar) shows only as the missing
    end-of-archive blocks that every complete archive ends with."""
    if Path(shard).stat().st_size - tf.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError("the archive ends inside or right after a member, with no end-of-archive blocks")


def iter_samples(shards: list[Path], want: set[str] | None = None) -> Iterator[WdsSample]:
    """Stream samples shard by shard in tar order. ``want`` limits which member extensions are
    read into memory (e.g. {"txt"} to mine captions without touching image bytes)."""
    for shard in shards:
        try:
            tf = tarfile.open(shard, mode="r|*")  # stream mode: sequential, no member index in memory
        except tarfile.TarError as e:
            raise UserError(f"{shard} is not a readable tar shard ({e}); re-create it") from None
        key, members = None, {}
        try:
            with tf:
                for info in tf:
                    if not info.isfile():
                        continue
                    k, ext = _split_key(info.name)
                    if k != key:
                        if key is not None:
                            yield WdsSample(key, str(shard), members)
                        key, members = k, {}
                    if want is None or ext in want:
                        members[ext] = tf.extractfile(info).read()
                    else:
                        members.setdefault(ext, b"")
                check_complete(tf, shard)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{shard} is truncated or corrupt ({type(e).__name__}: {e}); re-create it") from None
        if key is not None:
            yield WdsSample(key, str(shard), members)


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tf.addfile(info, io.BytesIO(data))


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """One deterministic tar of (name, bytes) members in the order given, fixed metadata (mtime 0,
    root owner), so the same content gives byte-identical shards."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            _member(tf, name, data)
    return buf.getvalue()


def shard_bytes(samples: dict[str, dict[str, bytes]]) -> bytes:
    """One deterministic tar: keys sorted, members of a key sorted by extension."""
    return tar_bytes((f"{key}.{ext}", samples[key][ext]) for key in sorted(samples) for ext in sorted(samples[key]))


def write_shards(folder: str | Path, samples: dict[str, dict[str, bytes]], prefix: str = "poisons",
                 shard_size: int = 10_000) -> list[str]:
    """Write ``samples`` (key -> {ext: bytes}) as ``prefix-000000.tar``, … (sorted keys,
    ``shard_size`` per shard); returns the shard file names."""
    keys = sorted(samples)
    names = []
    for s, start in enumerate(range(0, max(1, len(keys)), shard_size)):
        name = f"{prefix}-{s:06d}.tar"
        atomic_write_bytes(Path(folder) / name, shard_bytes({k: samples[k] for k in keys[start:start + shard_size]}))
        names.append(name)
    return names


def sample_members(image_png: bytes, caption: str, meta: dict | None = None) -> dict[str, bytes]:
    """The members of one sample in img2dataset's layout (PNG instead of JPEG: lossless triggers)."""
    out = {"png": image_png, TEXT_EXT: caption.encode("utf-8")}
    if meta is not None:
        out["json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def csv_to_shards(csv_path: str | Path, out_dir: str | Path, shard_size: int = 1000) -> list[Path]:
    """Copy an OpenCLIP CSV dataset into img2dataset-style shards ``00000.tar``, … (image bytes
    kept as they are, keys ``SSSSSIIII`` as img2dataset numbers them). For trying the webdataset
    path on CSV data such as the embedded world; the CSV is only read."""
    from .csvdata import read_csv_dataset

    ds = read_csv_dataset(csv_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for s, start in enumerate(range(0, len(ds), shard_size)):
        samples = {}
        for i in range(start, min(len(ds), start + shard_size)):
            key = f"{s:05d}{i - start:04d}"
            ext = Path(ds.paths[i]).suffix.lstrip(".").lower() or "png"
            samples[key] = {ext: Path(ds.paths[i]).read_bytes(), TEXT_EXT: ds.captions[i].encode("utf-8"),
                            "json": json.dumps({"key": key, "caption": ds.captions[i]}, sort_keys=True).encode()}
        path = out_dir / f"{s:05d}.tar"
        atomic_write_bytes(path, shard_bytes(samples))
        written.append(path)
    return written
