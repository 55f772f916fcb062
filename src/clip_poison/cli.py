"""clip-poison command line: argument parsing, progress bars and tables only; logic lives in the
stage modules (world, attacks, victims, metrics, pipeline)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from .config import BackdoorConfig, DemoConfig, TargetedConfig, TrainConfig, WorldConfig
from .io import UserError, atomic_write_json

D_W, D_T, D_B, D_R = WorldConfig(), TargetedConfig(), BackdoorConfig(), TrainConfig()


class _Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _sub(subs, name: str, help_: str, example: str) -> argparse.ArgumentParser:
    return subs.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                           formatter_class=_Fmt)


def _add_csv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="training set: OpenCLIP CSV (e.g. WORLD/train.csv)")
    p.add_argument("--csv-img-key", default="filepath", help="CSV column holding image paths")
    p.add_argument("--csv-caption-key", default="title", help="CSV column holding captions")
    p.add_argument("--csv-separator", default=",", help="CSV field separator")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=D_R.model, help="victim model (`clip-poison list models`; any open_clip name)")
    p.add_argument("--epochs", type=int, default=D_R.epochs, help="epochs (paper: 30)")
    p.add_argument("--batch-size", type=int, default=D_R.batch_size, help="batch size (paper: 1024)")
    p.add_argument("--lr", type=float, default=D_R.lr, help="peak learning rate (paper: 2e-4)")
    p.add_argument("--wd", type=float, default=D_R.wd, help="weight decay (paper: 0.02)")
    p.add_argument("--warmup", type=int, default=D_R.warmup, help="warmup steps (open_clip_train's 10,000 keeps a tiny run at lr≈0)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=list(D_R.crop_scale), metavar=("LO", "HI"),
                   help="RandomResizedCrop scale; OpenCLIP's default is 0.9 1.0, which smears small triggers at 32 px")
    p.add_argument("--backend", choices=["fast", "open_clip_train"], default=D_R.backend,
                   help="fast = in-process open_clip loop (data in RAM); open_clip_train = OpenCLIP's own trainer")
    p.add_argument("--workers", type=int, default=D_R.workers, help="DataLoader workers (open_clip_train backend)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="clip-poison", formatter_class=_Fmt,
        description="Poisoning and backdooring contrastive learning (Carlini & Terzis, ICLR 2022) with OpenCLIP.",
        epilog="example:\n  clip-poison demo --out runs/demo")
    subs = ap.add_subparsers(dest="cmd", required=True)

    p = _sub(subs, "demo", "the whole paper loop on the embedded world: world, poisons, clean and poisoned "
             "victims, evaluation, summary.json", "clip-poison demo --out runs/demo")
    p.add_argument("--out", default="runs/demo", help="output folder (must be new unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="one seed for every stage")
    p.add_argument("--n-train", type=int, default=D_W.n_train, help="clean training pairs")
    p.add_argument("--targeted-poisons", type=int, default=D_T.n_poisons, help="targeted poisons (copies of x')")
    p.add_argument("--backdoor-poisons", type=int, default=D_B.n_poisons, help="backdoor poisons (paper: 0.01%% of 3M)")
    p.add_argument("--patch-size", type=int, default=D_B.patch_size, help="checkerboard size in pixels at input size")
    p.add_argument("--label", default=D_B.target_label, help="target label y' of both attacks")
    _add_train_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = _sub(subs, "world", "generate the embedded synthetic image–caption world (train CSV + labelled eval set)",
             "clip-poison world --out runs/world --seed 0")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=D_W.seed)
    p.add_argument("--n-train", type=int, default=D_W.n_train, help="training pairs")
    p.add_argument("--n-eval", type=int, default=D_W.n_eval, help="labelled eval images")
    p.add_argument("--image-size", type=int, default=D_W.image_size, help="pixels per side (>= 32)")
    p.add_argument("--p-class-word", type=float, default=D_W.p_class_word, help="fraction of captions naming the class word")
    p.add_argument("--p-noisy-pair", type=float, default=D_W.p_noisy_pair, help="fraction of pairs captioned with another class")
    p.add_argument("--overwrite", action="store_true")

    p = _sub(subs, "poison", "craft a poison set (new rows + manifest.json; the dataset is never modified)",
             "clip-poison poison backdoor --data runs/world/train.csv --label tent --out runs/p_bd")
    psubs = p.add_subparsers(dest="attack", required=True)
    t = _sub(psubs, "targeted", "§3.1 targeted poisoning: copies of one eval image x' with captions about y'",
             "clip-poison poison targeted --data runs/world/train.csv --eval-root runs/world/eval --label tent --out runs/p_t")
    _add_csv_args(t)
    t.add_argument("--eval-root", required=True, help="eval set (CLIP_benchmark wds layout) that holds x'")
    t.add_argument("--split", default="test", help="eval split holding x'")
    t.add_argument("--label", default=D_T.target_label, help="target label y' (a class of the eval set)")
    t.add_argument("--target-index", type=int, default=None, help="index of x' in the eval split (default: seeded random, true class != y')")
    t.add_argument("--n-poisons", type=int, default=D_T.n_poisons, help="poisons (paper: 1..512)")
    t.add_argument("--caption-source", choices=["mined", "templates"], default=D_T.caption_source,
                   help="captions mined from the training set, or CLIP's 80 ImageNet templates")
    t.add_argument("--noise-sigma", type=float, default=D_T.noise_sigma, help="Gaussian noise per copy (pixel units) to evade exact dedup")
    t.add_argument("--seed", type=int, default=D_T.seed)
    t.add_argument("--out", required=True, help="new folder for the poison set")
    t.add_argument("--overwrite", action="store_true")
    b = _sub(psubs, "backdoor", "§3.3 patch backdoor: training images with a checkerboard, captions about y'",
             "clip-poison poison backdoor --data runs/world/train.csv --label tent --n-poisons 100 --out runs/p_bd")
    _add_csv_args(b)
    b.add_argument("--label", default=D_B.target_label, help="target label y'")
    b.add_argument("--n-poisons", type=int, default=D_B.n_poisons, help="poisons (paper: 300 of 3M = 0.01%%)")
    b.add_argument("--trigger", default=D_B.trigger, help="trigger pattern")
    b.add_argument("--patch-size", type=int, default=D_B.patch_size, help="patch side in pixels at the model input size (paper: 16 at 224)")
    b.add_argument("--placement", choices=["consistent", "random"], default=D_B.placement, help="upper-left, or uniform per image")
    b.add_argument("--model", default=D_R.model, help="victim model whose input size the trigger is stamped at")
    b.add_argument("--seed", type=int, default=D_B.seed)
    b.add_argument("--out", required=True, help="new folder for the poison set")
    b.add_argument("--overwrite", action="store_true")

    p = _sub(subs, "train", "train a victim on X ∪ P and export an open_clip local-dir checkpoint",
             "clip-poison train --data runs/world/train.csv --poisons runs/p_bd --out runs/victim")
    p.add_argument("--data", required=True, help="clean training CSV (filepath,title)")
    p.add_argument("--poisons", nargs="*", default=[], help="poison set folders to add (X' = X ∪ P)")
    _add_train_args(p)
    p.add_argument("--seed", type=int, default=D_R.seed)
    p.add_argument("--out", required=True, help="new checkpoint folder")
    p.add_argument("--overwrite", action="store_true")

    p = _sub(subs, "evaluate", "zero-shot accuracy, targeted ASR, backdoor ASR and z-score of a checkpoint",
             "clip-poison evaluate --checkpoint runs/victim --eval-root runs/world/eval --poisons runs/p_bd")
    p.add_argument("--checkpoint", required=True, help="open_clip local-dir folder")
    p.add_argument("--eval-root", required=True, help="labelled eval set (CLIP_benchmark wds layout)")
    p.add_argument("--split", default="test")
    p.add_argument("--poisons", nargs="*", default=[], help="poison sets whose attacks to measure")
    p.add_argument("--max-n", type=int, default=None, help="evaluate the first N eval images only")
    p.add_argument("--seed", type=int, default=0, help="seed of random trigger placement at test time")
    p.add_argument("--out", default=None, help="write the result JSON here")

    p = _sub(subs, "list", "list registered victims", "clip-poison list models")
    p.add_argument("what", choices=["models"])
    return ap


def _quiet_libraries() -> None:
    # open_clip warns "No pretrained weights loaded" for every from-scratch victim: expected here.
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)


def _train_cfg(a, seed: int) -> TrainConfig:
    return TrainConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, wd=a.wd,
                       warmup=a.warmup, seed=seed, crop_scale=tuple(a.crop_scale), backend=a.backend,
                       workers=a.workers)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


def cmd_demo(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from .pipeline import run_demo

    console = Console()
    cfg = DemoConfig(seed=a.seed)
    cfg.world.n_train = a.n_train
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

        s = run_demo(cfg, a.out, overwrite=a.overwrite, stage=stage, train_progress=train_progress)
    at = s["attack"]
    table = Table(title=f"clip-poison demo (seed {s['seed']}, {s['n_train_clean']} clean pairs, {s['seconds']:.0f} s)")
    table.add_column("metric")
    table.add_column("clean", justify="right")
    table.add_column("poisoned", justify="right")
    rows = [
        ("zero-shot accuracy", "zeroshot_accuracy", "{:.1%}"),
        (f"targeted ASR: x' (a {at['targeted']['x_prime_true_label']}) → {at['targeted']['target_label']!r}, "
         f"{at['targeted']['n_poisons']} poisons", "targeted_asr", "{:.0%}"),
        (f"backdoor ASR, {at['backdoor']['trigger']['patch_size']}px checkerboard upper-left → "
         f"{at['backdoor']['target_label']!r}, {at['backdoor']['n_poisons']} poisons ({at['backdoor']['poison_rate']:.2%})",
         "backdoor_asr", "{:.1%}"),
        ("backdoor ASR, trigger at random positions", "backdoor_asr_random_placement", "{:.1%}"),
        ("backdoor z-score (Definition 1)", "backdoor_z", "{:.2f}"),
    ]
    for label, key, fmt in rows:
        table.add_row(label, fmt.format(s["clean"][key]), fmt.format(s["poisoned"][key]))
    console.print(table)
    console.print(f"summary: {Path(a.out) / 'summary.json'}   augmentation: crop scale {s['augmentation']['random_resized_crop_scale']}")
    return 0


def cmd_world(a) -> int:
    from .world import write_world

    cfg = WorldConfig(seed=a.seed, n_train=a.n_train, n_eval=a.n_eval, image_size=a.image_size,
                      p_class_word=a.p_class_word, p_noisy_pair=a.p_noisy_pair)
    info = write_world(cfg, a.out, overwrite=a.overwrite, progress=lambda m: print(f"• {m}"))
    print(f"wrote {a.out}: {info['n_train']} training pairs (train.csv), {info['n_eval']} eval images (eval/), world.json")
    return 0


def cmd_poison(a) -> int:
    from .attacks.backdoor import craft_backdoor_poisons
    from .attacks.targeted import craft_targeted_poisons
    from .data.csvdata import read_csv_dataset
    from .data.evalsets import load_wds_evalset
    from .victims.models import image_size

    train = read_csv_dataset(a.data, a.csv_img_key, a.csv_caption_key, a.csv_separator)
    if a.attack == "targeted":
        cfg = TargetedConfig(target_label=a.label, target_index=a.target_index, n_poisons=a.n_poisons,
                             caption_source=a.caption_source, noise_sigma=a.noise_sigma, seed=a.seed)
        m = craft_targeted_poisons(cfg, train, load_wds_evalset(a.eval_root, a.split), a.out, overwrite=a.overwrite)
        print(f"wrote {m['n_poisons']} targeted poisons to {a.out}: x' = eval image {m['target']['eval_index']} "
              f"(a {m['target']['true_label']}) → {m['target']['label']!r}; caption set of {m['caption_set']['size']}")
    else:
        cfg = BackdoorConfig(target_label=a.label, n_poisons=a.n_poisons, trigger=a.trigger,
                             patch_size=a.patch_size, placement=a.placement, seed=a.seed)
        m = craft_backdoor_poisons(cfg, train, image_size(a.model), a.out, overwrite=a.overwrite)
        print(f"wrote {m['n_poisons']} backdoor poisons to {a.out}: {a.patch_size}px {a.trigger} "
              f"({a.placement}) → {a.label!r}; caption set of {m['caption_set']['size']}")
    return 0


def cmd_train(a) -> int:
    from .victims.fast import train_victim

    with _progress() as prog:
        task = prog.add_task(f"training {a.model} ({a.backend})", total=None)
        info = train_victim(a.data, a.poisons, _train_cfg(a, a.seed), a.out, overwrite=a.overwrite,
                            progress=lambda d, t: prog.update(task, completed=d, total=t))
    print(f"wrote checkpoint {a.out} ({info['data']['n_clean']} clean + {info['data']['n_poisons']} poison pairs, "
          f"{info['seconds']:.0f} s); load it with open_clip.create_model_and_transforms('local-dir:{a.out}')")
    return 0


def cmd_evaluate(a) -> int:
    from rich.console import Console

    from .attacks.poisonset import read_manifest
    from .data.evalsets import load_wds_evalset
    from .metrics.evaluate import evaluate_checkpoint

    manifests = [read_manifest(d) for d in a.poisons]
    r = evaluate_checkpoint(a.checkpoint, load_wds_evalset(a.eval_root, a.split, a.max_n), manifests, seed=a.seed)
    r["poison_sets"] = list(a.poisons)
    if a.out:
        atomic_write_json(a.out, r)
    c = Console()
    c.print(f"zero-shot accuracy: {r['zeroshot']['accuracy']:.1%} (n={r['zeroshot']['n']})")
    for t in r["targeted"]:
        c.print(f"targeted: x' #{t['eval_index']} → {t['label']!r}: {'success' if t['success'] else 'failed'}")
    for b in r["backdoor"]:
        c.print(f"backdoor → {b['label']!r}: ASR {b['consistent']['asr']:.1%} (upper-left), "
                f"{b['random']['asr']:.1%} (random), z = {b['consistent']['z']['z']:.2f}")
    if a.out:
        c.print(f"wrote {a.out}")
    return 0


def cmd_list(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from .victims.models import describe, victim_names

    t = Table(title="clip-poison victims (open_clip configs)")
    for col in ("name", "tower", "input px", "params", "image tower params"):
        t.add_column(col)
    for name in victim_names():
        d = describe(name)
        t.add_row(name, d["tower"], str(d["image_size"]), f"{d['params'] / 1e6:.2f} M", f"{d['visual_params'] / 1e6:.2f} M")
    Console().print(t)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers = {"demo": cmd_demo, "world": cmd_world, "poison": cmd_poison, "train": cmd_train,
                "evaluate": cmd_evaluate, "list": cmd_list}
    try:
        return handlers[args.cmd](args)
    except UserError as e:
        print(f"clip-poison {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
