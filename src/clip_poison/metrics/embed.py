"""Image embeddings f(x) and f(x ⊕ bd) for an eval set, computed once and cached on disk.

The trigger is stamped on the tensor *after* the eval transform has resized and cropped the image
to the model's input size and *before* normalisation, so a 1-pixel checker cell stays exact.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Compose, Normalize

from ..io import atomic_write_bytes


def split_preprocess(preprocess: Compose) -> tuple[Compose, Normalize]:
    """open_clip's eval transform is Resize, CenterCrop, RGB, ToTensor, Normalize; we need to act
    between ToTensor and Normalize."""
    steps = list(preprocess.transforms)
    if not isinstance(steps[-1], Normalize):
        raise ValueError("expected open_clip's eval transform to end with Normalize")
    return Compose(steps[:-1]), steps[-1]


@torch.no_grad()
def embed_images(model, preprocess: Compose, images: list[np.ndarray], patch: np.ndarray | None = None,
                 positions: list[tuple[int, int]] | None = None, batch_size: int = 256) -> np.ndarray:
    """L2-normalised image embeddings (N x d float32); with ``patch``, of x ⊕ bd at ``positions``."""
    to_tensor, normalize = split_preprocess(preprocess)
    patch_t = None if patch is None else torch.from_numpy(patch).permute(2, 0, 1).float() / 255.0
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = []
        for i in range(start, min(len(images), start + batch_size)):
            t = to_tensor(Image.fromarray(images[i]))
            if patch_t is not None:
                y, x = positions[i]
                s = patch_t.shape[1]
                t[:, y:y + s, x:x + s] = patch_t
            batch.append(normalize(t))
        feats = model.encode_image(torch.stack(batch).to(device), normalize=True)
        out.append(feats.float().cpu().numpy())
    return np.concatenate(out)


class EmbeddingCache:
    """Embeddings keyed by (checkpoint, eval set, trigger, placement) under ``root`` as .npy."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None

    def get(self, key: dict, compute):
        if self.root is None:
            return compute()
        name = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]
        path = self.root / f"{name}.npy"
        if path.is_file():
            return np.load(path)
        arr = compute()
        import io
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(path, buf.getvalue())
        return arr
