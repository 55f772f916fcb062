"""Where a victim trains and in which precision, for both backends.

The device follows the machine (CUDA when torch sees one, else CPU) and the precision follows the
device unless ``TrainConfig.precision`` says otherwise: fp32 on CPU (open_clip_train's default
``amp`` is ~20x slower there, and every committed CPU result is fp32), bfloat16 autocast on CUDA.
A run asking for several GPUs (``TrainConfig.gpus``) gets them or is refused before any work.
"""
from __future__ import annotations

import torch

from ..config import TrainConfig
from ..io import UserError

# TrainConfig.precision -> open_clip_train's --precision name (the fast backend reads the same names)
PRECISIONS = {"auto": None, "fp32": "fp32", "bf16": "amp_bf16", "amp": "amp"}


def train_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_fingerprint(device: str) -> str:
    """What fixes a device's rounding, for keys of cached numbers: "cpu", or the GPU's name and
    whether TF32 is allowed (cuDNN allows it by default, so fp32 convolutions run in TF32 there)."""
    if device == "cpu":
        return "cpu"
    return (f"{device}:{torch.cuda.get_device_name()}:tf32-matmul={torch.backends.cuda.matmul.allow_tf32}"
            f":tf32-cudnn={torch.backends.cudnn.allow_tf32}")


def resolve_precision(precision: str, device: str) -> str:
    """open_clip_train's precision name for ``TrainConfig.precision`` on ``device`` ("cpu" or "cuda")."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")
    if precision == "amp" and device != "cuda":
        raise UserError("--precision amp is float16 autocast with a gradient scaler, a CUDA mode (open_clip_train's "
                        "amp); on CPU use --precision bf16 (bfloat16 autocast) or fp32")
    if precision == "auto":
        return "amp_bf16" if device == "cuda" else "fp32"
    return PRECISIONS[precision]


def check_gpus(cfg: TrainConfig) -> None:
    """Refuse a GPU count the backend or the machine cannot give, before any work."""
    if cfg.gpus < 1:
        raise UserError(f"--gpus {cfg.gpus}: a victim trains on at least one device; use --gpus 1 (or more)")
    if cfg.gpus == 1:
        return
    if cfg.backend != "open_clip_train":
        raise UserError(f"--gpus {cfg.gpus} needs --backend open_clip_train (run under torchrun, one process per GPU); "
                        "the fast backend trains in one process on one device")
    if cfg.batch_size % cfg.gpus:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over --gpus {cfg.gpus} (each GPU takes "
                        "batch-size / gpus of every contrastive batch); pick a batch size divisible by the GPU count")
    have = torch.cuda.device_count()
    if have < cfg.gpus:
        raise UserError(f"--gpus {cfg.gpus} asks for {cfg.gpus} CUDA devices but torch sees {have} here; "
                        f"lower --gpus to {max(have, 1)}")


__all__ = ["PRECISIONS", "check_gpus", "device_fingerprint", "resolve_precision", "train_device"]
