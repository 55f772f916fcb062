"""Atomic writes, hashing, manifests and the user-facing error type.

Every file clip-poison writes goes through here: a temporary name in the same folder, then
``os.replace``, so a failed or killed command never leaves a half-written output behind.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
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
            if im.mode.startswith("I") or im.mode == "F":
                # convert("RGB") clips these at 255, so a 16-bit PNG decodes white: scale 16-bit
                # integers (I;16*, and I, which 16-bit PNGs also open as) and 0..1 floats to 8 bit.
                a = np.asarray(im, dtype=np.float64) * (255.0 if im.mode == "F" else 255.0 / 65535.0)
                if a.size and (a.min() < 0 or a.max() > 255.0 + 1e-9):
                    raise ValueError(f"mode {im.mode} values outside the 16-bit (or 0..1 float) range")
                return np.repeat(np.rint(a).astype(np.uint8)[..., None], 3, axis=2)
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


# One of these in a folder marks it as a clip-poison output (world, poison set, checkpoint, demo),
# the only kind of folder --overwrite may delete.
OUTPUT_MARKERS = ("world.json", "manifest.json", "train.json", "open_clip_config.json", "summary.json", "scan.json")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, s3://, https:// ...


def check_out(out: str | os.PathLike, inputs=(), overwrite: bool = False, file: bool = False) -> None:
    """Refuse, before any work, an output that would replace or sit inside an input, replace a file
    with a folder (or a folder with a file), replace anything without ``overwrite``, or cannot be
    written. ``--overwrite`` deletes the old output, so an input must never be one."""
    o = Path(out).resolve()
    for given in inputs:
        for part in ([] if given is None else str(given).split("::")):
            if not part or URL_SCHEME.match(part):
                continue  # a URL is not a local path to protect
            shards = "{" in part  # 'dir/{0..9}.tar': the shards' folder is the input
            p = Path(os.path.dirname(part.split("{")[0]) or "." if shards else part).resolve()
            home = p.parent if p.is_file() else p  # a CSV's images sit beside it: its folder is the dataset
            if o == p or home.is_relative_to(o) or (p.is_dir() and not shards and o.is_relative_to(p)):
                rel = "is" if o == p else "contains" if home.is_relative_to(o) else "is inside"
                raise UserError(f"--out {out} {rel} the input {given}; inputs are never modified or deleted, "
                                "so choose an --out outside every input")
    if o.exists() and o.is_dir() != (not file):
        raise UserError(f"--out {out} is a {'folder' if file else 'file'}; it is never replaced by a "
                        f"{'file' if file else 'folder'}, so choose a new --out")
    if (any(o.iterdir()) if o.is_dir() else o.exists()) and not overwrite:
        raise UserError(f"output {out} already exists{' and is not empty' if o.is_dir() else ''}; "
                        "choose a new --out or pass --overwrite")
    if o.is_dir() and any(o.iterdir()) and not any((o / m).is_file() for m in OUTPUT_MARKERS):
        raise UserError(f"--out {out} is a folder clip-poison did not write (none of {', '.join(OUTPUT_MARKERS)}); "
                        "--overwrite only replaces clip-poison outputs, so choose a new --out or empty it yourself")
    parent = next(a for a in o.parents if a.exists())
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {parent} is not a writable folder ({e.strerror}); "
                        "choose an --out in a folder you can write to") from None


def _clean_stale_partials(path: Path, max_age_s: float = 600) -> None:
    """Remove ``.NAME.PID@HOST.*.partial`` folders left by a killed run whose process is gone. A
    live owner (a concurrent run on this host, however long it trains) or another host's run is
    never touched; leftovers without an owner in the name only once they are older than max_age_s."""
    host = socket.gethostname()
    for d in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        m = re.fullmatch(rf"\.{re.escape(path.name)}\.(?:(\d+)@(.+)\.)?[a-z0-9_]+\.partial", d.name)
        if m is None:
            continue  # another output's (a longer name with this one as prefix)
        try:
            stale = (m.group(2) == host and not _alive(int(m.group(1)))) if m.group(1) else \
                time.time() - d.stat().st_mtime > max_age_s
        except OSError:
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # another user's process
    return True


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only on success."""
    path = Path(path)
    check_out(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(path)
    # The owner's pid and host in the name let the next run tell a killed run's leftovers from a live one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}@{socket.gethostname()}.", suffix=".partial",
                                dir=path.parent))
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
                 "scikit-learn", "scipy", "pillow", "faiss-cpu", "imagehash"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    import platform
    out["python"] = platform.python_version()
    return out


