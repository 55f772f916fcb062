"""Model scan: blind trigger inversion on a CLIP image encoder, after DECREE (Feng et al., CVPR 2023).

A patch backdoor (§3.3) teaches the encoder to send every image that carries the trigger to one
place: f(u ⊕ bd) ≈ f(v ⊕ bd) for any two images u, v. The scan looks for the smallest stamp that does that, without ever
seeing the true trigger: a mask m (H×W, one value per pixel shared by the three channels) and a
pattern p (3×H×W), both the sigmoid of free logits, blended in [0, 1] pixel space at the model's
input size,

    x' = (1 − m)·x + m·p      → the checkpoint's Normalize → the image encoder,

and optimised (Adam) so that the embeddings of a batch collapse — a high mean cosine over its
distinct pairs, self-pairs excluded — at an L1 price λ·‖m‖₁/(H·W). λ adapts as in Neural Cleanse
and DECREE: ×LAMBDA_FACTOR after more than PATIENCE steps in a row that met the collapse threshold,
÷LAMBDA_FACTOR after more than PATIENCE steps that missed it. The scan reports PL1 = ‖m‖₁/(H·W),
the fraction of the image area, of the smallest mask whose batch reached the threshold and that
all the optimisation images confirm (a 4 px trigger at 32 px covers 0.016 of the image; a clean
encoder should need a larger stamp), and stops once that best has not shrunk by 1 % for
STOP_PATIENCE steps (DECREE's early stop) or at ``max_steps``.

The inverted trigger is then stamped on held-out images from the same folder (never those it was
optimised on) and scored with the paper's own z-score (Definition 1, ``metrics/zscore.py``), so a
scan is read in the same units as an attack's evaluation.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..config import ModelScanConfig, to_dict
from ..data.evalsets import EvalSet, load_evalset, load_wds_evalset
from ..data.worldfolder import world_eval_pointer
from ..io import UserError, atomic_dir, atomic_write_bytes, atomic_write_json, check_out, package_versions, \
    png_bytes, resize_to_input, rng_for, sha256_file
from ..metrics.embed import split_preprocess
from ..metrics.zscore import backdoor_z_score, pair_similarity_moments
from ..victims.export import CONFIG, WEIGHTS, load_victim

# λ schedule: start, factor, bounds. λ prices PL1, a fraction of the image area, so one value serves
# every input size (DECREE prices the raw L1 sum). The factor is Neural Cleanse's 1.5: DECREE's 5
# swung λ between 0.1 and 60 within 30 steps on the demo's victims, and the mask with it.
LAMBDA_INIT, LAMBDA_FACTOR, LAMBDA_MIN, LAMBDA_MAX = 0.1, 1.5, 1e-4, 1e3
PATIENCE = 5  # steps in a row that meet (miss) the threshold before λ goes up (down)
STOP_PATIENCE = 100  # steps in which no collapsing mask is 1 % smaller than the best before the scan stops
EMBED_BATCH = 256  # images per forward pass when embedding without gradients
PREVIEW_PX = 256  # trigger.png and mask.png are upscaled (nearest neighbour) to at least this size

Encode = Callable[[torch.Tensor], torch.Tensor]


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x' = (1 − m)·x + m·p for N×3×H×W images in [0, 1], an H×W mask and a 3×H×W pattern."""
    return (1 - mask) * images + mask * pattern


