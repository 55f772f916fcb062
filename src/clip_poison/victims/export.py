"""Checkpoints as plain open_clip ``local-dir:`` folders (loadable without clip-poison).

    DIR/open_clip_config.json      {"model_cfg": ..., "preprocess_cfg": ...}
    DIR/open_clip_pytorch_model.bin   the state dict (open_clip finds weights by this name; a
                                      ``.pt`` file would be ignored and the model silently random)
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ..io import UserError, atomic_write_bytes, atomic_write_json, read_json

WEIGHTS = "open_clip_pytorch_model.bin"
CONFIG = "open_clip_config.json"


def preprocess_cfg(image_size: int) -> dict:
    return {"size": image_size, "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def export_local_dir(model_cfg: dict, state_dict: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    size = model_cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buf)
    atomic_write_bytes(out_dir / WEIGHTS, buf.getvalue())
    atomic_write_json(out_dir / CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(size)})
    return out_dir


def init_weights(init: str | Path, model_cfg: dict, model_name: str) -> tuple[dict, dict]:
    """The state dict a fine-tune starts from (``train --init``), checked against the model to be
    trained: a local-dir checkpoint (its ``open_clip_config.json`` must hold the same architecture
    and input size) or a bare weights file (every tensor's name and shape must match). Returns the
    state dict and what ``train.json`` records about it (path and weights hash)."""
    from ..io import sha256_file

    p = Path(init)
    weights = p / WEIGHTS if p.is_dir() else p
    if p.is_dir():
        if not (p / CONFIG).is_file() or not weights.is_file():
            raise UserError(f"--init {p} is a folder but not an open_clip local-dir checkpoint ({CONFIG} + {WEIGHTS}); "
                            "pass the folder `clip-poison train` wrote, or a weights file")
        theirs = read_json(p / CONFIG).get("model_cfg", {})
        if theirs != model_cfg:
            size = lambda c: c.get("vision_cfg", {}).get("image_size")  # noqa: E731
            what = (f"input size {size(theirs)} px, not {size(model_cfg)} px" if size(theirs) != size(model_cfg)
                    else "another architecture (its model_cfg differs)")
            raise UserError(f"--init {p} is a checkpoint of {what} than --model {model_name}; fine-tune it with the "
                            "--model it was trained as, or start from scratch")
    elif not p.is_file():
        raise UserError(f"--init {p} does not exist; pass a local-dir checkpoint folder or an open_clip weights file")
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"--init {weights} is not a readable torch weights file ({type(e).__name__}); "
                        "pass the folder `clip-poison train` wrote") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--init {weights} holds no state dict of tensors; pass an open_clip checkpoint")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    ref = {k: tuple(v.shape) for k, v in open_clip.create_model(model_name, device="meta").state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != ref:
        bad = sorted(set(ref) ^ set(got)) or sorted(k for k in ref if ref[k] != got[k])
        raise UserError(f"--init {weights} does not fit --model {model_name} (another architecture or input size; "
                        f"first difference: {bad[0]} {got.get(bad[0])} vs {ref.get(bad[0])}); fine-tune with the "
                        "--model it was trained as")
    return sd, {"path": str(p.resolve()), "weights_sha256": sha256_file(weights)}


def load_victim(ckpt_dir: str | Path, device: str = "cpu"):
    """(model, eval preprocess, tokenizer) from a local-dir checkpoint; refuses weightless folders."""
    d = Path(ckpt_dir)
    if not (d / CONFIG).is_file():
        raise UserError(f"{d} is not an open_clip local-dir checkpoint (no {CONFIG}); "
                        "pass the folder written by `clip-poison train`")
    if not (d / WEIGHTS).is_file():
        raise UserError(f"{d} has no {WEIGHTS}; without it open_clip builds a random model. "
                        "Re-export the checkpoint")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{d}", device=device)
        # open_clip loads the weights file itself; check it really did (not a silent random init).
        sd = torch.load(d / WEIGHTS, map_location="cpu", weights_only=True)
        probe = next(iter(sd))
    except (RuntimeError, ValueError, KeyError, TypeError, EOFError, StopIteration, pickle.UnpicklingError) as e:
        # torch and open_clip raise these for truncated or corrupt weights and a damaged config
        why = str(e).partition("\n")[0][:120]
        raise UserError(f"the checkpoint {d} is damaged ({type(e).__name__}: {why}); "
                        "re-run `clip-poison train` to write it again") from None
    if not torch.equal(model.state_dict()[probe].cpu(), sd[probe]):
        raise UserError(f"weights in {d} did not load into the model; the checkpoint is damaged")
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{d}")
