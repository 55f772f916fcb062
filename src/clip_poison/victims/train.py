"""The victims' one training entry point: ``train_victim`` picks a backend (``TrainConfig.backend``)."""
from __future__ import annotations

from ..config import TrainConfig
from ..io import UserError, check_distinct_targets, check_out
from .fast import train_fast
from .openclip_train import train_open_clip_train


def train_victim(train_csv, poison_dirs, cfg: TrainConfig, out, overwrite=False, progress=None,
                 fast_options=None, allow_shared_label: bool = False) -> dict:
    """One interface, two backends (``cfg.backend``: "fast" or "open_clip_train"). Poison sets that
    attack the same label are refused unless ``allow_shared_label``."""
    check_distinct_targets(list(poison_dirs), allow_shared_label)
    check_out(out, [train_csv, *poison_dirs], overwrite)  # before training, not after it

    backends = {"fast": train_fast, "open_clip_train": train_open_clip_train}
    if cfg.backend not in backends:
        raise UserError(f"unknown backend {cfg.backend!r}; use one of {sorted(backends)}")
    if cfg.backend == "fast":
        return train_fast(train_csv, poison_dirs, cfg, out, overwrite=overwrite, progress=progress,
                          options=fast_options)
    return train_open_clip_train(train_csv, poison_dirs, cfg, out, overwrite=overwrite, progress=progress)


__all__ = ["train_victim"]
