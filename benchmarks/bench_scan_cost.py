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

import tempfile
from pathlib import Path

from cli_timing import CIFAR, ROOT, cifar_backdoor_world, cost_args, timed, write_cost_table

OUT = ROOT / "docs" / "results" / "defenses"
DETECTORS = "near-duplicate,k-dist,slof,dao,clip-score,loss-dynamics"


def main() -> int:
    a = cost_args(__doc__, OUT)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cifar_backdoor_world(t, a.n_train, 300)
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
    print(write_cost_table(a.out, "bench-scan-cost", "Scan cost beside training the victim (end to end, fresh processes)",
                           f"{a.n_train:,} CIFAR-10 photos + 300 backdoor poisons, rn-tiny-32 laptop recipe, {a.repeats} "
                           "repeats (each a new victim), 2 cores, nothing else running.", runs, n_train=a.n_train))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
