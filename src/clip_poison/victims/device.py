"""Where a victim trains and in which precision, for both backends.

The device follows the machine (CUDA when torch sees one, else CPU) and the precision follows the
device unless ``TrainConfig.precision`` says otherwise: fp32 on CPU (open_clip_train's default
``amp`` is ~20x slower there, and every committed CPU result is fp32), bfloat16 autocast on CUDA.
"""
from __future__ import annotations

import torch

from ..io import UserError

# TrainConfig.precision -> open_clip_train's --precision name (the fast backend reads the same names)
PRECISIONS = {"auto": None, "fp32": "fp32", "bf16": "amp_bf16", "amp": "amp"}


def train_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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


__all__ = ["PRECISIONS", "resolve_precision", "train_device"]
