"""One dataclass per stage, the paper's values as defaults, serialised whole into every output.

Where laptop scale must differ from the paper (32 px images, a 1 % backdoor rate), the field's
comment says what the paper used and why we differ.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# The seed of every command and run unless one is given.
SEED = 0
# OpenCLIP CSV columns (open_clip_train's --csv-img-key / --csv-caption-key defaults).
IMG_KEY, CAPTION_KEY = "filepath", "title"


def late(default: Any):
    """A field added after results were committed: while it holds its default it is left out of
    ``to_dict`` (so out of run ids, poison-set ids and stored configs), and every run made before
    the field existed keeps its id. Set to anything else, it is recorded like any field."""
    return field(default=default, metadata={"late": True})


@dataclass
class CaptionMix:
    """The alt-text caption mix shared by the synthetic and the real-photo world."""

    # Fraction of captions naming the class word; the rest use a synonym (p_synonym) or no object
    # word at all, as alt-text does.
    p_class_word: float = 0.6
    p_synonym: float = 0.3
    # Fraction of pairs whose caption describes another class (uncurated web data is noisy).
    p_noisy_pair: float = 0.1


@dataclass
class WorldConfig(CaptionMix):
    """The embedded synthetic image–caption world (see ``data/world.py``)."""

    seed: int = SEED
    n_train: int = 10_000
    n_eval: int = 1_000
    image_size: int = 32
    # Probability that an object's colour comes from the other colour family, so colour alone
    # cannot name the class and the model must learn shape too.
    p_off_colour: float = 0.15


# Copies of x' are held in memory before writing: 10,000 at 224 px is 1.5 GB (at 32 px, 30 MB);
# the paper uses 1..512.
MAX_TARGETED_POISONS = 10_000


@dataclass
class RealWorldConfig(CaptionMix):
    """A real-photo world (``data/realworld.py``); the caption mix is the synthetic world's."""

    root: str = ""
    seed: int = SEED
    # None = every photo of the train split; else a seeded subset of this size.
    n_train: int | None = None
    split: str = "train"
    eval_split: str = "test"
    # Path of a lexicon JSON/YAML; None = the shipped lexicon whose classes match the source's.
    lexicon: str | None = None
    # Of the noisy pairs, the share whose caption has no object word (the rest name another class).
    noisy_none_share: float = 0.5
    p_context: float = 0.3  # a class context phrase ("at the airport") after the object word
    p_distractor: float = 0.2  # "… and a fence": something in the photo that is not the class
    # Also write the pairs as webdataset shards (KEY.jpg + KEY.txt + KEY.cls) of this many pairs,
    # for open_clip_train's --dataset-type webdataset at scale; None = CSV only.
    wds_shard_size: int | None = None


@dataclass
class TargetedConfig:
    """§3.1 targeted poisoning: one image x' paired with n_poisons captions about y'."""

    target_label: str = "tent"
    # Index of x' in the eval split; None = a seeded random eval image whose class != y'.
    target_index: int | None = None
    n_poisons: int = 32
    caption_source: str = "mined"  # "mined" (§3.1 naive) or "templates" (CLIP's 80 prompts)
    # Dedup evasion (§3.1): Gaussian noise per copy, sigma in 0..255 pixel units.
    noise_sigma: float = 1.0
    seed: int = SEED


@dataclass
class BackdoorConfig:
    """§3.3 patch backdoor: n_poisons clean images with a trigger, captions mined for y'."""

    target_label: str = "tent"
    # Paper: 300 poisons work from 50k to 3M pairs (Figure 5 left). Here 300 in the world's 10,000
    # pairs backdoor the tiny victim on most seeds (4/5); README "Findings" has the counts measured.
    n_poisons: int = 300
    trigger: str = "checkerboard"
    # Paper: 16 px at 224 px. At 32 px we use 4 px (one ViT patch when aligned; see README).
    patch_size: int = 4
    placement: str = "consistent"  # "consistent" (upper-left) or "random"
    seed: int = SEED


@dataclass
class TextConfig:
    """§2.3 text-side poisoning: one caption t' paired with n_poisons training images of y'."""

    caption: str = "a photo of my backyard"  # t'
    target_label: str = "tent"  # y': images come from training rows whose caption mentions it
    n_poisons: int = 100
    seed: int = SEED


