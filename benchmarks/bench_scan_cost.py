"""What the scans cost beside training the victim they scan, end to end, in the same run.

On real photos (10,000 CIFAR-10 train photos captioned by `clip-poison world cifar10`, 300 backdoor
poisons), each repeat runs three fresh `clip-poison` processes in turn and times each whole:

    train        the victim (rn-tiny-32, the laptop recipe, --record-pair-loss as the detect sweeps do)
    scan data    every detector (near-duplicate, k-dist, slof, dao, clip-score, loss-dynamics), the
                 density ones also against 2,000 clean test photos (+ref)
    scan model   the blind trigger inversion, 512 photos to optimise on and 512 held out

Each repeat trains a new victim, so no embedding cache is warm. Prints the median and range of each,
and the scans' time as a fraction of training; writes docs/results/defenses/bench-scan-cost.{json,md}.
Run it alone (2 cores): ``python benchmarks/bench_scan_cost.py [--repeats 3]`` from the repository root.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-wds"
OUT = ROOT / "docs" / "results" / "defenses"
CLI = [sys.executable, "-m", "clip_poison.cli"]
DETECTORS = "near-duplicate,k-dist,slof,dao,clip-score,loss-dynamics"


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(CLI + argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        subprocess.run(CLI + ["world", "cifar10", "--root", str(CIFAR), "--n-train", str(a.n_train), "--out",
                              str(t / "w")], check=True, capture_output=True)
        subprocess.run(CLI + ["poison", "backdoor", "--data", str(t / "w" / "train.csv"), "--label", "cat",
                              "--n-poisons", "300", "--out", str(t / "p")], check=True, capture_output=True)
        data = ["--data", str(t / "w" / "train.csv")]
        for r in range(a.repeats):
            v = t / f"v{r}"
            row = {"train": timed(["train", *data, "--poisons", str(t / "p"), "--record-pair-loss", "--seed", str(r),
                                   "--out", str(v)])}
            row["scan data"] = timed(["scan", "data", *data, "--poisons", str(t / "p"), "--checkpoint", str(v),
                                      "--detectors", DETECTORS, "--reference", str(CIFAR), "--reference-n", "2000",
                                      "--out", str(t / f"s{r}")])
            row["scan model"] = timed(["scan", "model", "--checkpoint", str(v), "--images", str(CIFAR),
                                       "--seed", str(r), "--out", str(t / f"m{r}")])
            runs.append(row)
            print(f"repeat {r}: " + ", ".join(f"{k} {s:.1f} s" for k, s in row.items()), flush=True)
    med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
    rng = {k: [min(x[k] for x in runs), max(x[k] for x in runs)] for k in runs[0]}
    frac = {k: [x[k] / x["train"] for x in runs] for k in ("scan data", "scan model")}
    lines = ["# Scan cost beside training the victim (end to end, fresh processes)", "",
             f"{a.n_train:,} CIFAR-10 photos + 300 backdoor poisons, rn-tiny-32 laptop recipe, {a.repeats} repeats "
             "(each a new victim), 2 cores, nothing else running.", "",
             "| step | median s | range s | ÷ training (median, range) |", "|---|---|---|---|"]
    for k in runs[0]:
        f = "1" if k == "train" else (f"{statistics.median(frac[k]):.2f} ({min(frac[k]):.2f}-{max(frac[k]):.2f})")
        lines.append(f"| {k} | {med[k]:.1f} | {rng[k][0]:.1f}-{rng[k][1]:.1f} | {f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / "bench-scan-cost.json", {"runs": runs, "median_s": med, "range_s": rng,
                                                       "fraction_of_training": frac, "n_train": a.n_train,
                                                       "repeats": a.repeats, "versions": package_versions()})
    atomic_write_bytes(a.out / "bench-scan-cost.md", text.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