# ---------------------------------------------------------------------------------------------
# The poison-set contract: what attacks write and victims and metrics read (``manifest.json``).

MANIFEST = "manifest.json"


def read_manifest(poison_dir: str | Path) -> dict:
    """The manifest of a poison set, validated: every reader of manifests goes through here."""
    p = Path(poison_dir)
    if not p.is_dir():
        raise UserError(f"poison set folder not found: {p}; make one with `clip-poison poison targeted|backdoor|text`")
    return check_manifest(p, read_json(p / MANIFEST, what="poison manifest"))


def check_manifest(poison_dir: Path, m) -> dict:
    """A poison set may come from someone else, so its manifest may name only plain files inside its
    own folder: shard names reach webdataset, which runs ``pipe:`` URLs through a shell and splits
    ``::``; the CSV is opened and read."""
    where = f"poison manifest {poison_dir / MANIFEST}"
    fmt = m.get("format", "csv") if isinstance(m, dict) else None
    names = [m.get("csv")] if fmt == "csv" else m.get("shards") if fmt == "wds" else None
    if not isinstance(names, list) or not names or not isinstance(m.get("attack"), str):
        raise UserError(f"{where} is not a clip-poison manifest (no attack, format and csv/shards); "
                        "re-craft the poison set with `clip-poison poison`")
    root = poison_dir.resolve()
    for name in names:
        ok = isinstance(name, str) and name and "::" not in name and not URL_SCHEME.match(name) \
            and not Path(name).is_absolute() and ".." not in Path(name).parts
        if not ok or not (root / name).resolve().is_relative_to(root) or not (root / name).is_file():
            raise UserError(f"{where} names {name!r}, which is not a file inside {poison_dir}; a poison set may "
                            "name only its own files (no URLs, '::', absolute paths or '..'), so re-craft it with "
                            "`clip-poison poison` or remove it from --poisons")
    return m


def target_labels(manifest: dict) -> list[str]:
    """Every y' a poison set attacks (a multi-target set lists its targets)."""
    return [t["label"] for t in manifest.get("targets") or [manifest["target"]]]


def check_distinct_targets(poison_dirs: list[str | Path], allow_shared: bool = False) -> None:
    """Refuse to train one victim on two poison sets that attack the same label: its ASR would be
    the two attacks together and measure neither (unless the user asks for exactly that)."""
    seen: dict[str, str] = {}
    for d in poison_dirs:
        for label in target_labels(read_manifest(d)):
            if label in seen and not allow_shared:
                raise UserError(f"poison sets {seen[label]} and {d} both target {label!r}; a victim trained on both "
                                "measures neither attack alone. Train one victim per attack, give the attacks distinct "
                                "--label values, or pass --allow-shared-label to combine them on purpose")
            seen.setdefault(label, str(d))


def check_stamped_size(manifest: dict, image_size: int, where) -> None:
    """Refuse a backdoor set stamped at another input size than the model's: training would resample
    its exact trigger cells into grey, and evaluation would stamp a patch that covers another
    fraction of the image (or a full-image pattern made for another size) than the poisons did."""
    stamped = (manifest.get("trigger") or {}).get("image_size")
    if manifest.get("attack") == "backdoor" and stamped is not None and int(stamped) != int(image_size):
        raise UserError(f"backdoor poison set {where} was stamped at {stamped}x{stamped} px but the model's input is "
                        f"{image_size}x{image_size} px; re-craft it for this model "
                        "(`clip-poison poison backdoor --model MODEL ...`)")


def resize_to_input(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to the model's input size the way open_clip's eval transform does (bicubic resize of
    the shortest side, then centre crop), so a trigger stamped afterwards is not resampled."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    # torchvision's own Resize + CenterCrop, as open_clip's eval transform: a hand-rolled version
    # rounded the long side (43 px, not 42, for 48x64) and moved every pixel of non-square bases.
    im = CenterCrop(size)(Resize(size, interpolation=InterpolationMode.BICUBIC)(Image.fromarray(image)))
    return np.asarray(im, dtype=np.uint8)
