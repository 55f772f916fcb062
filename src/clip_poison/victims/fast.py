"""The fast in-process backend: open_clip_train's recipe without its per-run and per-epoch costs.

Reuses open_clip's model factory, tokenizer and ``ClipLoss``, and open_clip_train's own
``get_default_params`` (betas, eps), parameter groups, ``cosine_lr`` schedule and logit-scale
clamp, so a recipe means the same thing in both backends. What it drops: the subprocess start,
PNG decode and tokenisation every epoch, and DataLoader workers. Images are decoded and captions
tokenised once and kept in memory, so this backend is for laptop-scale data (it says so: the
dataset must fit in RAM; paper-scale runs use ``open_clip_train``).

The data order is the same as ``order.CleanOrderSampler``: clean rows in a seeded order
that does not depend on the poisons, poison rows at seeded positions.

Speed settings (``FastOptions``) change how the same math is computed, never the recipe: the fused
AdamW kernel (the same update as open_clip_train's ``torch.optim.AdamW``, one kernel over all
tensors instead of one Python loop step per tensor; it matters because the 49,408-row token
embedding gets a dense AdamW update every step), channels-last memory layout for ModifiedResNet
convolutions, and images normalised once instead of every batch. ``torch.compile`` is available
but off by default (its compile time costs more than it saves on a sweep-sized run; see
``benchmarks/bench_backends.py``). Every run records its options in ``train.json``.

``TrainConfig.record_pair_loss`` also stores every training pair's own contrastive loss each time it
is seen (``pair_loss.npy`` + ``pair_loss.json``, see ``PAIR_LOSS``): the training dynamics that
Carlini & Terzis §6 suggest monitoring. It reads the logits the step computes anyway, under
``no_grad``, so the trained weights are bitwise the same with or without it (tested).

It trains on CUDA when torch sees a GPU (the checkpoint is exported as CPU tensors either way), in
the precision ``victims/device.resolve_precision`` picks: fp32 on CPU by default (bitwise the
training of every committed result), each step under open_clip_train's own autocast otherwise
(``get_autocast``: bfloat16, or float16 with a GradScaler as open_clip_train's ``amp``).
"""
from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip_train.params import get_default_params
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr
from torchvision.transforms import v2

from ..config import TrainConfig
from ..io import UserError, atomic_dir, atomic_write_json, load_image, package_versions, resize_to_input, sha256_file
from .device import check_gpus, resolve_precision, train_device
from .export import export_local_dir, init_weights
from .models import image_size, model_config, register_victims
from .order import epoch_order
from .openclip_train import PATHS_NOTE, openclip_crop_ratio, recorded_path, training_rows

Progress = Callable[[int, int], None]
PAIR_LOSS = "pair_loss.npy"  # (N_pairs, epochs) float32; its row map is pair_loss.json beside it


class _ClipLossKeepingLogits(open_clip.ClipLoss):
    """open_clip's ClipLoss, unchanged, keeping the logits it computed so that the per-pair losses
    are read off them instead of a second matmul."""

    def get_logits(self, *args, **kwargs):
        self.logits = super().get_logits(*args, **kwargs)
        return self.logits


def per_pair_clip_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
    """ClipLoss split per pair: row i's (CE(image_i → the batch's texts) + CE(text_i → the batch's
    images)) / 2. Their mean over the batch is ClipLoss's value."""
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels, reduction="none")
            + F.cross_entropy(logits_per_text, labels, reduction="none")) / 2


def _seed_everything(seed: int) -> None:
    # open_clip_train's random_seed(seed, rank=0), called before the model is built.
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class TrainContext:
    """What an ``Objective`` sees of a run: the model, every training pair in memory (raw uint8
    pixels at input size and captions, clean rows first), and how a batch becomes model input.
    Pixels, tokens and the model live on the training device; ``loss`` runs under the step's autocast."""

    model: torch.nn.Module
    forward: Callable
    pixels: torch.Tensor  # N x 3 x H x W uint8, before any crop or normalisation
    captions: list[str]
    tokenizer: Callable  # captions -> tokens on the training device
    normalize: Callable[[torch.Tensor], torch.Tensor]  # uint8 batch -> the model's float input
    n_clean: int
    cfg: TrainConfig
    steps_per_epoch: int