def mean_pair_cosine(emb: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the ordered pairs u ≠ v of a batch (self-pairs left out), differentiable."""
    e = torch.nn.functional.normalize(emb, dim=1)
    n = len(e)
    s = e.sum(dim=0)
    return (s @ s - (e * e).sum()) / (n * (n - 1))


@torch.no_grad()
def _embed(encode: Encode, images: torch.Tensor, mask=None, pattern=None) -> np.ndarray:
    out = []
    for start in range(0, len(images), EMBED_BATCH):
        x = images[start:start + EMBED_BATCH]
        out.append(encode(x if mask is None else stamp(x, mask, pattern)).double().numpy())
    return np.concatenate(out)


def invert_trigger(encode: Encode, images: torch.Tensor, cfg: ModelScanConfig = ModelScanConfig(),
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Search for the smallest mask m and pattern p whose stamp collapses ``encode``'s embeddings.

    ``encode``: a torch callable from N×3×H×W images in [0, 1] at the model's input size to N×d
    embeddings (any normalisation inside it). ``images``: the N ≥ 2 images to optimise on.
    Returns ``mask`` (H×W) and ``pattern`` (3×H×W) as float arrays in [0, 1] — the smallest mask
    that reached ``cfg.threshold`` if any did, else the last one —, ``pl1`` (its ‖m‖₁/(H·W)),
    ``reached``, ``mean_cosine`` (of that stamp over all ``images``, not one batch: a collapsing
    batch is kept only if all the images confirm it), ``clean_mean_cosine`` (without a stamp; at or
    above the threshold there is nothing to invert and PL1 is 0), ``steps``, ``best_step`` and
    ``lambda`` (λ at the end). Same ``cfg.seed``, same result (on one machine, same thread count).
    """
    n, _, h, w = images.shape
    if n < 2:
        raise UserError(f"trigger inversion needs at least 2 images (the collapse is a mean over distinct pairs); got {n}")
    clean_cos, _ = pair_similarity_moments(_embed(encode, images))
    if clean_cos >= cfg.threshold:  # nothing to invert: an empty mask already "collapses" (e.g. an untrained model)
        return {"mask": np.zeros((h, w), np.float32), "pattern": np.full((3, h, w), 0.5, np.float32), "pl1": 0.0,
                "reached": True, "mean_cosine": clean_cos, "clean_mean_cosine": clean_cos, "steps": 0,
                "best_step": 0, "lambda": LAMBDA_INIT}
    g = torch.Generator().manual_seed(cfg.seed)
    # DECREE's random start: mask and pattern uniform in (0, 1), so the first stamp covers half the image
    mask_logit = torch.logit(torch.rand(h, w, generator=g, dtype=torch.float32), eps=1e-4).requires_grad_()
    pattern_logit = torch.logit(torch.rand(3, h, w, generator=g, dtype=torch.float32), eps=1e-4).requires_grad_()
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=cfg.lr, betas=(0.5, 0.9))
    batch = min(cfg.batch_size, n)
    lam, up, down = LAMBDA_INIT, 0, 0
    found, since_best, step = [], 0, 0  # every new smallest mask whose batch collapsed
    mark = math.inf  # the patience restarts only when PL1 falls 1% below its value at the last restart
    for step in range(1, cfg.max_steps + 1):
        idx = torch.randperm(n, generator=g)[:batch]
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        cos = mean_pair_cosine(encode(stamp(images[idx], mask, pattern)))
        pl1 = mask.mean()
        opt.zero_grad()
        (-cos + lam * pl1).backward()
        hit = cos.item() >= cfg.threshold
        smaller = hit and (not found or pl1.item() < found[-1]["pl1"])
        if smaller:
            found.append({"mask": mask.detach().clone(), "pattern": pattern.detach().clone(), "pl1": pl1.item(),
                          "step": step})
        if smaller and pl1.item() < 0.99 * mark:
            mark, since_best = pl1.item(), 0
        elif found:
            since_best += 1
        opt.step()
        up, down = (up + 1, 0) if hit else (0, down + 1)
        if up > PATIENCE:
            lam, up = min(lam * LAMBDA_FACTOR, LAMBDA_MAX), 0
        elif down > PATIENCE:
            lam, down = max(lam / LAMBDA_FACTOR, LAMBDA_MIN), 0
        if progress is not None:
            progress(step, cfg.max_steps)
        if since_best >= STOP_PATIENCE:
            break
    # A batch that collapsed may be a lucky draw: confirm on all the images, smallest mask first.
    for best in reversed(found):
        mean_cos, _ = pair_similarity_moments(_embed(encode, images, best["mask"], best["pattern"]))
        if mean_cos >= cfg.threshold:
            break
    else:
        with torch.no_grad():
            best = {"mask": torch.sigmoid(mask_logit), "pattern": torch.sigmoid(pattern_logit),
                    "pl1": torch.sigmoid(mask_logit).mean().item(), "step": None}
        mean_cos, _ = pair_similarity_moments(_embed(encode, images, best["mask"], best["pattern"]))
    return {"mask": best["mask"].numpy(), "pattern": best["pattern"].numpy(), "pl1": best["pl1"],
            "reached": best["step"] is not None, "mean_cosine": mean_cos, "steps": step,
            "clean_mean_cosine": clean_cos, "best_step": best["step"], "lambda": lam}


