"""The embedded synthetic image–caption world: a seeded, downloadable-nothing stand-in for CC3M.

Ten classes, each a *shape* in a *colour family* (five shapes × warm/cool), drawn at a random
position and size on a noisy gradient background with distractor shapes. Neither colour nor shape
alone names the class, so a tiny model has to learn both, and it does not reach 100 %.

Captions read like alt-text, not like prompts: the class word appears in only part of them
(``p_class_word``), synonyms or no object word in the rest, plus context phrases, filler words,
colour words and a fraction of pairs whose caption belongs to another class. The caption
templates are disjoint from the evaluation prompts, so zero-shot accuracy is earned.

Outputs (``write_world``):
  train.csv + train/NNNNNN.png   OpenCLIP CSV (columns ``filepath,title``; paths relative to the CSV)
  eval/                          a labelled eval set in CLIP_benchmark's webdataset layout
                                 (classnames.txt, zeroshot_classification_templates.txt, test/0.tar)
  world.json                     every parameter, counts and hashes
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import WorldConfig, to_dict
from .captions import check_probabilities
from ..io import UserError, atomic_dir, atomic_write_json, package_versions, rng_for, sha256_file

SHAPES = ("disk", "square", "triangle", "ring", "cross")
FAMILIES = ("warm", "cool")
# class name -> (shape, colour family, synonyms). Synonyms never contain the class word.
CLASSES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "apple": ("disk", "warm", ("pippin", "crabapple")),
    "planet": ("disk", "cool", ("globe", "world")),
    "brick": ("square", "warm", ("cinderblock", "adobe")),
    "window": ("square", "cool", ("pane", "skylight")),
    "pizza": ("triangle", "warm", ("slice", "flatbread")),
    "tent": ("triangle", "cool", ("teepee", "shelter")),
    "donut": ("ring", "warm", ("doughnut", "bagel")),
    "tire": ("ring", "cool", ("wheel", "tyre")),
    "flower": ("cross", "warm", ("blossom", "bloom")),
    "plane": ("cross", "cool", ("jet", "aircraft")),
}
COLOUR_WORDS = {"warm": ("red", "orange", "crimson"), "cool": ("blue", "teal", "navy")}

# Alt-text-like caption templates ({o} = object phrase). Disjoint from EVAL_TEMPLATES below.
CAPTION_TEMPLATES = (
    "{o}", "my {o}", "vintage {o} for sale", "check out this {o}", "IMG_{n} {o}",
    "{o} on the table", "{o} in the garden", "new {o} - free shipping", "{o} at sunset",
    "our {o} #{tag}", "handmade {o} by {name}", "{o} ({year})", "{tag} {o} near the lake",
    "cheap {o} deals", "the {o} we saw today", "{o} wallpaper hd",
)
CONTEXT_ONLY = ("summer holiday {year}", "IMG_{n}", "view from the {tag}", "{name} at home",
                "best day ever #{tag}", "untitled {n}")
FILLER = ("summer", "home", "decor", "art", "travel", "kids", "best", "love", "city", "wood",
          "style", "weekend", "photo", "gift", "retro")
TAGS = ("nofilter", "weekend", "diy", "instagood", "travel", "kitchen", "park", "roof")
NAMES = ("anna", "joe", "maria", "li", "sam", "omar")

# Evaluation prompts (CLIP style); training captions never use these templates.
EVAL_TEMPLATES = (
    "a photo of a {c}.", "a blurry photo of a {c}.", "a photo of the {c}.",
    "a close-up photo of a {c}.", "a bright photo of a {c}.", "a photo of a small {c}.",
    "a photo of a big {c}.", "a rendering of a {c}.",
)


@dataclass
class Split:
    images: np.ndarray  # N x H x W x 3 uint8
    labels: np.ndarray  # N int64
    captions: list[str]


def class_names() -> list[str]:
    return list(CLASSES)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.array([colorsys.hsv_to_rgb(a % 1.0, b, c) for a, b, c in zip(h, s, v)]) * 255.0


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "disk":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "ring":
        d2 = dy * dy + dx * dx
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        w = max(1.5, 0.3 * r)
        return ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    raise ValueError(shape)


def render_images(labels: np.ndarray, cfg: WorldConfig, purpose: str) -> np.ndarray:
    """Draw one image per label (seeded by ``cfg.seed`` and ``purpose``)."""
    rng = rng_for(cfg.seed, f"world/{purpose}/images")
    n, s = len(labels), cfg.image_size
    names = class_names()
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    out = np.empty((n, s, s, 3), dtype=np.uint8)
    # Background: a linear gradient between two dull random colours, plus pixel noise.
    bg_a = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.4, n), rng.uniform(0.3, 0.8, n))
    bg_b = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.4, n), rng.uniform(0.3, 0.8, n))
    angle = rng.uniform(0, 2 * np.pi, n)
    for i in range(n):
        t = (np.cos(angle[i]) * xx + np.sin(angle[i]) * yy) / (s * 1.5) + 0.5
        img = bg_a[i] * (1 - t[..., None]) + bg_b[i] * t[..., None]
        # Distractors: 0-2 small shapes of any kind in random colours.
        for _ in range(rng.integers(0, 3)):
            shape = SHAPES[rng.integers(len(SHAPES))]
            m = _shape_mask(shape, yy, xx, rng.uniform(0, s), rng.uniform(0, s), rng.uniform(2, 4) * s / 32)
            img[m] = _hsv_to_rgb(rng.random(1), rng.uniform(0.2, 0.7, 1), rng.uniform(0.4, 0.9, 1))[0]
        shape, family, _ = CLASSES[names[labels[i]]]
        if rng.random() < cfg.p_off_colour:
            family = "cool" if family == "warm" else "warm"
        hue = rng.uniform(-0.06, 0.12) if family == "warm" else rng.uniform(0.48, 0.68)
        colour = _hsv_to_rgb(np.array([hue]), rng.uniform(0.5, 1.0, 1), rng.uniform(0.55, 1.0, 1))[0]
        r = rng.uniform(5, 11) * s / 32
        cy, cx = rng.uniform(r * 0.7, s - r * 0.7, 2)
        img[_shape_mask(shape, yy, xx, cy, cx, r)] = colour
        img += rng.normal(0, 10, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _fill(template: str, rng: np.random.Generator, **kw: str) -> str:
    return template.format(n=rng.integers(1000, 9999), tag=TAGS[rng.integers(len(TAGS))],
                           name=NAMES[rng.integers(len(NAMES))], year=rng.integers(1995, 2024), **kw)


def alt_text(word: str, rng: np.random.Generator, templates: tuple[str, ...] = CAPTION_TEMPLATES,
             filler: tuple[str, ...] = FILLER) -> str:
    """One alt-text-like caption around an object phrase: a template, then a filler word half the
    time. Shared by the synthetic and the real-photo world (``data/realworld.py``)."""
    cap = _fill(templates[rng.integers(len(templates))], rng, o=word)
    if rng.random() < 0.5:
        cap = f"{cap} {filler[rng.integers(len(filler))]}"
    return cap


def context_only_caption(rng: np.random.Generator, templates: tuple[str, ...] = CONTEXT_ONLY) -> str:
    """A caption with no object word at all ("IMG_4821", "summer holiday 2019"), as much alt-text is."""
    return _fill(templates[rng.integers(len(templates))], rng)


def make_captions(labels: np.ndarray, images: np.ndarray, cfg: WorldConfig, purpose: str) -> list[str]:
    """Alt-text-like captions for each image (seeded); see the module docstring for the mix."""
    rng = rng_for(cfg.seed, f"world/{purpose}/captions")
    names = class_names()
    caps = []
    for i, lab in enumerate(labels):
        if rng.random() < cfg.p_noisy_pair:  # a caption about some other class
            lab = (lab + rng.integers(1, len(names))) % len(names)
        name = names[lab]
        _, family, synonyms = CLASSES[name]
        u = rng.random()
        if u < cfg.p_class_word:
            word = name
        elif u < cfg.p_class_word + cfg.p_synonym:
            word = synonyms[rng.integers(len(synonyms))]
        else:
            caps.append(context_only_caption(rng))
            continue
        if rng.random() < 0.3:  # colour words follow the pixels' family loosely, as real alt-text
            word = f"{COLOUR_WORDS[family][rng.integers(3)]} {word}"
        caps.append(alt_text(word, rng))
    return caps


def make_split(cfg: WorldConfig, purpose: str, n: int) -> Split:
    if n < 1:
        raise UserError(f"the {purpose} split needs at least 1 image, got {n}; pass a positive size")
    # Balanced labels in a seeded order.
    labels = np.arange(n) % len(CLASSES)
    rng_for(cfg.seed, f"world/{purpose}/labels").shuffle(labels)
    images = render_images(labels, cfg, purpose)
    return Split(images, labels.astype(np.int64), make_captions(labels, images, cfg, purpose))


def validate(cfg: WorldConfig) -> None:
    if cfg.image_size < 32:
        raise UserError(f"--image-size {cfg.image_size} is too small; use 32 or more")
    check_probabilities(cfg, ("p_off_colour",))


def write_world(cfg: WorldConfig, out: str | Path, overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> dict:
    """Generate the world and write it under ``out`` atomically; returns the ``world.json`` dict."""
    from .csvdata import write_csv_dataset
    from .evalsets import write_wds_evalset

    validate(cfg)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if progress:
            progress("rendering training pairs")
        train = make_split(cfg, "train", cfg.n_train)
        write_csv_dataset(tmp / "train.csv", train.images, train.captions, image_dir="train")
        if progress:
            progress("rendering eval split")
        ev = make_split(cfg, "eval", cfg.n_eval)
        write_wds_evalset(tmp / "eval", ev.images, ev.labels, class_names(), list(EVAL_TEMPLATES),
                          split="test")
        info = {
            "config": to_dict(cfg),
            "classnames": class_names(),
            "classes": {k: {"shape": v[0], "colour_family": v[1], "synonyms": list(v[2])}
                        for k, v in CLASSES.items()},
            "caption_templates": list(CAPTION_TEMPLATES),
            "eval_templates": list(EVAL_TEMPLATES),
            "train_csv": "train.csv",
            "eval_root": "eval",
            "eval_split": "test",
            "n_train": int(cfg.n_train),
            "n_eval": int(cfg.n_eval),
            "train_csv_sha256": sha256_file(tmp / "train.csv"),
            "versions": package_versions(),
        }
        atomic_write_json(tmp / "world.json", info)
    return info
