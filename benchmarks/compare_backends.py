"""Do the two backends train the same victims? Clean zero-shot accuracy, backdoor ASR and z per seed.

The demo's world (10,000 pairs) and one §3.3 backdoor poison set (300 poisons = 3 %, the demo's) are
made once; then, for each training seed, a poisoned victim is trained by the fast backend and by
open_clip_train with the same recipe (rn-tiny-32, 4 epochs, batch 128) and evaluated by the same
``evaluate_checkpoint``. A seed fixes the init and the data order in both backends, so the
comparison is paired: per seed, fast − open_clip_train, with a 95 % interval of the mean difference,
beside the spread across seeds (the noise any claim about one victim carries).

    python benchmarks/compare_backends.py [--seeds 0 1 2 3 4]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.config import BackdoorConfig, TrainConfig, WorldConfig
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions
from clip_poison.metrics.evaluate import evaluate_checkpoint
from clip_poison.metrics.stats import summarize
from clip_poison.victims.train import train_victim
from clip_poison.data.world import write_world

BACKENDS = ("fast", "open_clip_train")
METRICS = ("zeroshot_accuracy", "backdoor_asr", "backdoor_z")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-poisons", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--model", default="rn-tiny-32")
    ap.add_argument("--out", default="docs/results/backends")
    a = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_world(WorldConfig(seed=0, n_train=a.n_train, n_eval=1000), tmp / "world")
        train = read_csv_dataset(tmp / "world" / "train.csv")
        evalset = load_wds_evalset(tmp / "world" / "eval", "test")
        manifest = craft_backdoor_poisons(BackdoorConfig(n_poisons=a.n_poisons, seed=0), train, 32, tmp / "bd")
        for seed in a.seeds:
            for backend in BACKENDS:
                cfg = TrainConfig(model=a.model, epochs=a.epochs, seed=seed, backend=backend)
                t0 = time.perf_counter()
                train_victim(tmp / "world" / "train.csv", [tmp / "bd"], cfg, tmp / f"{backend}-{seed}")
                wall = time.perf_counter() - t0
                r = evaluate_checkpoint(tmp / f"{backend}-{seed}", evalset, [manifest], seed=0)
                bd = r["backdoor"][0]["consistent"]
                rows.append({"seed": seed, "backend": backend, "train_wall_s": round(wall, 1),
                             "zeroshot_accuracy": r["zeroshot"]["accuracy"], "backdoor_asr": bd["asr"],
                             "backdoor_z": bd["z"]["z"]})
                print(f"seed {seed} {backend:16s} acc {rows[-1]['zeroshot_accuracy']:.3f}  "
                      f"ASR {rows[-1]['backdoor_asr']:.3f}  z {rows[-1]['backdoor_z']:.2f}  ({wall:.0f} s)", flush=True)

    summary = {}
    for k in METRICS:
        v = {b: np.array([r[k] for r in rows if r["backend"] == b]) for b in BACKENDS}
        d = summarize(v["fast"] - v["open_clip_train"])  # same seed = same init and data order: paired
        summary[k] = {**{b: summarize(x) for b, x in v.items()}, "paired_diff": d,
                      "max_abs_diff": float(np.abs(v["fast"] - v["open_clip_train"]).max())}
    lines = [f"# Backends agree? {a.model}, {a.n_train} pairs + {a.n_poisons} backdoor poisons "
             f"({100 * a.n_poisons / a.n_train:.0f} %), {a.epochs} epochs, batch 128, {len(a.seeds)} seeds", "",
             "| seed | backend | clean zero-shot acc | backdoor ASR | backdoor z | train wall s |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['seed']} | {r['backend']} | {r['zeroshot_accuracy']:.3f} | {r['backdoor_asr']:.3f} | "
              f"{r['backdoor_z']:.2f} | {r['train_wall_s']:.0f} |" for r in rows]
    lines += ["", "Per seed, fast − open_clip_train (paired: same init and data order), mean with 95 % t interval; "
              "beside it each backend's spread across seeds (std):", "",
              "| metric | fast mean ± std | open_clip_train mean ± std | paired diff mean [95 % CI] | max abs diff |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | {s['fast']['mean']:.3f} ± {s['fast']['std']:.3f} | {s['open_clip_train']['mean']:.3f} ± "
              f"{s['open_clip_train']['std']:.3f} | {s['paired_diff']['mean']:+.4f} [{s['paired_diff']['ci_low']:+.4f}, "
              f"{s['paired_diff']['ci_high']:+.4f}] | {s['max_abs_diff']:.4f} |" for k, s in summary.items()]
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(a.out)
    atomic_write_bytes(out / "compare_backends.md", (text + "\n").encode())
    atomic_write_json(out / "compare_backends.json", {"config": vars(a), "rows": rows, "summary": summary,
                                                      "versions": package_versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
