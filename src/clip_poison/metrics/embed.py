"""Image embeddings f(x) and f(x ⊕ bd) for an eval set, computed once and cached on disk.

The trigger is stamped *after* the eval transform has resized and cropped the image to the model's
input size and *before* normalisation, on the uint8 pixels with the same ``Trigger.stamp`` that made
the poisons, so a 1-pixel checker cell or a blended pixel is exactly what a poison PNG stores.

Two ways to the model's input tensor, with bit-identical results: open_clip's own PIL transform
image by image, or — when every image is already at the input size, where Resize and CenterCrop
are the identity — one vectorised uint8 → float ÷ 255 → Normalize over the whole batch (the
same arithmetic ToTensor and Normalize do, so the tensors are equal bit for bit; tested).
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize

from ..io import atomic_write_bytes, dumps_json, sha256_pixels

# bump when the embedding computation or the key changes, so stale caches miss (2: keyed on eval
# pixels, the checkpoint's preprocess_cfg and the trigger's pixels, not on names)
CACHE_VERSION = 2


def split_preprocess(preprocess: Compose) -> tuple[Compose, Normalize]:
    """open_clip's eval transform is Resize, CenterCrop, RGB, ToTensor, Normalize; we need to act
    between ToTensor and Normalize."""
    steps = list(preprocess.transforms)
    if not isinstance(steps[-1], Normalize):
        raise ValueError("expected open_clip's eval transform to end with Normalize")
    return Compose(steps[:-1]), steps[-1]


def _size_pair(size) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 1:
        return int(size[0]), int(size[0])
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def identity_input_size(preprocess: Compose) -> tuple[int, int] | None:
    """(H, W) at which open_clip's eval transform leaves an RGB image untouched until ToTensor
    (a shortest-side Resize to S and a CenterCrop to S×S both return an S×S image as it is), or
    None if the transform has any other step that could change pixels."""
    steps = list(preprocess.transforms)[:-1]
    hw = None
    for s in steps:
        name = type(s).__name__
        if isinstance(s, Resize):
            size = _size_pair(s.size)
            if size is None or size[0] != size[1] or s.max_size is not None:
                return None
            hw = size if hw is None or hw == size else None
        elif isinstance(s, CenterCrop):
            size = _size_pair(s.size)
            hw = size if hw is None or hw == size else None
        elif name in ("MaybeConvertMode", "MaybeToTensor", "ToTensor") or getattr(s, "__name__", "") == "_convert_to_rgb":
            continue
        else:
            return None
        if hw is None:
            return None
    return hw


def _to_float(images: list[np.ndarray]) -> torch.Tensor:
    # ToTensor's arithmetic; contiguous NCHW like it: a channels-last view would send conv down another kernel
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float().div(255)


def _batch_tensor_fast(images: list[np.ndarray], normalize: Normalize) -> tuple[torch.Tensor, Callable]:
    x = _to_float(images)
    mean = torch.as_tensor(normalize.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(normalize.std, dtype=x.dtype).view(1, -1, 1, 1)
    return x, lambda t: t.sub_(mean).div_(std)


@torch.no_grad()
def embed_images(model, preprocess: Compose, images: list[np.ndarray], trigger=None,
                 positions: list[tuple[int, int]] | None = None, batch_size: int = 256,
                 vectorised: bool | None = None) -> np.ndarray:
    """L2-normalised image embeddings (N x d float32); with ``trigger`` (an ``attacks.triggers.Trigger``),
    of x ⊕ bd at ``positions`` (per image: the patch's top-left, or the pattern's shift).

    ``vectorised``: None picks the batched tensor path whenever it gives the same tensors as the
    PIL path (all images H×W×3 uint8 at the input size); False forces open_clip's PIL path.
    """
    to_tensor, normalize = split_preprocess(preprocess)
    hw = identity_input_size(preprocess)
    can_fast = hw is not None and all(im.shape == (*hw, 3) and im.dtype == np.uint8 for im in images)
    if vectorised and not can_fast:
        raise ValueError("the vectorised path needs every image H×W×3 uint8 at the model's input size")
    fast = can_fast if vectorised is None else bool(vectorised)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        idx = range(start, min(len(images), start + batch_size))
        if fast:
            batch = [images[i] if trigger is None else trigger.stamp(images[i], positions[i]) for i in idx]
            x, norm = _batch_tensor_fast(batch, normalize)
        else:
            x, norm = torch.stack([to_tensor(Image.fromarray(images[i])) for i in idx]), None
            if trigger is not None:
                # back to the uint8 pixels ToTensor divided by 255 (v/255·255 rounds to v exactly),
                # stamped there, then divided again: the tensor of the stamped image, bit for bit
                u8 = x.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                x = _to_float([trigger.stamp(u8[row], positions[i]) for row, i in enumerate(idx)])
        x = norm(x) if fast else torch.stack([normalize(t) for t in x])
        feats = model.encode_image(x.to(device), normalize=True)
        out.append(feats.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def cache_key(weights_sha256: str, evalset_identity: dict, trigger=None, placement: str | None = None,
              seed: int | None = None, preprocess_cfg: dict | None = None, device: str = "cpu") -> dict:
    """Everything the embeddings depend on: the checkpoint's weights and ``preprocess_cfg`` (size,
    mean/std, interpolation: open_clip_config.json), the eval set (its identity, which includes a
    hash of the decoded pixels: names alone once served a changed set's stale embeddings), and
    for triggered images the trigger's (an ``attacks.triggers.Trigger``) actual pixels and parameters
    (so a redefined trigger misses), placement and the seed of random positions. Clean embeddings do not depend on placement or seed.
    ``device``: where the embeddings were computed (``victims.device.device_fingerprint``: a GPU's
    kernels, and TF32, round differently from the CPU's); CPU keys are as before devices were keyed,
    so their caches still hit."""
    key = {"version": CACHE_VERSION, "weights_sha256": weights_sha256, "preprocess_cfg": preprocess_cfg,
           "evalset": evalset_identity, "trigger": None, "placement": None, "seed": None}
    if device != "cpu":
        key["device"] = device
    if trigger is not None:
        # a patch trigger's key is as before full-image triggers existed, so its caches still hit
        key.update(trigger={"name": trigger.name, "patch_size": trigger.patch_size,
                            "pixels_sha256": sha256_pixels(trigger.pixels),
                            **({"params": trigger.params} if trigger.params else {})},
                   placement=placement, seed=None if placement == "consistent" else seed)
    return key


class EmbeddingCache:
    """Embeddings on disk under ``root`` as ``<hash of key>.npy`` plus the key as ``.json``.

    Writes are atomic (temp name + rename), so a killed evaluation never leaves a half-written
    array; ``root=None`` disables caching. ``hits``/``misses`` count lookups (for tests and logs).
    """

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None
        self.hits = self.misses = 0

    def path_for(self, key: dict) -> Path | None:
        if self.root is None:
            return None
        name = hashlib.sha256(dumps_json(key).encode()).hexdigest()[:24]
        return self.root / f"{name}.npy"

    def get(self, key: dict, compute: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.path_for(key)
        if path is not None and path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
                if arr.ndim == 2 and len(arr) == key.get("evalset", {}).get("n", len(arr)):
                    self.hits += 1
                    return arr
            except (OSError, ValueError):
                pass  # unreadable or truncated by something outside us: recompute and replace it
        self.misses += 1
        arr = np.ascontiguousarray(compute(), dtype=np.float32)
        if path is not None:
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            try:
                atomic_write_bytes(path, buf.getvalue())
                atomic_write_bytes(path.with_suffix(".json"), (json.dumps(key, indent=2, sort_keys=True) + "\n").encode())
            except OSError:
                pass  # a read-only checkpoint folder: evaluate anyway, uncached
        return arr
