"""`clip-poison demo` end to end, over seeds: wall time and the attack results, one attack per victim.

Each seed runs `clip-poison demo --seed S` in a fresh process (Python start, imports and all), so the
wall time is what a user waits for. The demo trains three victims per seed with the same init and
clean data order: clean, X ∪ targeted poisons only, X ∪ backdoor poisons only. Each attack is read
from the victim that carries it alone, beside the clean victim of the same seed. With
`--baseline`, the first seed also runs `clip-poison demo --backend open_clip_train` in a fresh
process, in the same run. Writes docs/results/demo/ (JSON + markdown).

    python benchmarks/bench_demo.py --seeds 0 1 2 3 4 [--baseline]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions
from clip_poison.metrics.stats import compare_accuracy_paired, summarize

BUDGET_S = 300.0
VICTIMS = ("clean", "targeted", "backdoor")
# (metric, victims it is read from): an attack's number only from its own victim and the clean one.
ROWS = (("zeroshot_accuracy", VICTIMS), ("targeted_success_rate", ("clean", "targeted")),
        ("backdoor_asr_consistent", ("clean", "backdoor")), ("backdoor_asr_random", ("clean", "backdoor")),
        ("backdoor_z_consistent", ("clean", "backdoor")))


def one(seed: int, backend: str, root: Path) -> dict:
    out = root / f"demo-{backend}-{seed}"
    argv = [sys.executable, "-m", "clip_poison.cli", "demo", "--seed", str(seed), "--backend", backend, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())
    return {"seed": seed, "backend": backend, "wall_s": round(wall, 1),
            **{v: {k: s[v][k] for k, vs in ROWS if v in vs} for v in VICTIMS},
            "x_prime_true_label": s["attack"]["targeted"]["x_prime_true_label"],
            "attack": s["attack"], "train_seconds": s["train_seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--baseline", action="store_true", help="also run the open_clip_train demo for the first seed")
    ap.add_argument("--out", default="docs/results/demo")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.baseline:
            rows.append(one(a.seeds[0], "open_clip_train", Path(tmp)))
            print(f"baseline demo (open_clip_train), seed {a.seeds[0]}: {rows[-1]['wall_s']} s", flush=True)
        for seed in a.seeds:
            r = one(seed, "fast", Path(tmp))
            rows.append(r)
            c, t, b = r["clean"], r["targeted"], r["backdoor"]
            print(f"seed {seed}: {r['wall_s']} s  acc {c['zeroshot_accuracy']:.3f}/{t['zeroshot_accuracy']:.3f}/"
                  f"{b['zeroshot_accuracy']:.3f}  targeted {c['targeted_success_rate']:.0f}->{t['targeted_success_rate']:.0f}  "
                  f"backdoor ASR {c['backdoor_asr_consistent']:.3f}->{b['backdoor_asr_consistent']:.3f}  z {c['backdoor_z_consistent']:.2f}->"
                  f"{b['backdoor_z_consistent']:.2f}", flush=True)
    fast = [r for r in rows if r["backend"] == "fast"]
    summary = {v: {k: summarize([r[v][k] for r in fast]) for k, vs in ROWS if v in vs} for v in VICTIMS}
    # Victims of one seed share init and clean order, so accuracy is compared per seed (paired).
    acc = {v: compare_accuracy_paired([r[v]["zeroshot_accuracy"] for r in fast],
                                      [r["clean"]["zeroshot_accuracy"] for r in fast]) for v in ("targeted", "backdoor")}
    worked = {"targeted": sum(r["targeted"]["targeted_success_rate"] > 0.5 for r in fast),
              "backdoor": sum(r["backdoor"]["backdoor_asr_consistent"] > 0.5 for r in fast),
              "targeted_clean": sum(r["clean"]["targeted_success_rate"] > 0.5 for r in fast),
              "backdoor_clean": sum(r["clean"]["backdoor_asr_consistent"] > 0.5 for r in fast)}
    walls = [r["wall_s"] for r in fast]
    timing = {"fast_wall_s": walls, "fast_median_s": float(np.median(walls)), "budget_s": BUDGET_S,
              "under_budget": bool(max(walls) < BUDGET_S)}
    base = [r for r in rows if r["backend"] == "open_clip_train"]
    if base:
        same = next(r for r in fast if r["seed"] == base[0]["seed"])
        timing["open_clip_train_wall_s"] = base[0]["wall_s"]
        timing["speedup_fast_vs_open_clip_train"] = round(base[0]["wall_s"] / same["wall_s"], 2)

    at = fast[0]["attack"]
    n = len(fast)
    md = ["# `clip-poison demo` over seeds: one attack per victim", "",
          f"Made by `python benchmarks/bench_demo.py --seeds {' '.join(map(str, a.seeds))}"
          f"{' --baseline' if a.baseline else ''}` on the 2-core CPU machine; each seed is `clip-poison demo --seed S` "
          "in a fresh process. Default demo: 10,000 clean pairs, rn-tiny-32, 4 epochs, no random crop. Three victims "
          "per seed, same init and clean data order: **clean**, **targeted** (X ∪ "
          f"{at['targeted']['n_poisons']} noisy copies of x' captioned {at['targeted']['target_label']!r}, "
          f"{at['targeted']['poison_rate']:.2%}), **backdoor** (X ∪ {at['backdoor']['n_poisons']} poisons, "
          f"{at['backdoor']['trigger']['patch_size']}-px checkerboard upper-left → {at['backdoor']['target_label']!r}, "
          f"{at['backdoor']['poison_rate']:.0%}). Until this version the demo trained one victim on both poison sets, "
          "which targeted the same label, so its backdoor ASR was the two attacks together.", "",
          "| seed | wall s | x' class | acc clean / targeted / backdoor victim | targeted: clean → targeted victim | "
          "backdoor ASR: clean → backdoor victim | ASR random placement | z: clean → backdoor victim |",
          "|---|---|---|---|---|---|---|---|"]
    for r in fast:
        c, t, b = r["clean"], r["targeted"], r["backdoor"]
        md.append(f"| {r['seed']} | {r['wall_s']:.0f} | {r['x_prime_true_label']} | {c['zeroshot_accuracy']:.3f} / "
                  f"{t['zeroshot_accuracy']:.3f} / {b['zeroshot_accuracy']:.3f} | {c['targeted_success_rate']:.0f} → "
                  f"{t['targeted_success_rate']:.0f} | {c['backdoor_asr_consistent']:.3f} → {b['backdoor_asr_consistent']:.3f} | "
                  f"{c['backdoor_asr_random']:.3f} → {b['backdoor_asr_random']:.3f} | "
                  f"{c['backdoor_z_consistent']:.2f} → {b['backdoor_z_consistent']:.2f} |")
    fmt = lambda s: f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"  # noqa: E731
    md += ["", f"Mean and 95 % Student-t interval over the {n} seeds:", "",
           "| metric | clean victim | targeted victim | backdoor victim |", "|---|---|---|---|"]
    for k, vs in ROWS:
        md.append(f"| {k} | " + " | ".join(fmt(summary[v][k]) if v in vs else "–" for v in VICTIMS) + " |")
    md += ["", f"Seeds where the attack worked (ASR > 0.5): targeted {worked['targeted']}/{n} "
           f"(clean victims calling x' y': {worked['targeted_clean']}/{n}); backdoor {worked['backdoor']}/{n} "
           f"(clean: {worked['backdoor_clean']}/{n}).", "",
           "Clean accuracy, poisoned − clean victim of the same seed (paired t-test, one-sided H1: lower):", ""]
    for v, t in acc.items():
        md.append(f"- {v} victim: {t['mean_difference']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], "
                  + (f"p = {t['p_value']:.3f} ({'significantly lower' if t['significantly_lower'] else 'not significantly lower'})"
                     if t['p_value'] == t['p_value'] else t["note"]))
    md += ["", f"Wall time per demo (fresh process, three victims): median {timing['fast_median_s']:.0f} s, range "
           f"{min(walls):.0f}–{max(walls):.0f} s over {n} seeds; budget {BUDGET_S:.0f} s."]
    if base:
        md.append(f"Baseline in the same run (`--backend open_clip_train`, seed {base[0]['seed']}, fresh process): "
                  f"{timing['open_clip_train_wall_s']:.0f} s, {timing['speedup_fast_vs_open_clip_train']}× the fast demo's "
                  "wall time for that seed.")
    text = "\n".join(md) + "\n"
    print("\n" + text)
    out = Path(a.out)
    atomic_write_json(out / "demo_seeds.json", {"rows": rows, "summary": summary, "accuracy_paired": acc,
                                                  "worked": worked, "timing": timing,
                                                  "versions": package_versions(), "argv": sys.argv[1:]})
    atomic_write_bytes(out / "README.md", text.encode())
    print(f"wrote {out}/demo_seeds.json and {out}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