class Objective:
    """The loss of a training step, where defenses plug into the trainer (robust training, repair)
    without the trainer importing them. The default is open_clip's ClipLoss on the batch; an
    objective may run more forward passes (augmented views) or weight pairs (a safe set)."""

    name = "clip"

    def setup(self, ctx: TrainContext) -> None:
        self.ctx = ctx

    def begin_epoch(self, epoch: int) -> None:
        """Called before each epoch's first step (e.g. to re-split pairs with the current model)."""

    def lr_scale(self, epoch: int) -> float:
        """Factor on the scheduled learning rate during this epoch (a phase trained at a lower rate)."""
        return 1.0

    def loss(self, imgs: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def info(self) -> dict:
        """What ``train.json`` records about the objective (its settings and what it did)."""
        return {"name": self.name}


@dataclass
class FastOptions:
    """How the fast backend computes the recipe; none of these change the math of a step."""

    # "fused" (one kernel), "foreach" (batched per op) or "for-loop" (torch's CPU default, what
    # open_clip_train runs here). All three compute the same AdamW update.
    optimizer_impl: str = "fused"
    # NHWC layout for ModifiedResNet convolutions (ignored for ViTs, which have one conv).
    channels_last: bool = True
    # torch.compile the model (inductor). Off: compile time outweighs its gain on short runs.
    compile: bool = False
    # Threads decoding the PNGs once at start. 1: measured here, 2 threads doubled decode time.
    decode_threads: int = 1


OPTIMIZER_IMPLS = ("fused", "foreach", "for-loop")


def _decode_all(paths: list[str], size: int, threads: int = 1) -> torch.Tensor:
    def one(p: str) -> np.ndarray:
        return resize_to_input(load_image(p), size)

    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            imgs = list(pool.map(one, paths, chunksize=64))  # map keeps the row order
    else:
        imgs = [one(p) for p in paths]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()  # N x 3 x H x W uint8


def train_crop(size: int, scale) -> v2.RandomResizedCrop:
    """open_clip's train-time crop on uint8 tensors: its scale and the ratio it really uses."""
    return v2.RandomResizedCrop(size, scale=tuple(scale), ratio=openclip_crop_ratio(size, scale),
                                interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, impl: str = "for-loop") -> torch.optim.Optimizer:
    """AdamW with open_clip_train's parameter groups (no weight decay on gains, biases, logit scale)
    and betas/eps (``get_default_params``); ``impl`` picks torch's kernel, not the update rule."""
    if impl not in OPTIMIZER_IMPLS:
        raise UserError(f"unknown AdamW implementation {impl!r}; use one of {OPTIMIZER_IMPLS}")
    d = get_default_params(cfg.model)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": cfg.wd}],
        lr=cfg.lr, betas=(d["beta1"], d["beta2"]), eps=d["eps"], **kernel)


