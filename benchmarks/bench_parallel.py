"""Sweep throughput: N victims at once (`clip-poison sweep --parallel N`) against one at a time.

For each model (rn-tiny-32 and rn-5m-32 by default) and each N (1 = today's sweep: one victim at a
time with torch's default threads; 2 = two worker processes with cores/2 threads each), one sweep of
four victims runs end to end in a fresh `clip-poison sweep` process: the cifar10-backdoor preset's
recipe (CIFAR-10 world of 10,000 captioned train photos, the laptop recipe: 4 epochs, batch 128;
5,000 eval photos and a 5,000-photo probe) at 100, 200 and 300 backdoor poisons plus the clean
control, all on seed 0's world. victims/hour = 4 × 3600 / the sweep's wall time (Python start,
poisons, training, evaluation, results). The world is rendered once before any clock starts and
hard-linked into every sweep folder as that sweep's cached world (a sweep renders a seed's world
once and reuses it), so the clock measures victims, alike for every arm.

Arms are interleaved within each repeat (machine drift hits them alike); every run is reported;
the ratio is the median of per-repeat ratios, with its range. The best N per model (highest median
victims/hour) goes to ``parallel.json``'s ``best``, which `clip-poison sweep --parallel auto` reads
(only on a machine with as many cores as this one). Run it alone on the machine, without
OMP_NUM_THREADS (the N = 1 arm must have torch's default threads; the result records each arm's):

    flock /tmp/cpu.lock python benchmarks/bench_parallel.py [--models rn-tiny-32 rn-5m-32] [--repeats 3]
    python benchmarks/bench_parallel.py --quick      # a smoke test of the script (tiny sizes, not a measurement)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from clip_poison.experiments.executors import cpu_count
from clip_poison.experiments.spec import expand, spec_from_dict
from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions
from clip_poison.run import world_id, write_world_for


def sweep_spec(model: str, root: str, quick: bool) -> dict:
    """The cifar10-backdoor preset (one home for the recipe) at three counts and one seed."""
    preset = yaml.safe_load(resources.files("clip_poison.experiments").joinpath("presets/cifar10-backdoor.yaml")
                            .read_text())
    base = json.loads(json.dumps(preset["base"]))
    base["real_world"]["root"] = str(Path(root).resolve())
    base["train"]["model"] = model
    counts = [100, 200, 300]
    if quick:
        base["real_world"]["n_train"], base["eval"] = 400, {"max_n": 100, "probe_n": None}
        base["train"]["epochs"], counts = 1, [20]
    return {"name": f"bench-parallel-{model}", "attack": "backdoor", "base": base,
            "axes": {"backdoor.n_poisons": counts}, "seeds": [0]}


def run_arm(spec_file: Path, world: Path, wid: str, n: int, out: Path) -> dict:
    """One `clip-poison sweep --parallel n` in a fresh process, on a hard-linked copy of the world."""
    shutil.copytree(world, out / "worlds" / wid, copy_function=os.link)
    argv = [sys.executable, "-m", "clip_poison.cli", "sweep", str(spec_file), "--out", str(out), "--parallel", str(n)]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    results = [json.loads(p.read_text()) for p in (out / "results").glob("*.json")]
    bad = [r.get("error") for r in results if r["status"] != "ok"]
    if proc.returncode != 0 or bad or not results:
        raise SystemExit(f"sweep --parallel {n} failed (exit {proc.returncode}): {bad or proc.stderr[-2000:]}")
    shutil.rmtree(out)
    return {"wall_s": wall, "victims": len(results), "victims_per_hour": 3600 * len(results) / wall,
            "threads": sorted({r["train"]["threads"] for r in results})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["rn-tiny-32", "rn-5m-32"])
    ap.add_argument("--parallel", nargs="+", type=int, default=[1, 2], help="victims at once, one arm each")
    ap.add_argument("--root", default="../shared/data/cifar10-wds", help="CIFAR-10 in CLIP_benchmark's wds layout")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the script runs; not a result")
    ap.add_argument("--out", default=None, help="default docs/results/speed (--quick: runs/bench-quick/speed)")
    a = ap.parse_args()
    if 1 not in a.parallel:
        ap.error("--parallel must include 1 (the baseline: one victim at a time)")
    repeats = 1 if a.quick else a.repeats
    out = Path(a.out or ("runs/bench-quick/speed" if a.quick else "docs/results/speed"))
    load_before = os.getloadavg()
    runs: dict[str, dict[int, list[dict]]] = {m: {n: [] for n in a.parallel} for m in a.models}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        specs, worlds = {}, {}
        for m in a.models:
            raw = sweep_spec(m, a.root, a.quick)
            specs[m] = tmp / f"{m}.yaml"
            specs[m].write_text(yaml.safe_dump(raw))
            cfg = expand(spec_from_dict(raw))[0]["config"]
            worlds[m] = (tmp / "worlds" / world_id(cfg), world_id(cfg))
            if not worlds[m][0].is_dir():  # every model's sweep uses one world
                t = time.perf_counter()
                write_world_for(cfg, worlds[m][0])
                print(f"world {worlds[m][1]} rendered in {time.perf_counter() - t:.0f} s (not timed below)", flush=True)
        for i in range(repeats):
            for m in a.models:
                for n in a.parallel:
                    r = run_arm(specs[m], *worlds[m], n, tmp / f"sweep-{m}-{n}-{i}")
                    runs[m][n].append(r)
                    print(f"repeat {i}: {m} --parallel {n}: {r['victims']} victims in {r['wall_s']:.0f} s = "
                          f"{r['victims_per_hour']:.1f} victims/hour (threads per victim {r['threads']})", flush=True)

    models, best = {}, {}
    for m, arms in runs.items():
        med = {n: float(np.median([r["victims_per_hour"] for r in rs])) for n, rs in arms.items()}
        best[m] = max(med, key=med.get)
        ratios = {n: [r["victims_per_hour"] / b["victims_per_hour"] for r, b in zip(rs, arms[1])]
                  for n, rs in arms.items() if n != 1}
        models[m] = {"victims_per_sweep": arms[1][0]["victims"],
                     "arms": {str(n): {"wall_s": [round(r["wall_s"], 1) for r in rs],
                                       "victims_per_hour": [round(r["victims_per_hour"], 2) for r in rs],
                                       "median_victims_per_hour": round(med[n], 2), "threads": rs[0]["threads"]}
                              for n, rs in arms.items()},
                     "ratio_vs_1": {str(n): {"per_repeat": [round(x, 3) for x in v], "median": round(float(np.median(v)), 3),
                                             "min": round(min(v), 3), "max": round(max(v), 3)} for n, v in ratios.items()}}
    doc = {"cpus": cpu_count(), "best": best, "models": models, "repeats": repeats, "quick": a.quick,
           "recipe": "cifar10-backdoor preset, 10,000 photos, 4 epochs, batch 128, eval 5,000 + probe 5,000; "
                     "counts 100/200/300 + clean, seed 0" if not a.quick else "quick smoke test (not a measurement)",
           "load_average_before": [round(x, 2) for x in load_before], "host": os.uname().nodename,
           "versions": package_versions()}
    lines = [f"# Parallel victims: sweep throughput, N victims at once vs one at a time ({cpu_count()} cores)", "",
             f"Each arm: one `clip-poison sweep --parallel N` in a fresh process ({doc['recipe']}); victims/hour = "
             f"victims × 3600 / wall time; {repeats} interleaved repeats, every run listed. Load average before the "
             f"run: {', '.join(f'{x:.2f}' for x in load_before)} (numbers are only valid from a machine running nothing "
             "else). Produced by `benchmarks/bench_parallel.py`.", "",
             "| model | N at once | threads per victim | wall s (all runs) | victims/hour (median) | vs N = 1 (median of "
             "per-repeat ratios, range) |", "| --- | --- | --- | --- | --- | --- |"]
    for m, d in models.items():
        for n, arm in d["arms"].items():
            r = d["ratio_vs_1"].get(n)
            ratio = f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})" if r else "1 (baseline)"
            lines.append(f"| {m} | {n} | {', '.join(map(str, arm['threads']))} | "
                         f"{', '.join(f'{w:.0f}' for w in arm['wall_s'])} | {arm['median_victims_per_hour']:.1f} | {ratio} |")
    short = sorted({m for m, d in models.items() if max(d["arms"]["1"]["threads"]) < cpu_count()})
    if short:  # OMP_NUM_THREADS set by the caller: the baseline did not have the whole machine
        lines += ["", f"**Not a valid baseline**: one at a time ran with fewer threads than cores for {', '.join(short)} "
                  "(OMP_NUM_THREADS set?); rerun without it."]
    lines += ["", "Best N per model (what `clip-poison sweep --parallel auto` uses on a machine with "
              f"{cpu_count()} cores): " + ", ".join(f"{m} → {n}" for m, n in best.items()) + "."]
    text = "\n".join(lines)
    print("\n" + text)
    atomic_write_json(out / "parallel.json", doc)
    atomic_write_bytes(out / "parallel.md", (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