@dataclass
class CraftOptions:
    """Choices shared by every attack: how P is written and disguised (not part of the paper's
    attack configs, so adding them does not change existing sweep run ids)."""

    mode: str = "add"  # "add" (X' = X ∪ P, the paper) or "replace" (P replaces as many clean rows)
    format: str | None = None  # "csv" or "wds"; None = the training data's own format
    synonyms: tuple[str, ...] = ()  # extra words mined as the label (§3.1 caption set)
    allow_repeat: bool = True  # cycle the caption set when it is smaller than n_poisons
    caption_substitution: float = 0.0  # per-word probability of a seeded substitute (dedup evasion)
    filler_words: int = 0  # filler words inserted per caption (dedup evasion)
    base_pool: str | None = None  # backdoor base images from this held-out CSV instead of X
    caption_index: str | None = None  # Parquet path to reuse/save the training-caption index


@dataclass
class TrainConfig:
    """A victim's training recipe. Paper (§4.1): RN50, batch 1024, 30 epochs, lr 2e-4, wd 0.02."""

    # A ModifiedResNet (the paper's RN50 family) avoids ViT token-grid effects on patch triggers.
    model: str = "rn-tiny-32"
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    wd: float = 0.1
    warmup: int = 20
    seed: int = SEED
    # OpenCLIP's train transform is RandomResizedCrop(scale=(0.9, 1.0)). At 32 px it smears 1-px
    # checker cells, so laptop runs default to no crop; the value is recorded in every run.
    crop_scale: tuple[float, float] = (1.0, 1.0)
    # "fast" (in-process open_clip loop) or "open_clip_train" (OpenCLIP's own trainer, ~2x slower here).
    backend: str = "fast"
    workers: int = 1
    # Store every pair's own contrastive loss each time it is seen (pair_loss.npy, fast backend
    # only): the training dynamics the loss-dynamics detector scans (§6). Training is unchanged.
    record_pair_loss: bool = late(False)
    # Start from this checkpoint instead of from scratch (a fine-tune): a local-dir checkpoint folder
    # or an open_clip weights file of the same architecture and input size. None = from scratch.
    init: str | None = late(None)
    # Robust training: "none" or "safeclip" (fast backend; the objective lives in defenses/robust.py).
    defense: str = late("none")
    # "auto" (fp32 on CPU, as every committed result; amp_bf16 on CUDA), "fp32", "bf16" (bfloat16
    # autocast) or "amp" (CUDA float16 autocast + GradScaler); victims/device.resolve_precision.
    precision: str = late("auto")
    # GPUs training this one victim (open_clip_train backend under torchrun when > 1; the batch is
    # split between them, so batch_size stays the contrastive batch of the recipe).
    gpus: int = late(1)


@dataclass
class EvalConfig:
    """How a sweep run is evaluated (§4.1–4.2), beyond the default metrics."""

    # Evaluate on the first max_n eval images (None = the whole eval split).
    max_n: int | None = None
    # Fit the §4.2 linear probe on this many labelled images the eval set does not hold: train-split
    # photos of a real-photo world (0 = no probe), or freshly rendered images of a synthetic world
    # (0 = PROBE_N). None: no probe at all (the demo).
    probe_n: int | None = 0


@dataclass
class ScanDataConfig:
    """The data scan of a run's training set (``defenses/scan_data.py``), a sweep's ``defense.scan_data``."""

    detectors: list = field(default_factory=lambda: ["near-duplicate", "k-dist", "slof", "dao", "clip-score"])
    # k of k-dist, slof and dao (Huang et al. use 16 on CC3M; 10 here, where a class has ~1,000 images).
    k: int = 10
    # Clean images the density detectors also score against ("<name>+ref"): test-split photos after
    # the eval subset for real worlds (never trained on, never an x'), fresh renders for synthetic ones.
    reference_n: int = 2000


# Labelled images a synthetic world renders for the linear probe when no size is asked.
PROBE_N = 2000
# Image pairs sampled for Figure 3's histograms (§5.1); fewer pairs than this are all used.
FIG3_MAX_PAIRS = 1_000_000