def train_fast(train_csv: str | Path, poison_dirs: list[str | Path], cfg: TrainConfig, out: str | Path,
               overwrite: bool = False, progress: Progress | None = None,
               options: FastOptions | None = None, objective: Objective | None = None) -> dict:
    """Train on X ∪ P in this process; writes the same local-dir checkpoint + ``train.json`` as
    ``train_open_clip_train``. The whole dataset is decoded into RAM (laptop scale only).
    ``cfg.init`` starts from a checkpoint (a fine-tune); ``objective`` replaces the CLIP loss."""
    opts = options or FastOptions()
    register_victims()
    model_cfg = model_config(cfg.model)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError("--epochs and --batch-size must be >= 1")
    check_gpus(cfg)
    device = train_device()
    precision = resolve_precision(cfg.precision, device)
    if objective is not None and cfg.record_pair_loss:
        raise UserError(f"--record-pair-loss records the plain CLIP loss; it cannot be combined with the "
                        f"{objective.name} objective")
    init_sd, init_info = init_weights(cfg.init, model_cfg, cfg.model) if cfg.init else (None, None)
    timings = {}
    t0 = time.time()
    paths, caps, n_clean, sources = training_rows(train_csv, poison_dirs, image_size(cfg.model))
    sources = [{**s, "dir": recorded_path(s["dir"], out)} for s in sources]
    n = len(paths)
    if n < cfg.batch_size:
        raise UserError(f"{n} training pairs are fewer than one batch of {cfg.batch_size}; lower --batch-size")
    _seed_everything(cfg.seed)
    # built on CPU in fp32 on every device, so one seed gives one initialisation
    model = open_clip.create_model(cfg.model, device="cpu", precision="fp32", output_dict=True)
    if init_sd is not None:
        model.load_state_dict(init_sd)
    tokenize = open_clip.get_tokenizer(cfg.model)

    def tokenizer(texts) -> torch.Tensor:
        return tokenize(texts).to(device)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    is_resnet = isinstance(model_cfg["vision_cfg"]["layers"], (list, tuple))
    layout = torch.channels_last if (opts.channels_last and is_resnet) else torch.contiguous_format
    model = model.to(device=device, memory_format=layout)
    timings["startup"] = time.time() - t0

    t1 = time.time()
    pixels = _decode_all(paths, size, opts.decode_threads).to(device)
    tokens = tokenizer(caps)
    mean = torch.tensor(model.visual.image_mean or open_clip.OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std or open_clip.OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    crop = None
    raw = pixels

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255.0 - mean) / std).contiguous(memory_format=layout)

    if tuple(cfg.crop_scale) != (1.0, 1.0):
        crop = train_crop(size, cfg.crop_scale)
    else:
        # Scale (1.0, 1.0) is no crop in both backends: on a square S×S image a full-area crop with
        # w, h <= S can only be S×S (rounding cannot shorten one side without the other passing S),
        # the fallback after rejected draws is the whole image, and resizing S to S is the identity
        # (tested). So normalise once (the same ops per image as per batch, n times not n*epochs).
        pixels = normalize(pixels)
    timings["data"] = time.time() - t1

    optimizer = build_optimizer(model, cfg, opts.optimizer_impl)
    autocast = get_autocast(precision, device_type=device)  # fp32: a no-op context
    scaler = torch.amp.GradScaler(device) if precision == "amp" else None  # float16 needs loss scaling
    loss_fn = _ClipLossKeepingLogits() if cfg.record_pair_loss else open_clip.ClipLoss()
    # NaN stays where a pair was not seen: the epoch's partial last batch is dropped
    pair_loss = np.full((n, cfg.epochs), np.nan, dtype=np.float32) if cfg.record_pair_loss else None
    forward = model
    if opts.compile:
        tc = time.time()
        forward = torch.compile(model)
        timings["compile_setup"] = time.time() - tc  # the real compile happens in the first step
    steps_per_epoch = n // cfg.batch_size  # drop_last, as open_clip_train
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup, total_steps)
    if objective is not None:
        objective.setup(TrainContext(model, forward, raw, caps, tokenizer, normalize, n_clean, cfg, steps_per_epoch))
    model.train()
    t_fb = t_opt = 0.0
    t2 = time.time()
    losses = []
    for epoch in range(cfg.epochs):
        order = epoch_order(n, n_clean, cfg.seed, epoch)
        lr_scale = 1.0
        if objective is not None:
            objective.begin_epoch(epoch)
            model.train()
            lr_scale = objective.lr_scale(epoch)
        for i in range(steps_per_epoch):
            scheduler(epoch * steps_per_epoch + i)
            if lr_scale != 1.0:  # the scheduler sets every group's lr afresh each step, so this never compounds
                for group in optimizer.param_groups:
                    group["lr"] *= lr_scale
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            imgs = pixels[idx]
            if crop is not None:
                imgs = torch.stack([crop(im) for im in imgs])
                imgs = normalize(imgs)
            ta = time.time()
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                if objective is not None:
                    loss = objective.loss(imgs, tokens[idx], idx, epoch)
                else:
                    out_ = forward(imgs, tokens[idx])
                    loss = loss_fn(out_["image_features"], out_["text_features"], out_["logit_scale"])
                if pair_loss is not None:
                    with torch.no_grad():
                        pair_loss[idx.numpy(), epoch] = per_pair_clip_loss(*loss_fn.logits).float().cpu().numpy()
            (scaler.scale(loss) if scaler else loss).backward()
            tb = time.time()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            t_opt += time.time() - tb
            t_fb += tb - ta
            losses.append(loss.detach().item())
            if progress:
                progress((epoch * steps_per_epoch + i + 1) * cfg.batch_size, total_steps * cfg.batch_size)
    timings["train"] = time.time() - t2
    timings["forward_backward"] = t_fb
    timings["optimizer"] = t_opt

    t3 = time.time()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        # Plain contiguous tensors: the checkpoint must not depend on the layout used to train.
        export_local_dir(model_cfg, model.state_dict(), tmp)
        timings["checkpoint"] = time.time() - t3
        info = {"backend": "fast", "recipe": asdict(cfg), "fast_options": asdict(opts),
                "augmentation": {"random_resized_crop_scale": list(cfg.crop_scale),
                                 "ratio": list(openclip_crop_ratio(size, cfg.crop_scale)),
                                 "note": "scale (1.0, 1.0) means no crop; triggers are already at input size"},
                "data": {"train_csv": recorded_path(train_csv, out), "paths": PATHS_NOTE,
                         "train_csv_sha256": sha256_file(train_csv),
                         "n_clean": n_clean, "n_poisons": n - n_clean, "poison_sets": sources},
                **({"init": init_info} if init_info else {}),
                **({"objective": objective.info()} if objective is not None else {}),
                "precision": {"asked": cfg.precision, "used": precision, "device": device, "gpus": cfg.gpus},
                # CPU results depend on it (reductions split over threads sum in another order)
                "threads": torch.get_num_threads(),
                "model_cfg": model_cfg, "final_loss": float(np.mean(losses[-max(1, steps_per_epoch // 4):])),
                # per step, as open_clip_train logs it: the backends are compared step by step (tests)
                "loss_per_step": [round(x, 6) for x in losses],
                "samples_per_second": round(total_steps * cfg.batch_size / max(timings["train"], 1e-9), 1),
                "timings": {k: round(v, 3) for k, v in timings.items()},
                "seconds": round(time.time() - t0, 2), "versions": package_versions()}
        atomic_write_json(tmp / "train.json", info)
        if pair_loss is not None:
            np.save(tmp / PAIR_LOSS, pair_loss)
            atomic_write_json(tmp / "pair_loss.json", _pair_loss_rows(info["data"], cfg, n))
    return info


def _pair_loss_rows(data: dict, cfg: TrainConfig, n: int) -> dict:
    """Which row of ``pair_loss.npy`` is which training pair, so a scan can join the rows to the
    poison sets' manifests (the truth about P)."""
    sets, start = [], data["n_clean"]
    for s in data["poison_sets"]:
        sets.append({"rows": [start, start + s["n_poisons"]], **s})
        start += s["n_poisons"]
    return {
        "file": PAIR_LOSS, "shape": [n, cfg.epochs], "batch_size": cfg.batch_size,
        "loss": "entry [i, e]: pair i's symmetric CLIP loss in epoch e, (CE(image_i -> the batch's captions) + "
                "CE(caption_i -> the batch's images)) / 2, from the logits of the step that trained on it, before "
                "its update; the batch mean is that step's loss in train.json's loss_per_step",
        "missing": "NaN: the pair fell in that epoch's partial last batch, which training drops (drop_last, as "
                   "open_clip_train)",
        "paths": data["paths"],
        # rows [start, stop): half-open, in the order training_rows composes X ∪ P
        "clean": {"rows": [0, data["n_clean"]], "csv": data["train_csv"], "csv_sha256": data["train_csv_sha256"],
                  "order": "the CSV's rows in file order, less the rows that a --mode replace poison set replaces "
                           "(its manifest's `replaces`)"},
        "poison_sets": sets,
        "poison_rows": "row start + j is row j of the set's poison CSV (its manifest's `csv`)",
    }


__all__ = ["PAIR_LOSS", "FastOptions", "Objective", "TrainContext", "build_optimizer", "per_pair_clip_loss", "train_fast"]
