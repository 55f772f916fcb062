"""What `clip-poison train --record-pair-loss` costs: the same victim trained with and without it.

One world and one backdoor poison set (the demo's sizes by default: 10,000 clean pairs, 300 poisons,
the laptop recipe), then `clip-poison train` in a fresh process per run (Python start, imports,
data, training, export: what a user waits for), the two arms interleaved within every repeat and
their order alternated between repeats, so drift in the machine's speed hits both alike. Reported:
the wall-time ratio recording / plain (median of the per-repeat ratios, and their range), and the
same ratio of the training loop alone (``train.json`` timings), where the per-pair losses are
computed. Every repeat also checks that both arms wrote the same weights, bit for bit. Writes
docs/results/defenses/bench_pair_loss.{json,md}.

    flock /tmp/cpu.lock python benchmarks/bench_pair_loss.py [--n-train 10000 --n-poisons 300 --repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clip_poison.config import BackdoorConfig, TrainConfig, WorldConfig
from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions
from clip_poison.victims.export import WEIGHTS

ARMS = ("plain", "--record-pair-loss")


def train(data: Path, poisons: Path, cfg: TrainConfig, out: Path, record: bool) -> dict:
    argv = [sys.executable, "-m", "clip_poison.cli", "train", "--data", str(data), "--poisons", str(poisons),
            "--out", str(out), "--model", cfg.model, "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size),
            "--seed", str(cfg.seed)] + (["--record-pair-loss"] if record else [])
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    info = json.loads((out / "train.json").read_text())
    return {"wall_s": wall, "train_s": info["timings"]["train"]}


def seconds(runs: list[dict], key: str) -> str:
    return ", ".join(f"{r[key]:.1f}" for r in runs)


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f}× (range {min(xs):.3f}–{max(xs):.3f}×)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    ap.add_argument("--n-train", type=int, default=WorldConfig.n_train)
    ap.add_argument("--n-poisons", type=int, default=BackdoorConfig.n_poisons)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs of both arms (all are reported)")
    ap.add_argument("--out", default="docs/results/defenses")
    a = ap.parse_args()
    cfg = TrainConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size)

    runs: dict[str, list[dict]] = {k: [] for k in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cli = [sys.executable, "-m", "clip_poison.cli"]
        subprocess.run(cli + ["world", "--n-train", str(a.n_train), "--out", str(tmp / "world")],
                       check=True, capture_output=True)
        subprocess.run(cli + ["poison", "backdoor", "--data", str(tmp / "world" / "train.csv"), "--n-poisons",
                              str(a.n_poisons), "--out", str(tmp / "p")], check=True, capture_output=True)
        for i in range(a.repeats):
            order = ARMS if i % 2 == 0 else ARMS[::-1]
            for arm in order:
                out = tmp / f"{arm.strip('-')}-{i}"
                runs[arm].append(train(tmp / "world" / "train.csv", tmp / "p", cfg, out, arm != "plain"))
                print(f"repeat {i}: {arm}: {runs[arm][-1]['wall_s']:.1f} s (training loop {runs[arm][-1]['train_s']:.1f} s)",
                      flush=True)
            same = [(tmp / f"{arm.strip('-')}-{i}" / WEIGHTS).read_bytes() for arm in ARMS]
            if same[0] != same[1]:
                raise SystemExit(f"repeat {i}: recording changed the trained weights; it must not")
            for arm in ARMS:  # compared: drop them, so the disk holds one pair of checkpoints at a time
                (tmp / f"{arm.strip('-')}-{i}" / WEIGHTS).unlink()

    wall = [r["wall_s"] / p["wall_s"] for r, p in zip(runs[ARMS[1]], runs[ARMS[0]])]
    loop = [r["train_s"] / p["train_s"] for r, p in zip(runs[ARMS[1]], runs[ARMS[0]])]
    n = a.n_train + a.n_poisons
    text = "\n".join([
        f"# Cost of --record-pair-loss ({a.model}, {a.n_train} clean + {a.n_poisons} backdoor pairs, {a.epochs} epochs, "
        f"batch {a.batch_size}, fp32, {torch.get_num_threads()} threads)", "",
        f"`clip-poison train` in fresh processes, {a.repeats} interleaved repeats (order alternated). "
        f"Recording / plain wall time: **{spread(wall)}**; training loop alone (train.json): {spread(loop)}. "
        "Both arms wrote bitwise identical weights in every repeat.", "",
        "| arm | wall s (all runs) | training loop s (all runs) |", "| --- | --- | --- |",
        *[f"| {arm} | {seconds(runs[arm], 'wall_s')} | {seconds(runs[arm], 'train_s')} |" for arm in ARMS], "",
        f"pair_loss.npy: {n} × {a.epochs} float32 = {n * a.epochs * 4 / 1e6:.2f} MB."])
    print("\n" + text)
    out = Path(a.out)
    atomic_write_bytes(out / "bench_pair_loss.md", (text + "\n").encode())
    atomic_write_json(out / "bench_pair_loss.json", {
        "model": a.model, "n_train": a.n_train, "n_poisons": a.n_poisons, "epochs": a.epochs,
        "batch_size": a.batch_size, "repeats": a.repeats, "threads": torch.get_num_threads(),
        "ratio_wall_median": statistics.median(wall), "ratio_wall_per_repeat": wall,
        "ratio_train_loop_median": statistics.median(loop), "ratio_train_loop_per_repeat": loop,
        "runs": runs, "weights_identical": True, "versions": package_versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
