"""The victims' one training entry point: ``train_victim`` picks a backend (``TrainConfig.backend``)."""
from __future__ import annotations

from ..config import TrainConfig
from ..io import UserError, check_distinct_targets, check_out
from .fast import train_fast
from .openclip_train import train_open_clip_train


def train_victim(train_csv, poison_dirs, cfg: TrainConfig, out, overwrite=False, progress=None,
                 fast_options=None, allow_shared_label: bool = False, objective=None) -> dict:
    """One interface, two backends (``cfg.backend``: "fast" or "open_clip_train"). Poison sets that
    attack the same label are refused unless ``allow_shared_label``. ``cfg.init`` fine-tunes a
    checkpoint on either backend; ``objective`` (a ``fast.Objective``: robust training, repair)
    replaces the CLIP loss on the fast backend only. ``cfg.defense`` (robust training) needs its
    objective, built by ``defenses.robust.objective_for(cfg)`` (victims never import defenses)."""
    check_distinct_targets(list(poison_dirs), allow_shared_label)
    check_out(out, [train_csv, *poison_dirs, *([cfg.init] if cfg.init else [])], overwrite)  # before training
    if cfg.defense != "none" and cfg.backend != "fast":
        raise UserError(f"--defense {cfg.defense} runs on --backend fast only: it re-splits the pairs before every "
                        "epoch and swaps the loss inside each step, which open_clip_train's train_one_epoch cannot "
                        "do without forking the trainer")
    if cfg.defense != "none" and objective is None:
        raise UserError(f"defense {cfg.defense!r} was asked for but no objective was passed: build it with "
                        "defenses.robust.objective_for(cfg) and pass it as objective=")
    if objective is not None and cfg.backend != "fast":
        raise UserError(f"the {objective.name} objective runs on --backend fast only: open_clip_train computes its "
                        "loss inside its own train_one_epoch, which cannot be swapped without forking the trainer")

    backends = {"fast": train_fast, "open_clip_train": train_open_clip_train}
    if cfg.backend not in backends:
        raise UserError(f"unknown backend {cfg.backend!r}; use one of {sorted(backends)}")
    if cfg.backend == "fast":
        return train_fast(train_csv, poison_dirs, cfg, out, overwrite=overwrite, progress=progress,
                          options=fast_options, objective=objective)
    return train_open_clip_train(train_csv, poison_dirs, cfg, out, overwrite=overwrite, progress=progress)


__all__ = ["train_victim"]
