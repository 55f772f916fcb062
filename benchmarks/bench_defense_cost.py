"""What each mitigation costs beside training the victim it defends, end to end, in the same run.

On real photos (10,000 CIFAR-10 train photos captioned by `clip-poison world cifar10`, 600 backdoor
poisons: the mitigate presets' setting), each repeat runs fresh `clip-poison` processes in turn and
times each whole:

    train            the undefended victim (rn-tiny-32, the laptop recipe: 4 epochs): the baseline
    repair           CleanCLIP on 1,000 clean pairs of X, its default recipe (10 epochs, batch 64,
                     lr = 1/50 of the victim's)
    robust training  `train --defense safeclip`, the robust presets' 10 epochs (SafeCLIP's 6 warm-up
                     epochs + the victim's 4), on the same X ∪ P
    filter + retrain `scan data --detectors clip-score` + `scan filter --fraction 0.1` + `train` on
                     the kept pairs (the scan and the retrain are also shown alone)

Each repeat trains a new victim (seed = repeat), so no embedding cache is warm. Prints the median and
range of each step and its cost as a multiple of training the victim; writes
docs/results/defenses/mitigate/bench-defense-cost.{json,md}. Run it alone (2 cores):
``python benchmarks/bench_defense_cost.py [--repeats 3]`` from the repository root.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from cli_timing import ROOT, cifar_backdoor_world, cost_args, timed, write_cost_table

OUT = ROOT / "docs" / "results" / "defenses" / "mitigate"


def main() -> int:
    a = cost_args(__doc__, OUT)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cifar_backdoor_world(t, a.n_train, 600)
        x = pd.read_csv(t / "w" / "train.csv")
        # the defender's clean pairs: a seeded 1,000 of X, beside train.csv so its relative paths hold
        x.sample(1000, random_state=0).to_csv(t / "w" / "repair.csv", index=False)
        xp = ["--data", str(t / "w" / "train.csv"), "--poisons", str(t / "p")]
        for r in range(a.repeats):
            v, s = t / f"v{r}", str(r)
            row = {"train": timed(["train", *xp, "--seed", s, "--out", str(v)])}
            row["repair"] = timed(["repair", "--checkpoint", str(v), "--data", str(t / "w" / "repair.csv"), "--seed", s,
                                   "--out", str(t / f"r{r}")])
            row["robust training"] = timed(["train", *xp, "--defense", "safeclip", "--epochs", "10", "--seed", s,
                                            "--out", str(t / f"safe{r}")])
            row["scan data (clip-score)"] = timed(["scan", "data", *xp, "--checkpoint", str(v), "--detectors",
                                                   "clip-score", "--out", str(t / f"s{r}")])
            row["scan filter"] = timed(["scan", "filter", "--scan", str(t / f"s{r}"), "--detector", "clip-score",
                                        "--fraction", "0.1", "--out", str(t / f"kept{r}.csv")])
            row["retrain"] = timed(["train", "--data", str(t / f"kept{r}.csv"), "--seed", s, "--out", str(t / f"f{r}")])
            row["filter + retrain"] = row["scan data (clip-score)"] + row["scan filter"] + row["retrain"]
            runs.append(row)
            print(f"repeat {r}: " + ", ".join(f"{k} {v_:.1f} s" for k, v_ in row.items()), flush=True)
    print(write_cost_table(a.out, "bench-defense-cost", "Mitigation cost beside training the victim (end to end, fresh processes)",
                           f"{a.n_train:,} CIFAR-10 photos + 600 backdoor poisons, rn-tiny-32 laptop recipe (4 epochs), "
                           f"{a.repeats} repeats (each a new victim), 2 cores, nothing else running. "
                           "`python benchmarks/bench_defense_cost.py`.", runs, n_train=a.n_train))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