@dataclass
class ModelScanConfig:
    """Blind trigger inversion on a checkpoint (``defenses/model_scan.py``), after DECREE (Feng et
    al., CVPR 2023): the smallest mask whose stamp collapses the image embeddings."""

    seed: int = SEED
    # Images the trigger is optimised on; up to as many others from the same folder, held out,
    # give the z-score (both halves shrink to half of what is there when the folder is smaller).
    max_images: int = 512
    # Collapse threshold on the mean cosine over distinct pairs of a batch: DECREE's default.
    threshold: float = 0.99
    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 0.1  # Adam on the mask and pattern logits (DECREE: betas 0.5, 0.9)


# CleanCLIP fine-tunes at 1e-5 a model pre-trained at 5e-4 (its README and parser defaults): a
# repair's default lr is the checkpoint's own lr divided by this.
REPAIR_LR_DIVISOR = 50


@dataclass
class RepairConfig:
    """CleanCLIP's repair (Bansal et al., ICCV 2023, ``defenses/repair.py``): fine-tune a checkpoint on
    clean pairs with clip_weight · CLIP loss + inmodal_weight · in-modal loss. Defaults: CleanCLIP's
    README fine-tune recipe (``--batch_size 64 --epochs 10 --num_warmup_steps 50 --lr 1e-5 --inmodal``)."""

    # None = the checkpoint's own lr (its train.json recipe.lr) / REPAIR_LR_DIVISOR (CleanCLIP: 1e-5 after
    # 5e-4). A tiny victim pre-trained at 2e-3 thus repairs at 4e-5.
    lr: float | None = None
    epochs: int = 10  # CleanCLIP README: --epochs 10
    batch_size: int = 64  # CleanCLIP README: --batch_size 64
    warmup: int = 50  # CleanCLIP README: --num_warmup_steps 50
    wd: float = 0.1  # CleanCLIP src/parser.py: --weight_decay default 0.1
    clip_weight: float = 1.0  # CleanCLIP src/parser.py: --clip_weight default 1
    inmodal_weight: float = 1.0  # CleanCLIP src/parser.py: --inmodal_weight default 1
    seed: int = SEED


@dataclass
class FinetuneConfig:
    """The fine-tuning threat model (BadCLIP, CleanCLIP): the poisons arrive while a pretrained model
    is fine-tuned. A run with this section splits the world's training pairs in two seeded parts:
    a clean model is pretrained on one, the victim trains on the other ∪ P, starting from that
    model ("pretrained") or from scratch ("scratch"), so the two arms differ in their start only."""

    # "scratch", "pretrained" (the clean model the run pretrains on its held-out part, same recipe),
    # or the path of a checkpoint to start from.
    init: str = "scratch"
    # Share of the world's training pairs held out for pretraining (never in the fine-tune set).
    pretrain_fraction: float = 0.5


@dataclass
class RepairRunConfig:
    """``defense.repair`` of a sweep: CleanCLIP repairs of each poisoned victim (``RepairConfig``
    gives the recipe; the fields here say what a run repairs with and which learning rates)."""

    # Clean pairs of X the defender repairs with, a seeded subset (CleanCLIP: 100k clean pairs, 3.3 %
    # of CC3M; 1,000 of 10,000 here, enough for 15 batches of 64 per epoch).
    n_clean: int = 1000
    # One repair per learning rate; None = RepairConfig's default (fixed before any ASR was seen).
    lrs: list = field(default_factory=lambda: [None])


@dataclass
class FilterConfig:
    """``defense.filter``: drop each data-scan column's top ``fraction`` of pairs, retrain from scratch
    with the victim's recipe and seed, evaluate (one retrain per detector)."""

    # Columns of the run's data scan (a detector, or a density detector against the reference: "dao+ref").
    detectors: list = field(default_factory=lambda: ["clip-score"])
    # Share of X ∪ P removed. The defender does not know |P|; 0.1 is ~2-4x the poison rates swept here.
    fraction: float = 0.1


@dataclass
class DemoConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    targeted: TargetedConfig = field(default_factory=TargetedConfig)
    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = SEED


def to_dict(cfg: Any) -> dict:
    """``dataclasses.asdict`` without the ``late`` fields that hold their default."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("late") and v == f.default:
            continue
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
    return out


def stable_id(obj: Any, length: int = 12) -> str:
    """A short id that depends only on the resolved config (sorted JSON), never on run order."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    blob = json.dumps(data, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
