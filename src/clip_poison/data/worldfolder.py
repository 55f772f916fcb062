"""Reading world folders (synthetic or real-photo, ``world.json`` beside them): where the eval set
is, the training photos' labels, and the labelled split a §4.2 linear probe is fit on."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..config import PROBE_N, WorldConfig
from ..io import UserError
from .evalsets import EvalSet, load_evalset, load_wds_evalset
from .world import EVAL_TEMPLATES, class_names, make_split


def world_eval_pointer(world_dir: str | Path) -> tuple[Path, str]:
    """(eval root, split) of any world folder, synthetic (relative ``eval``) or real (absolute)."""
    world_dir = Path(world_dir)
    info_path = world_dir / "world.json"
    if not info_path.is_file():
        raise UserError(f"{world_dir} has no world.json; make one with `clip-poison world`")
    info = json.loads(info_path.read_text())
    if not info.get("eval_root"):
        raise UserError(f"the world {world_dir} has no eval set (its source has no "
                        f"{info.get('config', {}).get('eval_split', 'test')!r} split in webdataset layout); "
                        "evaluate with --eval-root DIR")
    root = Path(info["eval_root"])
    return (root if root.is_absolute() else world_dir / root), info.get("eval_split") or "test"


def load_world_evalset(world_dir: str | Path, max_n: int | None = None) -> EvalSet:
    root, split = world_eval_pointer(world_dir)
    return load_wds_evalset(root, split, max_n)


def read_train_labels(world_dir: str | Path) -> pd.DataFrame:
    """The training photos' labels (for linear probes fit on train-split embeddings, §4.2)."""
    p = Path(world_dir) / "train_labels.csv"
    if not p.is_file():
        raise UserError(f"{p} not found; only real-photo worlds (`clip-poison world cifar10 …`) record labels")
    return pd.read_csv(p, dtype={"filepath": str, "classname": str, "source_key": str, "caption_kind": str})


def synthetic_probe_split(world_dir: str | Path, n: int = PROBE_N) -> EvalSet:
    """A labelled probe-training set for a synthetic world (§4.2's linear probe).

    The world's training CSV holds captions, not labels, so the probe is fit on ``n`` freshly
    rendered images from the same distribution (``world.make_split(cfg, "probe", n)``: its own seed
    stream, disjoint from train and eval). This matches the paper's protocol, where the probe is
    fit on ImageNet training images that the CLIP model never saw either.
    """
    info_path = Path(world_dir) / "world.json"
    if not info_path.is_file():
        raise UserError(f"{world_dir} has no world.json; pass a folder made by `clip-poison world`")
    info = json.loads(info_path.read_text())
    if info.get("kind", "synthetic") != "synthetic" or "classes" not in info:
        raise UserError(f"{world_dir} is not a synthetic world; for real-photo worlds fit the probe on the "
                        "source's labelled train split (--probe-train SOURCE --probe-split train)")
    cfg = WorldConfig(**{k: v for k, v in info["config"].items() if k in WorldConfig.__dataclass_fields__})
    sp = make_split(cfg, "probe", n)
    return EvalSet(list(sp.images), sp.labels, class_names(), list(EVAL_TEMPLATES),
                   [f"probe{i:07d}" for i in range(n)], source=f"{Path(world_dir).resolve()}#probe-seed{cfg.seed}",
                   split="probe")


def load_probe_train(path: str | Path, split: str = "train", max_n: int | None = None) -> EvalSet:
    """The labelled set a §4.2 linear probe is fit on, from what a user has at hand:

    * a synthetic world folder: ``max_n`` (default ``PROBE_N``) freshly rendered labelled images
      (``synthetic_probe_split``);
    * a real-photo world folder: its source's labelled ``split`` (the photos' own labels);
    * any labelled eval-set folder (webdataset or ImageFolder): its ``split``.
    """
    path = Path(path)
    info_path = path / "world.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("kind", "synthetic") == "synthetic":
            return synthetic_probe_split(path, max_n or PROBE_N)
        return load_evalset(info["source"]["root"], split, max_n)
    return load_evalset(path, split, max_n)


def load_clean_reference(world_dir: str | Path, eval_max_n: int | None, n: int) -> EvalSet:
    """Clean images a defense may assume it has (the density detectors' reference, the model scan's
    images): never trained on and never an attack's x'. Real-photo worlds: the eval split's images
    after the first ``eval_max_n`` (x' are drawn from those first ones; the whole split is never
    trained on). Synthetic worlds: ``n`` freshly rendered images (the probe split's stream)."""
    info_path = Path(world_dir) / "world.json"
    if not info_path.is_file():
        raise UserError(f"{world_dir} has no world.json; make one with `clip-poison world`")
    info = json.loads(info_path.read_text())
    if info.get("kind", "synthetic") == "synthetic":
        return synthetic_probe_split(world_dir, n)
    if eval_max_n is None:
        raise UserError("a real-photo world evaluated on its whole eval split has no clean images left for a "
                        "defense's reference; set eval.max_n below the split's size")
    root, split = world_eval_pointer(world_dir)
    ev = load_wds_evalset(root, split, eval_max_n + n)
    if len(ev.images) <= eval_max_n:
        raise UserError(f"the eval split of {root} has only {len(ev.images)} images, none after the first "
                        f"{eval_max_n} (the eval subset) for a defense's reference; lower eval.max_n")
    return EvalSet(ev.images[eval_max_n:], ev.labels[eval_max_n:], ev.classnames, ev.templates,
                   ev.keys[eval_max_n:] if ev.keys else [], source=ev.source, split=f"{split}[{eval_max_n}:]")
