"""clip-poison command line: argument parsing, progress bars and tables only; logic lives in the
stage modules (world, attacks, victims, metrics, pipeline)."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from .config import (CAPTION_KEY, FIG3_MAX_PAIRS, FilterConfig, IMG_KEY, MAX_TARGETED_POISONS, PROBE_N, REPAIR_LR_DIVISOR, SEED,
                     BackdoorConfig, CraftOptions, DemoConfig, ModelScanConfig, RealWorldConfig, RepairConfig, ScanDataConfig,
                     TargetedConfig, TextConfig, TrainConfig, WorldConfig)
from .attacks.triggers import BLEND_ALPHA, SIG_DELTA, SIG_FREQUENCY, trigger_names
from .io import UserError, atomic_write_json, check_out

D_W, D_T, D_B, D_R = WorldConfig(), TargetedConfig(), BackdoorConfig(), TrainConfig()
D_X, D_RW, D_S, D_SD = TextConfig(), RealWorldConfig(), ModelScanConfig(), ScanDataConfig()
D_RP = RepairConfig()
CAPTION_FIELDS = ("p_class_word", "p_synonym", "p_noisy_pair", "p_context", "p_distractor")


class _Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _sub(subs, name: str, help_: str, example: str) -> argparse.ArgumentParser:
    return subs.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                           formatter_class=_Fmt)


def _checked(conv, ok, what: str):
    """An argparse ``type=`` that also checks the value, so a bad number stops before any work."""
    def parse(text: str):
        try:
            v = conv(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; pass {what}")
        return v
    return parse


POS_INT = _checked(int, lambda v: v >= 1, "a whole number >= 1")
NONNEG_INT = _checked(int, lambda v: v >= 0, "a whole number >= 0")
POS_FLOAT = _checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
NONNEG_FLOAT = _checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
FRACTION = _checked(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
CROP = _checked(float, lambda v: 0 < v <= 1, "a crop scale in (0, 1]")
PARALLEL = _checked(lambda t: t if t == "auto" else int(t), lambda v: v == "auto" or v >= 1,
                    "'auto' or a whole number >= 1")
N_TARGETED = _checked(int, lambda v: 1 <= v <= MAX_TARGETED_POISONS,
                      f"a whole number from 1 to {MAX_TARGETED_POISONS:,}")
# '\t' typed in a shell arrives as backslash-t; a one-character separator is what both CSV readers take.
SEPARATOR = _checked(lambda t: {"\\t": "\t", "tab": "\t"}.get(t, t), lambda v: len(v) == 1,
                     "one character (e.g. ',' or '\\t')")


def _add_csv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="training set: OpenCLIP CSV (e.g. WORLD/train.csv) or "
                   "img2dataset webdataset shards ('dir/{00000..00009}.tar'); only read, never modified")
    p.add_argument("--csv-img-key", default=IMG_KEY, help="CSV column holding image paths")
    p.add_argument("--csv-caption-key", default=CAPTION_KEY, help="CSV column holding captions")
    p.add_argument("--csv-separator", type=SEPARATOR, default=",", help="CSV field separator ('\\t' for tab)")
    _add_outside_arg(p)


def _add_outside_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let relative image paths in your CSV leave its folder ('../x.png'); refused by default")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=D_R.model, help="victim model (`clip-poison list models`; any open_clip name)")
    p.add_argument("--epochs", type=POS_INT, default=D_R.epochs, help="epochs (paper: 30)")
    p.add_argument("--batch-size", type=POS_INT, default=D_R.batch_size, help="batch size (paper: 1024)")
    p.add_argument("--lr", type=POS_FLOAT, default=D_R.lr, help="peak learning rate (paper: 2e-4)")
    p.add_argument("--wd", type=NONNEG_FLOAT, default=D_R.wd, help="weight decay (paper: 0.02)")
    p.add_argument("--warmup", type=NONNEG_INT, default=D_R.warmup, help="warmup steps (open_clip_train's 10,000 keeps a tiny run at lr≈0)")
    p.add_argument("--crop-scale", type=CROP, nargs=2, default=list(D_R.crop_scale), metavar=("LO", "HI"),
                   help="RandomResizedCrop scale; OpenCLIP's default is 0.9 1.0, which smears small triggers at 32 px")
    p.add_argument("--backend", choices=["fast", "open_clip_train"], default=D_R.backend,
                   help="fast = in-process open_clip loop (data in RAM); open_clip_train = OpenCLIP's own trainer")
    p.add_argument("--workers", type=NONNEG_INT, default=D_R.workers, help="DataLoader workers (open_clip_train backend)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "amp"], default=D_R.precision,
                   help="auto = fp32 on CPU, amp_bf16 (bfloat16 autocast) on CUDA; bf16 = bfloat16 autocast on either "
                        "(faster for the 5-30M victims on CPUs with bf16 units, measured in docs/results/speed/precision.md); "
                        "amp = CUDA float16 "
                        "autocast + GradScaler; train.json records the precision used")
    p.add_argument("--gpus", type=POS_INT, default=D_R.gpus,
                   help="GPUs training one victim: > 1 runs open_clip_train under torchrun (--backend open_clip_train), "
                        "each GPU taking batch-size / gpus of every batch")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="clip-poison", formatter_class=_Fmt,
        description="Poisoning and backdooring contrastive learning (Carlini & Terzis, ICLR 2022) with OpenCLIP.",
        epilog="example:\n  clip-poison demo --out runs/demo")
    subs = ap.add_subparsers(dest="cmd", required=True)

    p = _sub(subs, "demo", "the whole paper loop on the embedded world: world, poisons, three victims (clean, "
             "targeted poisons only, backdoor poisons only), evaluation, summary.json", "clip-poison demo --out runs/demo")
    p.add_argument("--out", default="runs/demo", help="output folder (must be new unless --overwrite)")
    p.add_argument("--seed", type=int, default=SEED, help="one seed for every stage")
    p.add_argument("--n-train", type=POS_INT, default=D_W.n_train, help="clean training pairs")
    p.add_argument("--targeted-poisons", type=N_TARGETED, default=D_T.n_poisons, help="targeted poisons (copies of x')")
    p.add_argument("--backdoor-poisons", type=POS_INT, default=D_B.n_poisons, help="backdoor poisons (paper: 0.01%% of 3M)")
    p.add_argument("--patch-size", type=int, default=D_B.patch_size, help="checkerboard size in pixels at input size")
    p.add_argument("--label", default=None,
                   help=f"target label y' of both attacks (default {D_B.target_label!r}; with --world cifar10: 'cat')")
    p.add_argument("--world", choices=["synthetic", "cifar10", "real"], default="synthetic",
                   help="synthetic = the embedded world; cifar10 / real = photos under --root captioned like alt-text "
                        "(train split), evaluated on the source's test split")
    p.add_argument("--root", default=None, help="with --world cifar10/real: the labelled source (e.g. ../shared/data/cifar10-wds)")
    p.add_argument("--lexicon", default=None, help="with --world cifar10/real: synonyms/contexts file (default: shipped)")
    p.add_argument("--eval-max-n", type=POS_INT, default=None, help="evaluate on the first N eval images only (default: all)")
    _add_train_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = _sub(subs, "world", "make a training world: the embedded synthetic one (train CSV + labelled eval set), or "
             "real photos with web-like captions from a labelled set (CLIP_benchmark wds layout or ImageFolder); "
             "real worlds use the source's train split only and point at its test split for evaluation",
             "clip-poison world --out runs/world --seed 0\n"
             "  clip-poison world cifar10 --root ../shared/data/cifar10-wds --n-train 10000 --out runs/cifar10")
    p.add_argument("source", nargs="?", choices=["synthetic", "cifar10", "real"], default="synthetic",
                   help="synthetic = the embedded world; cifar10 / real = photos under --root (layout auto-detected)")
    p.add_argument("--root", default=None, help="real worlds: labelled source (classnames.txt + train/*.tar, or class sub-folders)")
    p.add_argument("--lexicon", default=None, help="real worlds: synonyms/contexts JSON or YAML (default: the shipped one matching the classes)")
    p.add_argument("--split", default="train", help="real worlds: the source split to caption (never the eval split)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=D_W.seed)
    p.add_argument("--n-train", type=POS_INT, default=None,
                   help=f"training pairs (synthetic default {D_W.n_train}; real default: the whole split, else a seeded subset)")
    p.add_argument("--n-eval", type=POS_INT, default=D_W.n_eval, help="synthetic: labelled eval images")
    p.add_argument("--image-size", type=int, default=D_W.image_size, help="synthetic: pixels per side (>= 32)")
    p.add_argument("--p-class-word", type=FRACTION, default=D_W.p_class_word, help="fraction of captions naming the class word")
    p.add_argument("--p-synonym", type=FRACTION, default=D_W.p_synonym, help="fraction of captions using a synonym/hyponym instead")
    p.add_argument("--p-noisy-pair", type=FRACTION, default=D_W.p_noisy_pair, help="fraction of pairs captioned with another class (real: or none)")
    p.add_argument("--p-context", type=FRACTION, default=D_RW.p_context, help="real worlds: fraction of object phrases with a context phrase")
    p.add_argument("--p-distractor", type=FRACTION, default=D_RW.p_distractor, help="real worlds: fraction of object phrases with a distractor word")
    p.add_argument("--wds-shard-size", type=POS_INT, default=None,
                   help="real worlds: also write the pairs as webdataset shards of this size (train_wds/)")
    p.add_argument("--overwrite", action="store_true")

    p = _sub(subs, "poison", "craft a poison set (new rows + manifest.json; the dataset is never modified)",
             "clip-poison poison backdoor --data runs/world/train.csv --label tent --out runs/p_bd")
    psubs = p.add_subparsers(dest="attack", required=True)

    def craft_args(q: argparse.ArgumentParser, seed: int) -> None:
        q.add_argument("--synonyms", nargs="*", default=[], help="more words mined as y' (whole words, case-insensitive)")
        q.add_argument("--mode", choices=["add", "replace"], default="add",
                       help="add: X' = X ∪ P (paper); replace: P replaces as many seeded clean rows (recorded in the manifest)")
        q.add_argument("--format", choices=["csv", "wds"], default=None,
                       help="poison set format (default: the format of --data); wds = poisons-000000.tar with PNG members")
        q.add_argument("--caption-substitution", type=FRACTION, default=0.0,
                       help="dedup evasion: probability of swapping each non-label word for a listed substitute")
        q.add_argument("--filler-words", type=NONNEG_INT, default=0, help="dedup evasion: filler words inserted per caption")
        q.add_argument("--no-repeat-captions", action="store_true",
                       help="fail instead of cycling the caption set when it is smaller than --n-poisons")
        q.add_argument("--caption-index", default=None,
                       help="Parquet file to reuse (or save) the training-caption index; keep it outside the dataset")
        q.add_argument("--seed", type=int, default=seed)
        q.add_argument("--out", required=True, help="new folder for the poison set")
        q.add_argument("--overwrite", action="store_true")
    t = _sub(psubs, "targeted", "§3.1 targeted poisoning: copies of one eval image x' with captions about y'",
             "clip-poison poison targeted --data runs/world/train.csv --eval-root runs/world/eval --label tent --out runs/p_t")
    _add_csv_args(t)
    t.add_argument("--eval-root", required=True, help="eval set (CLIP_benchmark wds layout) that holds x'")
    t.add_argument("--split", default="test", help="eval split holding x'")
    t.add_argument("--label", nargs="+", default=[D_T.target_label],
                   help="target label y' (a class of the eval set); several = several independent targets in one set")
    t.add_argument("--target-index", type=int, nargs="+", default=None,
                   help="index of x' in the eval split, one per --label (default: seeded random, true class != y')")
    t.add_argument("--n-poisons", type=N_TARGETED, default=D_T.n_poisons, help="poisons (paper: 1..512)")
    t.add_argument("--caption-source", choices=["mined", "templates"], default=D_T.caption_source,
                   help="captions mined from the training set, or CLIP's 80 ImageNet templates")
    t.add_argument("--noise-sigma", type=NONNEG_FLOAT, default=D_T.noise_sigma, help="Gaussian noise per copy (pixel units) to evade exact dedup")
    craft_args(t, D_T.seed)
    b = _sub(psubs, "backdoor", "§3.3 backdoor: training images with a trigger (the paper's checkerboard patch, or a "
             "full-image blended / SIG pattern), captions about y'",
             "clip-poison poison backdoor --data runs/world/train.csv --label tent --n-poisons 100 --out runs/p_bd")
    _add_csv_args(b)
    b.add_argument("--label", default=D_B.target_label, help="target label y'")
    b.add_argument("--n-poisons", type=POS_INT, default=D_B.n_poisons, help="poisons (paper: 300 of 3M = 0.01%%)")
    b.add_argument("--trigger", choices=trigger_names(), default=D_B.trigger,
                   help="checkerboard = the paper's patch; blended = Chen et al. 2017 (noise blended in with "
                        f"α = {BLEND_ALPHA}); sig = Barni et al. 2019 (sine stripes, Δ = {SIG_DELTA}, f = {SIG_FREQUENCY}); "
                        "the full-image ones ignore --patch-size")
    b.add_argument("--patch-size", type=POS_INT, default=D_B.patch_size, help="patch side in pixels at the model input size (paper: 16 at 224)")
    b.add_argument("--placement", choices=["consistent", "random"], default=D_B.placement,
                   help="upper-left, or uniform per image (full-image triggers: as is, or circularly shifted per image)")
    b.add_argument("--model", default=D_R.model, help="victim model whose input size the trigger is stamped at")
    b.add_argument("--base-pool", default=None,
                   help="held-out CSV (or shards) to take base images from instead of --data; captions still mined from --data")
    craft_args(b, D_B.seed)
    x = _sub(psubs, "text", "§2.3 text poisoning: one caption t' paired with training images of y', so t' embeds as y'",
             "clip-poison poison text --data runs/world/train.csv --caption 'a photo of my backyard' --label tent --out runs/p_txt")
    _add_csv_args(x)
    x.add_argument("--caption", default=D_X.caption, help="the target caption t' (must not name y')")
    x.add_argument("--label", default=D_X.target_label, help="concept y' whose images (mined from captions) get t'")
    x.add_argument("--n-poisons", type=POS_INT, default=D_X.n_poisons, help="poisons = distinct images of y'")
    craft_args(x, D_X.seed)

    p = _sub(subs, "train", "train a victim on X ∪ P and export an open_clip local-dir checkpoint",
             "clip-poison train --data runs/world/train.csv --poisons runs/p_bd --out runs/victim")
    p.add_argument("--data", required=True, help="clean training CSV (filepath,title)")
    p.add_argument("--poisons", nargs="*", default=[], help="poison set folders to add (X' = X ∪ P)")
    _add_outside_arg(p)
    p.add_argument("--allow-shared-label", action="store_true",
                   help="allow two poison sets with the same target label in one victim (it then measures neither alone)")
    _add_train_args(p)
    p.add_argument("--record-pair-loss", action="store_true",
                   help="also write every pair's contrastive loss per epoch (pair_loss.npy, for the loss-dynamics "
                        "detector); fast backend only; training is unchanged")
    p.add_argument("--init", metavar="CKPT", help="fine-tune this checkpoint instead of training from scratch: a "
                   "local-dir folder from `clip-poison train` or an open_clip weights file of the same --model")
    p.add_argument("--defense", choices=["none", "safeclip"], default=D_R.defense,
                   help="robust training (fast backend): safeclip = SafeCLIP (Yang et al., ICML 2024, 'Better Safe "
                        "than Sorry'): in-modal warm-up, then each epoch a GMM on image-caption cosines splits the "
                        "pairs into safe (CLIP loss) and risky (in-modal loss); needs --epochs >= 7")
    p.add_argument("--seed", type=int, default=D_R.seed)
    p.add_argument("--out", required=True, help="new checkpoint folder")
    p.add_argument("--overwrite", action="store_true")

    p = _sub(subs, "evaluate", "zero-shot accuracy, targeted ASR, backdoor ASR and z-score of a checkpoint",
             "clip-poison evaluate --checkpoint runs/victim --eval-root runs/world/eval --poisons runs/p_bd")
    p.add_argument("--checkpoint", required=True, help="open_clip local-dir folder")
    p.add_argument("--eval-root", required=True, help="labelled eval set: CLIP_benchmark wds layout or an ImageFolder tree")
    p.add_argument("--split", default="test")
    p.add_argument("--poisons", nargs="*", default=[], help="poison sets whose attacks to measure")
    p.add_argument("--max-n", type=POS_INT, default=None, help="evaluate the first N eval images only")
    p.add_argument("--seed", type=int, default=SEED, help="seed of random trigger placement at test time")
    p.add_argument("--metrics", default=None,
                   help="comma list of zeroshot,probe,targeted,backdoor,zscore,fig3 (default: all but fig3; probe "
                        "when --probe-train is given)")
    p.add_argument("--probe-train", default=None,
                   help="§4.2 linear probe training set: a labelled set (e.g. ../shared/data/cifar10-wds with "
                        "--probe-split train), or a synthetic world folder (renders --probe-n fresh labelled images)")
    p.add_argument("--probe-split", default="train", help="split of --probe-train")
    p.add_argument("--probe-n", type=POS_INT, default=None,
                   help=f"probe training images (first N; synthetic worlds: how many to render, default {PROBE_N})")
    p.add_argument("--cache-dir", default=None, help="embedding cache folder (default: CHECKPOINT/embeddings)")
    p.add_argument("--no-cache", action="store_true", help="compute embeddings without reading or writing a cache")
    p.add_argument("--fig3-max-pairs", type=NONNEG_INT, default=FIG3_MAX_PAIRS, help="pairs sampled for Figure 3 (0 = all)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    p = _sub(subs, "scan", "defenses: scan a training set for poisons (data) or a model for a backdoor (model)",
             "clip-poison scan data --data runs/world/train.csv --poisons runs/p_bd --checkpoint runs/victim --out runs/scan")
    ssubs = p.add_subparsers(dest="scan", required=True)
    m = _sub(ssubs, "model", "blind trigger inversion after DECREE (CVPR 2023): the smallest mask whose stamp makes "
             f"the image embeddings collapse (mean cosine >= {D_S.threshold}); writes scan.json (PL1 = mask area "
             "fraction, the z-score of Definition 1 on held-out images), trigger.png and mask.png",
             "clip-poison scan model --checkpoint runs/victim --images ../shared/data/cifar10-wds --out runs/scan")
    m.add_argument("--checkpoint", required=True, help="open_clip local-dir folder (only read)")
    m.add_argument("--images", required=True, help="unlabelled images: a CLIP_benchmark webdataset folder, a folder "
                   "made by `clip-poison world` (its eval set) or an ImageFolder tree")
    m.add_argument("--split", default="test", help="split of --images (a world folder names its own)")
    m.add_argument("--max-images", type=POS_INT, default=D_S.max_images,
                   help="images to optimise the trigger on; up to as many others are held out for the z-score")
    m.add_argument("--seed", type=int, default=D_S.seed)
    m.add_argument("--out", required=True, help="new folder for scan.json, trigger.png and mask.png")
    m.add_argument("--overwrite", action="store_true")

    f = _sub(ssubs, "filter", "the scanned pairs less one detector's most suspicious fraction, as an OpenCLIP CSV "
             "to retrain on (filter-and-retrain); needs a `scan data` folder of CSV data",
             "clip-poison scan filter --scan runs/scan --detector clip-score --fraction 0.1 --out runs/kept.csv")
    f.add_argument("--scan", dest="scan_dir", required=True, help="folder written by `clip-poison scan data` (only read)")
    f.add_argument("--detector", required=True, help="the scan's column to rank by (e.g. clip-score, dao+ref)")
    f.add_argument("--fraction", type=POS_FLOAT, default=FilterConfig.fraction,
                   help="share of the pairs to remove (the defender does not know |P|)")
    f.add_argument("--out", required=True, help="new CSV of the kept pairs (absolute image paths)")
    f.add_argument("--overwrite", action="store_true")

    p = _sub(subs, "repair", "defenses: repair a poisoned checkpoint with CleanCLIP (Bansal et al., ICCV 2023): "
             "fine-tune it on clean pairs with CLIP loss + in-modal loss (each image and caption against its own "
             "augmented view); writes a new checkpoint, the input is only read",
             "clip-poison repair --checkpoint runs/victim_bd --data runs/clean/train.csv --out runs/victim_bd_repaired")
    p.add_argument("--checkpoint", required=True, help="local-dir checkpoint to repair (only read)")
    p.add_argument("--data", required=True, help="clean fine-tuning pairs: OpenCLIP CSV (filepath,title); only read")
    _add_outside_arg(p)
    p.add_argument("--out", required=True, help="new checkpoint folder")
    p.add_argument("--lr", type=POS_FLOAT, default=None, help=f"peak learning rate; unset = 1/{REPAIR_LR_DIVISOR} of the checkpoint's "
                   "recorded lr (CleanCLIP: 1e-5 after 5e-4)")
    p.add_argument("--epochs", type=POS_INT, default=D_RP.epochs, help="epochs (CleanCLIP: 10)")
    p.add_argument("--batch-size", type=POS_INT, default=D_RP.batch_size, help="batch size (CleanCLIP: 64)")
    p.add_argument("--warmup", type=NONNEG_INT, default=D_RP.warmup, help="warmup steps (CleanCLIP: 50)")
    p.add_argument("--wd", type=NONNEG_FLOAT, default=D_RP.wd, help="weight decay (CleanCLIP: 0.1)")
    p.add_argument("--clip-weight", type=NONNEG_FLOAT, default=D_RP.clip_weight, help="weight of the CLIP loss (λ1)")
    p.add_argument("--inmodal-weight", type=NONNEG_FLOAT, default=D_RP.inmodal_weight,
                   help="weight of the in-modal loss (λ2)")
    p.add_argument("--model", default=None, help="the checkpoint's architecture; unset = its train.json's "
                   "recipe.model")
    p.add_argument("--seed", type=int, default=D_RP.seed)
    p.add_argument("--overwrite", action="store_true")

    p = _sub(subs, "sweep", "run a declarative, resumable sweep (a YAML spec or a preset) of poisoned and clean "
             "victims; finished runs in OUT/results are skipped",
             "clip-poison sweep fig4-placement --size quick --out runs/sweeps/fig4-quick")
    p.add_argument("spec", help="sweep spec YAML, or a preset name (`clip-poison sweep --list`)", nargs="?")
    p.add_argument("--size", default=None, help="a size defined in the spec (presets: quick, paper)")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/NAME-SIZE); rerun to resume")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local = on this machine (one run at a time, or --parallel N at once); ray = one Ray task per run")
    p.add_argument("--address", default=None, help="Ray cluster address (auto, host:port); default starts a local Ray")
    p.add_argument("--parallel", type=PARALLEL, default=1,
                   help="local: victims trained at once, each in its own process with cores/N torch threads (1 = one "
                   "at a time in this process; auto = the best N benchmarks/bench_parallel.py measured for the "
                   "sweep's models on this many cores, else 1). CPU results depend on the thread count (recorded as "
                   "train.threads), so a sweep repeats bitwise at the same --parallel")
    p.add_argument("--keep-checkpoints", action="store_true", default=None, help="keep each run's victim checkpoint")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are finished, run nothing")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--report", action="store_true", help="build the report when the sweep ends")

    p = _sub(subs, "report", "tidy table (parquet + CSV), figures (PNG) and report.md from a sweep's results",
             "clip-poison report runs/sweeps/fig4-quick")
    p.add_argument("results", nargs="+", help="a sweep folder or its results/ folder; several are pooled into "
                   "one report (e.g. a model scan judged on the victims of two sweeps; needs --out)")
    p.add_argument("--out", default=None, help="report folder (default: the sweep folder)")

    p = _sub(ssubs, "data", "score every training pair with the data-scan detectors (higher = more suspicious); "
             "with --poisons, ROC-AUC, PR-AUC and FPR at 95 percent TPR per detector and poison set",
             "clip-poison scan data --data runs/world/train.csv --poisons runs/p_bd --checkpoint runs/victim --out runs/scan")
    p.add_argument("--data", required=True, help="clean training data: OpenCLIP CSV or webdataset shards; only read")
    p.add_argument("--poisons", nargs="*", default=[],
                   help="poison sets trained on with --data (the scanned set is data + poisons, as `train` composes it; "
                        "their manifests are the truth)")
    p.add_argument("--checkpoint", required=True, help="open_clip local-dir checkpoint that embeds the pairs "
                   "(the victim trained on this data, or a clean model with --clean-model)")
    p.add_argument("--detectors", default=",".join(D_SD.detectors),
                   help="comma list of detectors (loss-dynamics needs a victim trained with --record-pair-loss)")
    p.add_argument("--k", type=POS_INT, default=D_SD.k, help="neighbours of k-dist, slof and dao")
    p.add_argument("--reference", default=None, help="clean labelled images (wds or ImageFolder) the density "
                   "detectors also score against (columns NAME+ref); never images of the scanned set")
    p.add_argument("--reference-split", default="test")
    p.add_argument("--reference-n", type=POS_INT, default=D_SD.reference_n, help="first N reference images")
    p.add_argument("--clean-model", action="store_true",
                   help="the checkpoint is a clean reference model: clip-score flags pairs that agree badly (sign -1)")
    p.add_argument("--top", type=POS_INT, default=1000, help="rows per detector in ranked.csv")
    _add_outside_arg(p)
    p.add_argument("--seed", type=int, default=SEED, help="seed of the GMM split")
    p.add_argument("--out", required=True, help="new folder for scores.parquet, pairs.parquet, ranked.csv, metrics.json")
    p.add_argument("--overwrite", action="store_true")

    p = _sub(subs, "list", "list registered victims (with the size ladder) and training-recipe presets",
             "clip-poison list models")
    p.add_argument("what", choices=["models", "recipes"], help="models: victims and recipes; recipes: recipes only")
    return ap


def _quiet_libraries() -> None:
    # open_clip warns "No pretrained weights loaded" for every from-scratch victim: expected here.
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)


def _train_cfg(a, seed: int) -> TrainConfig:
    if a.crop_scale[0] > a.crop_scale[1]:
        raise UserError(f"--crop-scale {a.crop_scale[0]:g} {a.crop_scale[1]:g} has LO > HI; pass LO <= HI, e.g. 0.9 1.0")
    return TrainConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, wd=a.wd,
                       warmup=a.warmup, seed=seed, crop_scale=tuple(a.crop_scale), backend=a.backend,
                       workers=a.workers, precision=a.precision, gpus=a.gpus)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


def cmd_demo(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from .run import run_demo

    console = Console()
    check_out(a.out, [a.root, a.lexicon], a.overwrite)
    if a.backdoor_poisons > a.n_train:  # the backdoor stamps distinct training images
        raise UserError(f"--backdoor-poisons {a.backdoor_poisons} exceeds --n-train {a.n_train}; lower it or raise --n-train")
    cfg = DemoConfig(seed=a.seed)
    cfg.world.n_train = a.n_train
    real = None
    if a.world != "synthetic":
        real = _real_world_cfg(argparse.Namespace(root=a.root, seed=a.seed, lexicon=a.lexicon, source=a.world,
                                                  **{f: getattr(D_RW, f) for f in CAPTION_FIELDS}), a.n_train)
    # 'tent' is a class of the synthetic world; CIFAR-10 has 'cat' (the TOOLCHAIN feasibility probe's target).
    a.label = a.label or (D_B.target_label if real is None else "cat")
    cfg.targeted.n_poisons, cfg.targeted.target_label = a.targeted_poisons, a.label
    cfg.backdoor.n_poisons, cfg.backdoor.target_label, cfg.backdoor.patch_size = a.backdoor_poisons, a.label, a.patch_size
    cfg.train = _train_cfg(a, a.seed)
    tasks: dict[str, int] = {}
    with _progress() as prog:
        def stage(msg: str) -> None:
            prog.console.print(f"[bold]•[/bold] {msg}")

        def train_progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = prog.add_task(f"training {name} victim (samples)", total=total)
            prog.update(tasks[name], completed=done)

        s = run_demo(cfg, a.out, overwrite=a.overwrite, stage=stage, train_progress=train_progress,
                     real_world=real, eval_max_n=a.eval_max_n)
    at = s["attack"]
    table = Table(title=f"clip-poison demo (seed {s['seed']}, {s['n_train_clean']} clean pairs, {s['seconds']:.0f} s): "
                        "one victim per attack")
    table.add_column("metric")
    for col in ("clean victim", "targeted victim", "backdoor victim"):
        table.add_column(col, justify="right")
    bd = at["backdoor"]
    rows = [
        ("zero-shot accuracy", "zeroshot_accuracy", "{:.1%}", ("clean", "targeted", "backdoor")),
        (f"targeted ASR: x' (a {at['targeted']['x_prime_true_label']}) → {at['targeted']['target_label']!r}, "
         f"{at['targeted']['n_poisons']} poisons", "targeted_success_rate", "{:.0%}", ("clean", "targeted")),
        (f"backdoor ASR, {bd['trigger']['patch_size']}px checkerboard upper-left → {bd['target_label']!r}, "
         f"{bd['n_poisons']} poisons ({bd['poison_rate']:.2%})", "backdoor_asr_consistent", "{:.1%}", ("clean", "backdoor")),
        ("backdoor ASR, trigger at random positions", "backdoor_asr_random", "{:.1%}", ("clean", "backdoor")),
        ("backdoor z-score (Definition 1)", "backdoor_z_consistent", "{:.2f}", ("clean", "backdoor")),
    ]
    for label, key, fmt, victims in rows:
        table.add_row(label, *(fmt.format(s[v][key]) if v in victims else "–" for v in ("clean", "targeted", "backdoor")))
    console.print(table)
    console.print(f"summary: {Path(a.out) / 'summary.json'}   augmentation: crop scale {s['augmentation']['random_resized_crop_scale']}")
    return 0


def _real_world_cfg(a, n_train: int | None):
    if not a.root:
        raise UserError(f"`clip-poison world {a.source}` needs --root DIR: a labelled set in CLIP_benchmark's "
                        "webdataset layout (e.g. ../shared/data/cifar10-wds) or an ImageFolder tree")
    return RealWorldConfig(root=a.root, seed=a.seed, n_train=n_train, split=getattr(a, "split", "train"),
                           lexicon=a.lexicon, wds_shard_size=getattr(a, "wds_shard_size", None),
                           **{f: getattr(a, f) for f in CAPTION_FIELDS})


def cmd_world(a) -> int:
    from .data.world import write_world

    check_out(a.out, [a.root, a.lexicon], a.overwrite)
    if a.source != "synthetic":
        from .data.realworld import write_real_world

        info = write_real_world(_real_world_cfg(a, a.n_train), a.out, overwrite=a.overwrite,
                                progress=lambda m: print(f"• {m}"))
        k = info["caption_kinds"]
        print(f"wrote {a.out}: {info['n_train']} photo–caption pairs (train.csv, source image bytes unchanged), "
              f"class word in {info['own_class_word_fraction']:.0%} of captions, "
              f"{k['noisy_other_class'] + k['noisy_none']} noisy pairs; world.json")
        print(f"eval set: {info['eval_root']} split {info['eval_split']!r} (read in place)" if info["eval_root"]
              else "eval set: none (the source has no test split in webdataset layout); pass --eval-root when evaluating")
        return 0
    cfg = WorldConfig(seed=a.seed, n_train=a.n_train if a.n_train is not None else D_W.n_train, n_eval=a.n_eval,
                      image_size=a.image_size, p_class_word=a.p_class_word, p_synonym=a.p_synonym,
                      p_noisy_pair=a.p_noisy_pair)
    info = write_world(cfg, a.out, overwrite=a.overwrite, progress=lambda m: print(f"• {m}"))
    print(f"wrote {a.out}: {info['n_train']} training pairs (train.csv), {info['n_eval']} eval images (eval/), world.json")
    return 0


def cmd_poison(a) -> int:
    from .attacks.backdoor import craft_backdoor_poisons
    from .data.sources import open_training_data
    from .attacks.targeted import craft_multi_targeted_poisons
    from .attacks.text import craft_text_poisons
    from .data.evalsets import load_wds_evalset
    from .victims.models import image_size

    check_out(a.out, [a.data, getattr(a, "eval_root", None), getattr(a, "base_pool", None), a.caption_index],
              a.overwrite)
    train = open_training_data(a.data, a.csv_img_key, a.csv_caption_key, a.csv_separator)
    opt = CraftOptions(mode=a.mode, format=a.format, synonyms=tuple(a.synonyms), allow_repeat=not a.no_repeat_captions,
                       caption_substitution=a.caption_substitution, filler_words=a.filler_words,
                       base_pool=getattr(a, "base_pool", None), caption_index=a.caption_index)
    if a.attack == "targeted":
        idxs = a.target_index or [None] * len(a.label)
        if len(idxs) != len(a.label):
            raise UserError(f"{len(a.label)} --label value(s) but {len(idxs)} --target-index value(s); give one index per label")
        cfgs = [TargetedConfig(target_label=lab, target_index=i, n_poisons=a.n_poisons, caption_source=a.caption_source,
                               noise_sigma=a.noise_sigma, seed=a.seed) for lab, i in zip(a.label, idxs)]
        m = craft_multi_targeted_poisons(cfgs, train, load_wds_evalset(a.eval_root, a.split), a.out,
                                         overwrite=a.overwrite, options=opt)
        for t in m["targets"]:
            print(f"target {t['target_id']}: x' = eval image {t['eval_index']} (a {t['true_label']}) → {t['label']!r}, "
                  f"{t['n_poisons']} poisons; caption set of {t['caption_set']['size']}")
        print(f"wrote {m['n_poisons']} targeted poisons ({m['format']}, mode {m['mode']}) to {a.out}")
    elif a.attack == "backdoor":
        cfg = BackdoorConfig(target_label=a.label, n_poisons=a.n_poisons, trigger=a.trigger,
                             patch_size=a.patch_size, placement=a.placement, seed=a.seed)
        m = craft_backdoor_poisons(cfg, train, image_size(a.model), a.out, overwrite=a.overwrite, options=opt)
        t = m["trigger"]
        print(f"wrote {m['n_poisons']} backdoor poisons ({m['format']}, mode {m['mode']}) to {a.out}: "
              + (f"full-image {t['name']} {t['params']}" if t.get("full_image") else f"{t['patch_size']}px {t['name']}")
              + f" ({a.placement}) → {a.label!r}; caption set of {m['caption_set']['size']}")
    else:
        cfg = TextConfig(caption=a.caption, target_label=a.label, n_poisons=a.n_poisons, seed=a.seed)
        m = craft_text_poisons(cfg, train, a.out, overwrite=a.overwrite, options=opt)
        print(f"wrote {m['n_poisons']} text poisons ({m['format']}, mode {m['mode']}) to {a.out}: {a.caption!r} "
              f"paired with images of {a.label!r} (of {m['image_set']['size']} mined)")
    return 0


def cmd_train(a) -> int:
    from .defenses.robust import objective_for
    from .victims.train import train_victim

    tasks: list = []

    def progress(done: int, total: int) -> None:
        # the bar appears with the first step, so an input error is never printed under an empty bar
        tasks or tasks.append(prog.add_task(f"training {a.model} ({a.backend})", total=total))
        prog.update(tasks[0], completed=done, total=total)

    with _progress() as prog:
        cfg = replace(_train_cfg(a, a.seed), record_pair_loss=a.record_pair_loss, init=a.init, defense=a.defense)
        info = train_victim(a.data, a.poisons, cfg, a.out, overwrite=a.overwrite, progress=progress,
                            allow_shared_label=a.allow_shared_label, objective=objective_for(cfg))
    split = info.get("objective", {}).get("split")
    defended = f", {cfg.defense}: {split[-1]['n_safe']} pairs safe in the last epoch" if split else ""
    print(f"wrote checkpoint {a.out} ({'fine-tuned from ' + a.init + ' on ' if a.init else ''}"
          f"{info['data']['n_clean']} clean + {info['data']['n_poisons']} poison pairs{defended}, {info['seconds']:.0f} s); "
          f"load it with open_clip.create_model_and_transforms('local-dir:{a.out}')")
    return 0


def cmd_repair(a) -> int:
    from .defenses.repair import repair

    tasks: list = []

    def progress(done: int, total: int) -> None:
        tasks or tasks.append(prog.add_task("repairing (CleanCLIP)", total=total))
        prog.update(tasks[0], completed=done, total=total)

    cfg = RepairConfig(lr=a.lr, epochs=a.epochs, batch_size=a.batch_size, warmup=a.warmup, wd=a.wd,
                       clip_weight=a.clip_weight, inmodal_weight=a.inmodal_weight, seed=a.seed)
    with _progress() as prog:
        info = repair(a.checkpoint, a.data, cfg, a.out, overwrite=a.overwrite, progress=progress, model=a.model)
    o = info["objective"]
    print(f"wrote repaired checkpoint {a.out} ({a.checkpoint} fine-tuned on {info['data']['n_clean']} clean pairs, "
          f"{info['seconds']:.0f} s) at lr {o['lr']:g} ({o['lr_rule']})")
    return 0


def cmd_evaluate(a) -> int:
    from rich.console import Console

    from .io import read_manifest
    from .data.evalsets import load_evalset
    from .data.worldfolder import load_probe_train
    from .metrics.evaluate import evaluate_checkpoint, resolve_metrics

    if a.out:
        check_out(a.out, [a.checkpoint, a.eval_root, a.probe_train, a.cache_dir, *a.poisons], a.overwrite, file=True)
    manifests = [read_manifest(d) for d in a.poisons]
    probe_train = load_probe_train(a.probe_train, a.probe_split, a.probe_n) if a.probe_train else None
    resolve_metrics(a.metrics, probe_train)  # fail on a bad --metrics before loading anything big
    r = evaluate_checkpoint(a.checkpoint, load_evalset(a.eval_root, a.split, a.max_n), manifests, seed=a.seed,
                            cache_dir=False if a.no_cache else a.cache_dir, metrics=a.metrics,
                            probe_train=probe_train, fig3_max_pairs=a.fig3_max_pairs or None)
    r["poison_sets"] = list(a.poisons)
    if a.out:
        atomic_write_json(a.out, r)
    c = Console()
    if "zeroshot" in r:
        c.print(f"zero-shot accuracy: {r['zeroshot']['accuracy']:.1%} (n={r['zeroshot']['n']})")
    if "probe" in r:
        c.print(f"linear-probe accuracy: {r['probe']['accuracy']:.1%} (fit on {r['probe']['n_train']} images, "
                f"C={r['probe']['C']:g})")
    for t in r["targeted"]:
        c.print(f"targeted: x' #{t['eval_index']} → {t['label']!r}: {'success' if t['success'] else 'failed'}"
                + (f" (probe: {'success' if t['probe']['success'] else 'failed'})" if "probe" in t else ""))
    for b in r["backdoor"]:
        parts = [f"ASR {b[p]['asr']:.1%} ({p})" for p in ("consistent", "random") if "asr" in b[p]]
        parts += [f"probe ASR {b[p]['probe']['asr']:.1%} ({p})" for p in ("consistent", "random") if "probe" in b[p]]
        parts += [f"z = {b['consistent']['z']['z']:.2f}"] if "z" in b["consistent"] else []
        c.print(f"backdoor ({b['trigger']['name']}) → {b['label']!r}: " + ", ".join(parts))
    for x in r.get("text", []):
        c.print(f"text: {x['caption']!r} → {x['label']!r}: nearest class centroid "
                f"{'is' if x['centroid']['success'] else 'is not'} y' (rank {x['centroid']['target_rank']}), "
                f"precision@10 {x['precision_at'].get('10', float('nan')):.0%}, median rank of y' images "
                f"{x['median_rank']} of {x['n_images']}")
    if a.out:
        c.print(f"wrote {a.out}")
    return 0


def cmd_scan_model(a) -> int:
    from .defenses.model_scan import scan_model

    tasks: list = []

    def progress(done: int, total: int) -> None:
        tasks or tasks.append(prog.add_task("inverting a trigger (steps)",
                                            total=total))
        prog.update(tasks[0], completed=done)

    with _progress() as prog:
        r = scan_model(a.checkpoint, a.images, a.out, a.split, ModelScanConfig(seed=a.seed, max_images=a.max_images),
                       overwrite=a.overwrite, progress=progress)
        if tasks:  # a scan that stopped early ends its bar at the step it stopped on
            prog.update(tasks[0], total=r["steps"], completed=r["steps"])
    print(f"PL1 = {r['pl1']:.4f} of the image area "
          f"({'reached' if r['reached'] else 'never reached'} mean cosine >= {r['collapse_threshold']} on "
          f"{r['n_images']} images; {r['mean_cosine']:.3f}), z = {r['z']:.2f} on {r['n_heldout']} held-out images, "
          f"{r['steps']} steps, {r['seconds']:.0f} s; wrote {a.out}/scan.json, trigger.png, mask.png")
    return 0


def cmd_sweep(a) -> int:
    from rich.console import Console

    from .experiments.executors import LocalExecutor, RayExecutor, auto_parallel, plan, run_sweep
    from .experiments.spec import expand, load_spec, preset_names

    console = Console()
    if a.list or not a.spec:
        console.print("presets: " + ", ".join(preset_names()) + "  (sizes: quick, paper)")
        return 0 if a.list else 2
    if a.parallel != 1 and a.executor != "local":
        raise UserError(f"--parallel {a.parallel} is for the local executor; on Ray each run is a task and the spec's "
                        "resources (num_cpus per run) decide how many run at once")
    spec = load_spec(a.spec, a.size)
    out = Path(a.out or f"runs/sweeps/{spec.name}-{a.size or 'default'}")
    if a.dry_run:
        runs, todo = plan(spec, out)
        todo_ids = {r["id"] for r in todo}
        for r in runs:
            label = "clean" if r["clean"] else " ".join(f"{k}={v}" for k, v in r["point"].items())
            console.print(f"{r['id']}  seed {r['config']['seed']}  {label}  {'todo' if r['id'] in todo_ids else 'done'}")
        console.print(f"{len(runs)} runs, {len(runs) - len(todo)} finished")
        return 0
    parallel = a.parallel
    if parallel == "auto":
        parallel, why = auto_parallel([r["config"]["train"]["model"] for r in expand(spec)])
        console.print(why)
    ex = (RayExecutor(address=a.address, resources=spec.resources) if a.executor == "ray"
          else LocalExecutor(parallel=parallel))
    s = run_sweep(spec, out, ex, keep_checkpoints=a.keep_checkpoints)
    console.print(f"sweep {spec.name} ({a.size}): {s['n_runs']} runs, {s['skipped']} already finished, "
                  f"{s['ran']} ran, {s['failed']} failed, {s['seconds']:.0f} s; results in {out / 'results'}")
    if a.report:
        from .experiments.report import build_report

        r = build_report(out)
        console.print(f"report: {r['report_md']}")
    return 1 if s["failed"] else 0


def cmd_report(a) -> int:
    from .experiments.report import build_report

    r = build_report(a.results, a.out)
    print(f"wrote {r['report_md']}, {r['table_csv']}, {r['table_parquet']} and {len(r['figures'])} figures "
          f"({r['n_ok']} ok runs, {r['n_failed']} failed)")
    return 0


def cmd_scan(a) -> int:
    from rich.console import Console

    from .defenses.scan_data import check_detectors, scan_data

    if a.scan == "model":
        return cmd_scan_model(a)
    if a.scan == "filter":
        from .defenses.scan_data import filter_scan
        r = filter_scan(a.scan_dir, a.detector, a.fraction, a.out, a.overwrite)
        Console().print(f"wrote {a.out}: {r['n_kept']} of {r['n_rows']} pairs, without the {r['n_removed']} "
                        f"{a.detector} ranks most suspicious (removed per source: {r['removed_by_source']}); "
                        f"retrain with `clip-poison train --data {a.out} ...`")
        return 0
    detectors = check_detectors([d.strip() for d in a.detectors.split(",") if d.strip()])
    tasks: list = []

    def progress(done: int, _total: int) -> None:
        # the bar appears with the first embedded chunk, after the input checks
        tasks or tasks.append(prog.add_task("scan: embedding the training pairs", total=None))
        prog.update(tasks[0], completed=done)

    with _progress() as prog:
        m = scan_data(a.data, a.checkpoint, a.out, a.poisons, detectors, k=a.k, reference=a.reference,
                      reference_split=a.reference_split, reference_n=a.reference_n, clean_model=a.clean_model,
                      top=a.top, overwrite=a.overwrite, seed=a.seed, progress=progress)
    c = Console()
    for det, per in m["detection"].items():
        for name, v in per.items():
            if name != "gmm_split":
                c.print(f"{det:>18} on {name}: ROC-AUC {v['roc_auc']:.3f}, PR-AUC {v['pr_auc']:.3f}, "
                        f"FPR@95%TPR {v['fpr_at_95tpr']:.3f} ({v['n_poison']} poisons, {v['n'] - v['n_poison']} clean)")
    c.print(f"scanned {m['n_rows']} pairs with {', '.join(m['detectors'])} in {m['seconds']:.0f} s; wrote {a.out}")
    return 0


def cmd_list(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from .victims.models import describe, victim_names
    from .victims.recipes import PAPER_MODELS, RECIPES

    console = Console()
    if a.what == "models":
        t = Table(title="clip-poison victims (open_clip configs; paper sizes count the image tower)")
        for col in ("name", "tower", "input px", "params", "image tower params", "token embedding", "size ladder"):
            t.add_column(col)
        for name in victim_names() + list(PAPER_MODELS):
            d = describe(name)
            t.add_row(name, d["tower"], str(d["image_size"]), f"{d['params'] / 1e6:.2f} M",
                      f"{d['visual_params'] / 1e6:.2f} M", f"{d['token_embedding_params'] / 1e6:.2f} M", d["ladder_rung"])
        console.print(t)
    r = Table(title="training-recipe presets")
    for col in ("preset", "model", "batch", "epochs", "lr", "wd", "warmup", "crop", "backend"):
        r.add_column(col, overflow="fold")
    for name, (c, _) in RECIPES.items():
        r.add_row(name, c.model, str(c.batch_size), str(c.epochs), f"{c.lr:g}", f"{c.wd:g}", str(c.warmup),
                  f"{c.crop_scale[0]:g}-{c.crop_scale[1]:g}", c.backend)
    console.print(r)
    for name, (_, note) in RECIPES.items():
        console.print(f"  {name}: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers = {"demo": cmd_demo, "world": cmd_world, "poison": cmd_poison, "train": cmd_train,
                "evaluate": cmd_evaluate, "list": cmd_list, "scan": cmd_scan, "repair": cmd_repair,
                "sweep": cmd_sweep, "report": cmd_report}
    from .data.csvdata import ALLOW_OUTSIDE_PATHS

    token = ALLOW_OUTSIDE_PATHS.set(getattr(args, "allow_outside_paths", False))
    try:
        return handlers[args.cmd](args)
    except UserError as e:
        print(f"clip-poison {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permission denied, disk full, a vanished file: the system's words and the path
        where = f" ({e.filename})" if e.filename else ""
        print(f"clip-poison {args.cmd}: error: {e.strerror or e}{where}; check that the path exists, that you may "
              "read and write it and that its disk has free space, then run again (no partial output was kept)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130
    finally:
        ALLOW_OUTSIDE_PATHS.reset(token)


if __name__ == "__main__":
    sys.exit(main())
