"""`scan model` against training the victim it scans, in the same run: the scan should cost less.

Trains one clean victim on the embedded world (the demo's recipe: rn-tiny-32, 10,000 pairs, 4
epochs by default) and times that, then scans the checkpoint with the default ModelScanConfig
(512 images to optimise on, 512 held out, threshold 0.99) on the world's eval images, --repeats
times with seeds 0, 1, ...; prints the scan's median time, its ratio to the training time and
PASS/FAIL against the 60 s target at 32 px. Run with the thread count a sweep uses:

    OMP_NUM_THREADS=1 python benchmarks/bench_model_scan.py [--n-train 10000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clip_poison.config import ModelScanConfig, TrainConfig, WorldConfig
from clip_poison.data.world import write_world
from clip_poison.defenses.model_scan import scan_model
from clip_poison.victims.train import train_victim

TARGET_S = 60.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=WorldConfig().n_train)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_world(WorldConfig(n_train=a.n_train), root / "world")
        t0 = time.perf_counter()
        train_victim(root / "world" / "train.csv", [], TrainConfig(), root / "victim")
        train_s = time.perf_counter() - t0
        scans = []
        for seed in range(a.repeats):
            t0 = time.perf_counter()
            r = scan_model(root / "victim", root / "world", root / f"scan{seed}", cfg=ModelScanConfig(seed=seed))
            scans.append((time.perf_counter() - t0, r))
    scan_s = statistics.median(s for s, _ in scans)
    print(f"torch threads {torch.get_num_threads()}; training the victim: {train_s:.1f} s")
    for seed, (s, r) in enumerate(scans):
        print(f"scan seed {seed}: {s:.1f} s, {r['steps']} steps, PL1 {r['pl1']:.4f}, reached {r['reached']}, z {r['z']:.2f}")
    print(f"scan median {scan_s:.1f} s = {scan_s / train_s:.2f} x training; target <= {TARGET_S:.0f} s: "
          f"{'PASS' if scan_s <= TARGET_S else 'FAIL'}")
    return 0 if scan_s <= TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