def trigger_z_score(encode: Encode, heldout: torch.Tensor, mask: np.ndarray, pattern: np.ndarray) -> dict:
    """Definition 1's z-score of the stamp (m, p) on held-out images: how much more alike the
    stamped images embed than the clean ones, in clean-pair standard deviations."""
    m, p = torch.from_numpy(mask), torch.from_numpy(pattern)
    return backdoor_z_score(_embed(encode, heldout), _embed(encode, heldout, m, p))


def _preview(rgb: np.ndarray) -> bytes:
    """An H×W×3 image in [0, 1] as a PNG, upscaled by whole pixels so a 32 px trigger is visible."""
    k = max(1, math.ceil(PREVIEW_PX / max(rgb.shape[:2])))
    px = np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    return png_bytes(np.kron(px, np.ones((k, k, 1), dtype=np.uint8)))


def load_scan_images(images_root: str | Path, split: str, n: int) -> EvalSet:
    """Up to ``n`` images (labels unused) from a CLIP_benchmark webdataset folder, an ImageFolder
    tree, or a world folder (its eval set; the world says which split)."""
    root = Path(images_root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}; pass --images DIR: a CLIP_benchmark webdataset folder "
                        "(e.g. ../shared/data/cifar10-wds), a folder made by `clip-poison world`, or an ImageFolder tree")
    if (root / "world.json").is_file():
        eval_root, eval_split = world_eval_pointer(root)
        return load_wds_evalset(eval_root, eval_split, n)
    return load_evalset(root, split, n)


def trigger_rgb(inv: dict) -> np.ndarray:
    """The inverted stamp m·p on mid-grey, H×W×3 in [0, 1] (what trigger.png shows)."""
    m3 = inv["mask"][..., None]
    return (1 - m3) * 0.5 + m3 * inv["pattern"].transpose(1, 2, 0)


