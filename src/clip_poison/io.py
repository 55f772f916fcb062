"""Atomic writes, hashing, manifests and the user-facing error type.

Every file clip-poison writes goes through here: a temporary name in the same folder, then
``os.replace``, so a failed or killed command never leaves a half-written output behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix (CLI exits 2)."""


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """A numpy Generator derived from (seed, purpose).

    Each random step draws from its own stream, so adding a new random step somewhere does not
    shift the numbers every other step sees (DESIGN: determinism).
    """
    digest = hashlib.sha256(f"{int(seed)}:{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_pixels(pixels: np.ndarray) -> str:
    """Hash of decoded pixels (shape + bytes), the key of exact-duplicate image filters."""
    arr = np.ascontiguousarray(pixels)
    return hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()


def sha256_tree(root: str | os.PathLike) -> str:
    """One hash over every file (path + bytes) under ``root``; used to prove inputs are untouched."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless, deterministic PNG encoding of an HxWx3 uint8 array (no timestamps in PNG)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Decode image bytes to HxWx3 uint8, with a teaching error for corrupt files."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as e:  # PIL raises many types for corrupt data
        raise UserError(f"{what} could not be decoded as an image ({type(e).__name__}: {e}); "
                        "remove or re-encode that file and run again") from None


def load_image(path: str | os.PathLike) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"image file not found: {p}; check the path column of your dataset "
                        "(relative paths are resolved against the CSV's folder)")
    return decode_image(p.read_bytes(), what=f"image {p}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, dumps_json(obj).encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {p} is not valid JSON ({e}); regenerate it") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only on success."""
    path = Path(path)
    occupied = any(path.iterdir()) if path.is_dir() else path.exists()
    if occupied:
        if not overwrite:
            raise UserError(f"output {path} already exists and is not empty; "
                            "choose a new --out or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on (recorded in every output)."""
    from importlib import metadata

    out = {}
    for name in ("clip-poison", "torch", "torchvision", "open_clip_torch", "numpy", "webdataset",
                 "scikit-learn", "scipy", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    import platform
    out["python"] = platform.python_version()
    return out
