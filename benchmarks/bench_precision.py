"""bfloat16 against fp32 victims on CPU (`--precision bf16`, autocast): speed by model size, and
whether bf16 victims measure the same.

throughput (default): for each model (rn-tiny-32, rn-5m-32, rn-30m-32, vit-30m-32) and precision,
  `clip-poison train --precision fp32|bf16` in a fresh process on one CIFAR-10 world of 10,000
  captioned photos (`clip-poison world cifar10 --n-train 10000`, rendered once, untimed) with the
  laptop recipe (the CLI defaults: 4 epochs, batch 128, lr 2e-3). victims/hour = 3600 / wall time
  (Python start, data, training, checkpoint). Arms interleaved within each repeat; every run is
  reported; the speed-up is the median of per-repeat ratios with its range.

equivalence (--equivalence, long: 4 victims per seed of --equivalence-model): the cifar10-backdoor
  preset at --poisons poisons (600 by default: the count that backdoored rn-tiny-32 on 5 of 5 seeds,
  so ASR is a stable quantity; near the threshold it is bimodal across seeds and any difference
  would hide in the spread) with `train.precision` as the sweep axis, --seeds seeds, clean
  controls. For clean zero-shot accuracy (clean victims), backdoor ASR and the backdoor z-score
  (poisoned victims; ASR sits at 1.0 there, z does not): the fp32 seeds' mean, sd and range, bf16's,
  and the verdict "within the fp32 seed spread" = bf16's mean inside the fp32 seeds' [min, max];
  also the paired per-seed difference (one seed: same
  world, poisons, initialisation and data order; only the precision differs). The sweep folder
  (--sweep-dir) is kept, so a killed run resumes.

Writes docs/results/speed/precision.{json,md}; a run of one part keeps the other part's section
already in precision.json, and an equivalence run of one model keeps the other models' (one section per
--equivalence-model). Run it alone on the machine, without OMP_NUM_THREADS:

    flock /tmp/cpu.lock python benchmarks/bench_precision.py [--models ...] [--repeats 3]
    flock /tmp/cpu.lock python benchmarks/bench_precision.py --skip-throughput --equivalence --seeds 5
    python benchmarks/bench_precision.py --skip-throughput --equivalence --equivalence-model rn-5m-32
    python benchmarks/bench_precision.py --quick --equivalence     # smoke test of the script, not a measurement
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from bench_backends import check_models
from clip_poison.experiments.executors import cpu_count
from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions

MODELS = ["rn-tiny-32", "rn-5m-32", "rn-30m-32", "vit-30m-32"]
PRECISIONS = ["fp32", "bf16"]
CLI = [sys.executable, "-m", "clip_poison.cli"]
# table row -> (from the clean victims?, metric); rows render in this order (JSON keeps keys sorted)
EQUIVALENCE_METRICS = {"zeroshot_accuracy (clean victims)": (True, "zeroshot_accuracy"),
                       "backdoor_asr_consistent (poisoned victims)": (False, "backdoor_asr_consistent"),
                       # ASR is at its ceiling at 600 poisons; the z-score (Definition 1) is not, so it can show a shift
                       "backdoor_z_consistent (poisoned victims)": (False, "backdoor_z_consistent")}


def train_arm(world: Path, model: str, precision: str, epochs: int | None, out: Path) -> dict:
    argv = [*CLI, "train", "--data", str(world / "train.csv"), "--model", model, "--precision", precision,
            "--out", str(out), "--overwrite", *(["--epochs", str(epochs)] if epochs else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    info = json.loads((out / "train.json").read_text())
    return {"wall_s": wall, "victims_per_hour": 3600 / wall, "samples_per_second": info["samples_per_second"],
            "used": info["precision"]["used"], "threads": info["threads"]}


def throughput(a, tmp: Path) -> dict:
    world = tmp / "world"
    t = time.perf_counter()
    subprocess.run([*CLI, "world", "cifar10", "--root", a.root, "--n-train", str(400 if a.quick else a.n_train),
                    "--out", str(world)], check=True, capture_output=True)
    print(f"world rendered in {time.perf_counter() - t:.0f} s (not timed below)", flush=True)
    runs = {m: {p: [] for p in PRECISIONS} for m in a.models}
    for i in range(1 if a.quick else a.repeats):
        for m in a.models:
            for p in PRECISIONS:
                r = train_arm(world, m, p, 1 if a.quick else None, tmp / "victim")
                runs[m][p].append(r)
                print(f"repeat {i}: {m} {p}: {r['wall_s']:.0f} s, {r['samples_per_second']:.0f} samples/s in training "
                      f"({r['used']}, {r['threads']} threads)", flush=True)
    out = {}
    for m, arms in runs.items():
        ratios = [f["wall_s"] / b["wall_s"] for f, b in zip(arms["fp32"], arms["bf16"])]
        out[m] = {"arms": {p: {"wall_s": [round(r["wall_s"], 1) for r in rs],
                               "victims_per_hour": [round(r["victims_per_hour"], 2) for r in rs],
                               "median_victims_per_hour": round(float(np.median([r["victims_per_hour"] for r in rs])), 2),
                               "samples_per_second": [r["samples_per_second"] for r in rs],
                               "used": rs[0]["used"], "threads": rs[0]["threads"]} for p, rs in arms.items()},
                  "bf16_vs_fp32": {"per_repeat": [round(x, 3) for x in ratios], "median": round(float(np.median(ratios)), 3),
                                   "min": round(min(ratios), 3), "max": round(max(ratios), 3)}}
    return {"models": out, "repeats": 1 if a.quick else a.repeats, "n_train": 400 if a.quick else a.n_train,
            "recipe": "laptop (CLI defaults)" if not a.quick else "quick smoke test, 1 epoch (not a measurement)"}


def _spread(v: list[float]) -> dict:
    x = np.asarray(v, dtype=float)
    return {"values": [round(float(y), 4) for y in x], "mean": round(float(x.mean()), 4),
            "sd": round(float(x.std(ddof=1)), 4) if x.size > 1 else None,
            "min": round(float(x.min()), 4), "max": round(float(x.max()), 4)}


def equivalence(a) -> dict:
    preset = yaml.safe_load(resources.files("clip_poison.experiments").joinpath("presets/cifar10-backdoor.yaml")
                            .read_text())
    base = json.loads(json.dumps(preset["base"]))
    base["real_world"]["root"] = str(Path(a.root).resolve())
    base["train"]["model"] = a.equivalence_model
    base["backdoor"]["n_poisons"] = a.poisons
    if a.quick:
        base["real_world"]["n_train"], base["eval"], base["train"]["epochs"] = 400, {"max_n": 100, "probe_n": None}, 1
    spec = {"name": "bench-precision-equivalence", "attack": "backdoor", "base": base, "axes": {"train.precision": PRECISIONS},
            "seeds": list(range(a.seeds))}
    sweep = Path(a.sweep_dir or f"runs/bench{'-quick' if a.quick else ''}/precision-equivalence-{a.equivalence_model}")
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run([*CLI, "sweep", str(sweep / "spec.yaml"), "--out", str(sweep)])
    results = [json.loads(p.read_text()) for p in (sweep / "results").glob("*.json")]
    if proc.returncode != 0 or any(r["status"] != "ok" for r in results):
        raise SystemExit(f"the equivalence sweep in {sweep} has failed runs; rerun to retry them")
    by = {(r["config"]["train"]["precision"], r["clean"], r["seed"]): r["metrics"] for r in results}
    seeds = sorted({r["seed"] for r in results})
    out = {}
    for name, (clean, key) in EQUIVALENCE_METRICS.items():
        v = {p: [by[(p, clean, s)][key] for s in seeds] for p in PRECISIONS}
        f32, b16 = _spread(v["fp32"]), _spread(v["bf16"])
        out[name] = {"fp32": f32, "bf16": b16, "paired_difference_bf16_minus_fp32": _spread(
                         [b - f for b, f in zip(v["bf16"], v["fp32"])]),
                     # on the unrounded values: a mean at the range's edge must not pass by rounding
                     "within_fp32_seed_spread": bool(min(v["fp32"]) <= np.mean(v["bf16"]) <= max(v["fp32"]))}
    return {"model": a.equivalence_model, "n_poisons": a.poisons, "seeds": seeds, "metrics": out,
            "sweep_dir": str(sweep), "recipe": "cifar10-backdoor preset" if not a.quick else "quick smoke test"}


def _smallest_first(item: tuple[str, dict]) -> int:
    """JSON files keep keys sorted; the tables read smallest model first."""
    return MODELS.index(item[0]) if item[0] in MODELS else len(MODELS)


def render(doc: dict) -> str:
    lines = [f"# bf16 vs fp32 victims on CPU ({doc['cpus']} cores)", "",
             "Produced by `benchmarks/bench_precision.py`; the times are only valid from a machine running nothing else."]
    if t := doc.get("throughput"):
        lines += ["", f"## Victims per hour ({t['recipe']}, {t['n_train']:,} CIFAR-10 photos; `clip-poison train` in "
                  f"fresh processes, {t['repeats']} interleaved repeats)", "",
                  f"Load average before the run: {', '.join(map(str, t['load_average_before']))}.", "",
                  "| model | fp32 wall s (all runs) | bf16 wall s (all runs) | fp32 victims/hour | bf16 victims/hour | "
                  "bf16 speed-up (median of per-repeat ratios, range) | threads |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for m, d in sorted(t["models"].items(), key=_smallest_first):
            f, b, r = d["arms"]["fp32"], d["arms"]["bf16"], d["bf16_vs_fp32"]
            lines.append(f"| {m} | {', '.join(f'{w:.0f}' for w in f['wall_s'])} | {', '.join(f'{w:.0f}' for w in b['wall_s'])} | "
                         f"{f['median_victims_per_hour']:.1f} | {b['median_victims_per_hour']:.1f} | "
                         f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f}) | {f['threads']} |")
    for _, e in sorted(doc.get("equivalence", {}).items(), key=_smallest_first):
        lines += ["", f"## Equivalence: {e['model']}, {e['n_poisons']} backdoor poisons, seeds {e['seeds']} "
                  f"({e['recipe']})", "",
                  "| metric | fp32 mean ± sd [min, max] | bf16 mean ± sd [min, max] | paired bf16 − fp32 mean ± sd [min, max] | "
                  "bf16 mean within the fp32 seed range |", "| --- | --- | --- | --- | --- |"]
        # 4 decimals, as stored: ASR 0.9996 must not print as 1.000
        fmt = lambda s: (f"{s['mean']:.4f} ± {s['sd']:.4f} " if s["sd"] is not None else f"{s['mean']:.4f} ") + \
            f"[{s['min']:.4f}, {s['max']:.4f}]"  # noqa: E731
        for name, d in sorted(e["metrics"].items(), key=lambda kv: list(EQUIVALENCE_METRICS).index(kv[0])):
            lines.append(f"| {name} | {fmt(d['fp32'])} | {fmt(d['bf16'])} | {fmt(d['paired_difference_bf16_minus_fp32'])} | "
                         f"{'yes' if d['within_fp32_seed_spread'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--root", default="../shared/data/cifar10-wds", help="CIFAR-10 in CLIP_benchmark's wds layout")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-throughput", action="store_true", help="run only --equivalence")
    ap.add_argument("--equivalence", action="store_true", help="also the bf16 vs fp32 equivalence sweep (long)")
    ap.add_argument("--equivalence-model", default="rn-30m-32")
    ap.add_argument("--poisons", type=int, default=600, help="backdoor poisons of the equivalence sweep")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sweep-dir", default=None, help="the equivalence sweep's folder (kept; a rerun resumes it)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the script runs; not a result")
    ap.add_argument("--out", default=None, help="default docs/results/speed (--quick: runs/bench-quick/speed)")
    a = ap.parse_args()
    # checked before any world is rendered or victim trained
    if a.repeats < 1:
        ap.error(f"--repeats {a.repeats}: use 1 or more (3 or more for a range over repeats)")
    if a.n_train < 128:
        ap.error(f"--n-train {a.n_train}: use 128 or more (one training batch of the laptop recipe)")
    if a.equivalence and (a.seeds < 2 or a.poisons < 1):
        ap.error(f"--seeds {a.seeds} --poisons {a.poisons}: the equivalence needs 2 or more seeds (a seed spread) "
                 "and 1 or more poisons")
    if a.skip_throughput and not a.equivalence:
        ap.error("--skip-throughput without --equivalence runs nothing: add --equivalence")
    if not Path(a.root).is_dir():
        ap.error(f"--root {a.root}: no such folder; point it at CIFAR-10 in CLIP_benchmark's webdataset layout "
                 "(../shared/data/cifar10-wds)")
    check_models(ap, [*([] if a.skip_throughput else a.models), *([a.equivalence_model] if a.equivalence else [])])
    if a.quick:
        a.seeds, a.poisons = min(a.seeds, 2), min(a.poisons, 20)
    out = Path(a.out or ("runs/bench-quick/speed" if a.quick else "docs/results/speed"))
    old = json.loads((out / "precision.json").read_text()) if (out / "precision.json").is_file() else {}
    # files written before sections were kept apart: one load average for the whole file, one equivalence
    if "load_average_before" in old and "throughput" in old:
        old["throughput"].setdefault("load_average_before", old.pop("load_average_before"))
    if "model" in old.get("equivalence", {}):
        old["equivalence"] = {old["equivalence"]["model"]: old["equivalence"]}
    doc = {**old, "cpus": cpu_count(), "quick": a.quick, "host": os.uname().nodename, "versions": package_versions()}
    doc.pop("load_average_before", None)
    if not a.skip_throughput:
        load = [round(x, 2) for x in os.getloadavg()]
        with tempfile.TemporaryDirectory() as tmp:
            doc["throughput"] = {"load_average_before": load, **throughput(a, Path(tmp))}
    if a.equivalence:
        doc["equivalence"] = {**doc.get("equivalence", {}), a.equivalence_model: equivalence(a)}
    text = render(doc)
    print("\n" + text)
    atomic_write_json(out / "precision.json", doc)
    atomic_write_bytes(out / "precision.md", (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
