"""The victim registry: small JSON model configs registered with open_clip, as open_clip does.

Models are data: each ``model_configs/NAME.json`` is an open_clip model config, so
``open_clip.create_model(NAME)`` builds it once ``register_victims()`` has run, and
open_clip_train trains it by name.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import open_clip

from ..io import UserError

CONFIG_DIR = Path(__file__).parent / "model_configs"


@lru_cache(maxsize=None)
def register_victims() -> tuple[str, ...]:
    open_clip.add_model_config(CONFIG_DIR)
    return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


def victim_names() -> list[str]:
    return list(register_victims())


def model_config(name: str) -> dict:
    """The open_clip model config of a victim (ours or any open_clip built-in, e.g. RN50)."""
    register_victims()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UserError(f"unknown model {name!r}; clip-poison victims: {victim_names()} "
                        "(any open_clip name such as RN50 also works; `clip-poison list models` shows ours)")
    return cfg


def image_size(name: str) -> int:
    return _side(model_config(name)["vision_cfg"]["image_size"])


def input_size(model) -> int:
    """The input side of a loaded open_clip model (its ``visual.image_size``, an int or a pair)."""
    return _side(model.visual.image_size)


def _side(size) -> int:
    return int(size if isinstance(size, int) else size[0])


def describe(name: str) -> dict:
    """Parameter counts (total, image tower, token embedding) and input size; builds the model once
    on CPU. The paper's model sizes (Figure 5 right) are image-tower counts."""
    from .recipes import SIZE_LADDER

    register_victims()
    model = open_clip.create_model(name, device="cpu")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    rung = next((f"{tower} {r}" for tower, rungs in SIZE_LADDER.items() for r, m in rungs.items() if m == name), "")
    return {"name": name, "image_size": image_size(name), "params": n(model),
            "visual_params": n(model.visual), "token_embedding_params": n(model.token_embedding),
            "tower": "ModifiedResNet" if isinstance(model_config(name)["vision_cfg"]["layers"], list) else "ViT",
            "ladder_rung": rung, "config": json.dumps(model_config(name), sort_keys=True)}