def scan_images(model, preprocess, images: list[np.ndarray], cfg: ModelScanConfig,
                progress: Callable[[int, int], None] | None = None) -> tuple[dict, dict]:
    """The scan proper on decoded images: a seeded split into ``cfg.max_images`` to optimise on and
    up to as many held out for the z-score; returns (result fields, the inversion)."""
    model.requires_grad_(False)  # only the trigger is optimised; the weights are never touched
    to_tensor, normalize = split_preprocess(preprocess)
    x = torch.stack([to_tensor(Image.fromarray(im)) for im in images])
    order = rng_for(cfg.seed, "scan-model/heldout").permutation(len(x))
    n_held = min(cfg.max_images, len(x) // 2)
    opt_idx, held_idx = order[n_held:][:cfg.max_images], order[:n_held]

    def encode(t: torch.Tensor) -> torch.Tensor:
        return model.encode_image(normalize(t), normalize=True)

    inv = invert_trigger(encode, x[torch.from_numpy(opt_idx)], cfg, progress)
    z = trigger_z_score(encode, x[torch.from_numpy(held_idx)], inv["mask"], inv["pattern"])
    h, w = inv["mask"].shape
    return {"pl1": inv["pl1"], "reached": inv["reached"], "z": z["z"], "zscore": z,
            "collapse_threshold": cfg.threshold, "mean_cosine": inv["mean_cosine"],
            "clean_mean_cosine": inv["clean_mean_cosine"], "steps": inv["steps"],
            "best_step": inv["best_step"], "lambda": inv["lambda"], "input_size": [h, w],
            "n_images": len(opt_idx), "n_heldout": len(held_idx), "seed": cfg.seed}, inv


def scan_model_run(checkpoint: str | Path, images: list[np.ndarray], cfg: dict, seed: int) -> dict:
    """The run loop's model scan of one victim on clean images it never saw (the run's seed drives
    the split and the start); the inverted stamp is kept as a base64 PNG for the report."""
    import base64

    t0 = time.time()
    from ..victims.models import input_size

    model, preprocess, _ = load_victim(checkpoint)
    result, inv = scan_images(model, preprocess, [resize_to_input(im, input_size(model)) for im in images],
                              ModelScanConfig(**{**cfg, "seed": seed}))
    result["trigger_png_base64"] = base64.b64encode(png_bytes(np.rint(trigger_rgb(inv) * 255).astype(np.uint8))).decode()
    result["seconds"] = round(time.time() - t0, 2)
    return result


def scan_model(checkpoint: str | Path, images_root: str | Path, out: str | Path, split: str = "test",
               cfg: ModelScanConfig = ModelScanConfig(), overwrite: bool = False,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Scan one open_clip local-dir checkpoint for a backdoor; write ``OUT/scan.json``,
    ``OUT/trigger.png`` (the stamp m·p on mid-grey) and ``OUT/mask.png`` (m, white = 1).

    ``cfg.max_images`` images from ``images_root`` are optimised on and up to as many others held
    out for the z-score (seeded split; a smaller folder is split in half). The checkpoint is only
    read. All images are held in memory as float tensors at the input size (512 × 3 × 32² = 6 MB;
    at 224 px, 300 MB).
    """
    t0 = time.time()
    ckpt = Path(checkpoint)
    if cfg.max_images < 2:
        raise UserError(f"--max-images {cfg.max_images}: the scan needs at least 2 images to optimise on "
                        "(the collapse is a mean over distinct pairs); pass 2 or more (default 512)")
    if not ckpt.is_dir():
        raise UserError(f"checkpoint folder not found: {ckpt}; pass the folder written by `clip-poison train` "
                        f"(with {CONFIG} and {WEIGHTS})")
    check_out(out, [ckpt, images_root], overwrite)
    model, preprocess, _ = load_victim(ckpt)
    found = load_scan_images(images_root, split, 2 * cfg.max_images)
    if len(found) < 4:
        raise UserError(f"{images_root} holds {len(found)} image(s); the scan needs at least 4 (2 to optimise on, "
                        "2 held out for the z-score); point --images at a folder with more")
    result, inv = scan_images(model, preprocess, found.images, cfg, progress)
    result.update({"checkpoint": {"path": str(ckpt.resolve()), "weights_sha256": sha256_file(ckpt / WEIGHTS),
                                  "config_sha256": sha256_file(ckpt / CONFIG)},
                   "images": {"root": str(Path(found.source).resolve()), "split": found.split},
                   "config": to_dict(cfg), "versions": package_versions()})
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_bytes(tmp / "trigger.png", _preview(trigger_rgb(inv)))
        atomic_write_bytes(tmp / "mask.png", _preview(np.repeat(inv["mask"][..., None], 3, axis=2)))
        result["seconds"] = round(time.time() - t0, 2)
        atomic_write_json(tmp / "scan.json", result)
    return result


__all__ = ["invert_trigger", "trigger_z_score", "scan_model", "scan_images", "scan_model_run", "trigger_rgb", "load_scan_images", "stamp", "mean_pair_cosine"]
