"""Real photos (CIFAR-10 with web-like captions): training throughput and a first attack measurement.

throughput (default): one real-photo world (default 5,000 photos of the train split), one epoch of
  the same recipe (rn-tiny-32, batch 128) with OpenCLIP's own trainer (baseline) and the fast
  in-process backend, side by side in one run; prints samples/s, victims/hour and the ratio.

attack (--attack): a clean control and backdoored victims (§3.3, checkerboard upper-left, target
  'cat', captions mined from the training set) trained on the same world with the same seed;
  zero-shot accuracy on the first --eval-n test photos, backdoor ASR (consistent and random test
  placement), z-score (Definition 1), and a linear probe (§4.2) fit on train-split embeddings.
  Writes JSON + markdown under --out.

    python benchmarks/bench_realworld.py --root ../shared/data/cifar10-wds
    python benchmarks/bench_realworld.py --attack --root ../shared/data/cifar10-wds --n-train 10000 \
        --epochs 5 --poisons 100 300 --seeds 0
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.config import BackdoorConfig, TrainConfig
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.config import RealWorldConfig
from clip_poison.data.worldfolder import load_world_evalset, read_train_labels
from clip_poison.data.realworld import write_real_world
from clip_poison.io import atomic_write_bytes, atomic_write_json, load_image, package_versions, rng_for
from clip_poison.metrics.embed import embed_images
from clip_poison.metrics.evaluate import evaluate_checkpoint
from clip_poison.metrics.probe import evaluate_linear_probe, fit_linear_probe
from clip_poison.victims.export import load_victim
from clip_poison.victims.train import train_victim
from clip_poison.victims.models import image_size


def throughput(a, tmp: Path) -> dict:
    t0 = time.perf_counter()
    world = write_real_world(RealWorldConfig(root=a.root, seed=0, n_train=a.n_train), tmp / "world")
    world_s = time.perf_counter() - t0
    rows = {}
    for backend in ("open_clip_train", "fast"):
        cfg = TrainConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size, backend=backend, seed=0)
        t = time.perf_counter()
        info = train_victim(tmp / "world" / "train.csv", [], cfg, tmp / f"victim-{backend}")
        wall = time.perf_counter() - t
        samples = (world["n_train"] // cfg.batch_size) * cfg.batch_size * cfg.epochs
        rows[backend] = {"wall_s": round(wall, 1), "samples": samples,
                         "samples_per_s_wall": round(samples / wall, 1),
                         "samples_per_s_steady": info.get("samples_per_second"),
                         "victims_per_hour": round(3600 / wall, 1)}
        print(f"{backend:16s} {wall:6.1f} s wall  {samples / wall:6.1f} samples/s (wall, incl. start-up)  "
              f"{3600 / wall:6.1f} victims/hour at this recipe", flush=True)
    ratio = rows["open_clip_train"]["wall_s"] / rows["fast"]["wall_s"]
    print(f"fast / open_clip_train speed-up (wall): {ratio:.2f}x   "
          f"(world build: {world_s:.1f} s for {world['n_train']} photos)")
    return {"recipe": {"model": a.model, "epochs": a.epochs, "batch_size": a.batch_size, "n_train": world["n_train"]},
            "world_build_s": round(world_s, 1), "backends": rows, "speedup_fast_vs_open_clip_train": round(ratio, 2)}


def _probe(ckpt: Path, world: Path, evalset, n_probe: int, seed: int) -> dict:
    """§4.2 linear probe: fit on embeddings of n_probe train-split photos, score on the test photos."""
    model, preprocess, _ = load_victim(ckpt)
    meta = read_train_labels(world)
    idx = np.sort(rng_for(seed, "bench/probe-subset").choice(len(meta), size=min(n_probe, len(meta)), replace=False))
    imgs = [load_image(world / meta["filepath"][i]) for i in idx]
    probe = fit_linear_probe(embed_images(model, preprocess, imgs), meta["label"].to_numpy()[idx], seed=seed)
    return evaluate_linear_probe(probe, embed_images(model, preprocess, evalset.images), evalset.labels)


def attack(a, tmp: Path) -> dict:
    runs = []
    for seed in a.seeds:
        wdir = tmp / f"world-{seed}"
        t = time.perf_counter()
        world = write_real_world(RealWorldConfig(root=a.root, seed=seed, n_train=a.n_train), wdir)
        print(f"seed {seed}: world of {world['n_train']} photos in {time.perf_counter() - t:.1f} s", flush=True)
        train = read_csv_dataset(wdir / "train.csv")
        evalset = load_world_evalset(wdir, a.eval_n)
        cfg = TrainConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size, seed=seed)
        manifests = {}
        for n in a.poisons:
            bcfg = BackdoorConfig(target_label=a.label, n_poisons=n, patch_size=a.patch_size, seed=seed)
            manifests[n] = craft_backdoor_poisons(bcfg, train, image_size(a.model), tmp / f"p-{seed}-{n}")
        for n in [0, *a.poisons]:
            t = time.perf_counter()
            dirs = [] if n == 0 else [tmp / f"p-{seed}-{n}"]
            info = train_victim(wdir / "train.csv", dirs, cfg, tmp / f"v-{seed}-{n}")
            # The clean control is measured against every poison set's trigger (same inputs).
            ms = list(manifests.values())[:1] if n == 0 else [manifests[n]]
            r = evaluate_checkpoint(tmp / f"v-{seed}-{n}", evalset, ms, seed=seed)
            bd = r["backdoor"][0]
            row = {"seed": seed, "n_poisons": n, "poison_rate": n / len(train),
                   "zeroshot_accuracy": r["zeroshot"]["accuracy"], "n_eval": r["zeroshot"]["n"],
                   "asr": bd["consistent"]["asr"], "asr_random_placement": bd["random"]["asr"],
                   "z": bd["consistent"]["z"]["z"], "z_random_placement": bd["random"]["z"]["z"],
                   "train_s": info["seconds"], "samples_per_s": info["samples_per_second"]}
            if a.probe_n:
                row["linear_probe"] = _probe(tmp / f"v-{seed}-{n}", wdir, evalset, a.probe_n, seed)
            row["wall_s"] = round(time.perf_counter() - t, 1)
            runs.append(row)
            print(f"seed {seed} poisons {n:4d} ({row['poison_rate']:.2%}): zero-shot {row['zeroshot_accuracy']:.3f}  "
                  f"ASR {row['asr']:.3f} (random pos {row['asr_random_placement']:.3f})  z {row['z']:.2f}  "
                  + (f"probe {row['linear_probe']['accuracy']:.3f}  " if a.probe_n else "")
                  + f"{row['wall_s']:.0f} s", flush=True)
    return {"runs": runs, "recipe": {"model": a.model, "epochs": a.epochs, "batch_size": a.batch_size,
                                     "n_train": a.n_train, "eval_n": a.eval_n, "target_label": a.label,
                                     "patch_size": a.patch_size, "trigger": "checkerboard", "placement": "consistent",
                                     "probe_train_n": a.probe_n, "defaults": TrainConfig().__dict__}}


def _md(res: dict) -> str:
    rec = res["recipe"]
    lines = [f"# Backdoor on real photos (CIFAR-10, web-like captions)\n",
             f"rn-tiny-32 (`{rec['model']}`), {rec['n_train']} captioned train photos, {rec['epochs']} epochs, "
             f"batch {rec['batch_size']}, fast backend. Trigger: {rec['patch_size']} px checkerboard upper-left, "
             f"target {rec['target_label']!r}, captions mined from the training set. Evaluated on the first "
             f"{rec['eval_n']} CIFAR-10 test photos (ASR over the non-target ones). Linear probe: fit on "
             f"{rec['probe_train_n']} train-split embeddings, scored on the same test photos. "
             "Seeds, poison counts and every number as measured by `benchmarks/bench_realworld.py --attack`.\n",
             "| seed | poisons | rate | zero-shot acc | probe acc | ASR upper-left | ASR random pos | z | z random | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        probe = f"{r['linear_probe']['accuracy']:.3f}" if "linear_probe" in r else "–"
        lines.append(f"| {r['seed']} | {r['n_poisons']} | {r['poison_rate']:.2%} | {r['zeroshot_accuracy']:.3f} | {probe} | "
                     f"{r['asr']:.3f} | {r['asr_random_placement']:.3f} | {r['z']:.2f} | {r['z_random_placement']:.2f} | "
                     f"{r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data/cifar10-wds")
    ap.add_argument("--attack", action="store_true", help="run the attack measurement instead of throughput")
    ap.add_argument("--model", default="rn-tiny-32")
    ap.add_argument("--n-train", type=int, default=None, help="photos (throughput default 5000, attack 10000)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (throughput default 1, attack 5)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--poisons", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--label", default="cat")
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--eval-n", type=int, default=2000, help="first N test photos")
    ap.add_argument("--probe-n", type=int, default=5000, help="train photos the linear probe is fit on (0 = no probe)")
    ap.add_argument("--out", default="docs/results/cifar10")
    a = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    a.n_train = a.n_train or (10_000 if a.attack else 5_000)
    a.epochs = a.epochs or (5 if a.attack else 1)
    out = Path(a.out)
    with tempfile.TemporaryDirectory() as tmp:
        res = attack(a, Path(tmp)) if a.attack else throughput(a, Path(tmp))
    res["versions"] = package_versions()
    name = "attack" if a.attack else "throughput"
    atomic_write_json(out / f"{name}.json", res)
    if a.attack:
        atomic_write_bytes(out / "attack.md", _md(res).encode())
    print(f"wrote {out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
