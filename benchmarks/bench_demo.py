"""Time `clip-poison demo` end to end and show its attack results over several seeds.

Side by side in one run: the demo with the fast in-process backend (what `clip-poison demo` runs)
and the same demo with OpenCLIP's own trainer (`--backend open_clip_train`) as the baseline, for
the first seed; then the fast demo for the remaining seeds, so the attack's effect is shown over
seeds rather than on one chosen one. Writes a JSON + markdown table (default docs/results/demo/).

    python benchmarks/bench_demo.py --seeds 0 1 2 3 4 [--no-baseline]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from clip_poison.config import DemoConfig
from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions
from clip_poison.pipeline import run_demo

BUDGET_S = 300.0
KEYS = ("zeroshot_accuracy", "targeted_asr", "backdoor_asr", "backdoor_asr_random_placement", "backdoor_z")


def one(seed: int, backend: str, root: Path) -> dict:
    cfg = DemoConfig(seed=seed)
    cfg.train.backend = backend
    t0 = time.perf_counter()
    s = run_demo(cfg, root / f"demo-{backend}-{seed}")
    return {"seed": seed, "backend": backend, "wall_s": round(time.perf_counter() - t0, 1),
            "clean": {k: s["clean"][k] for k in KEYS}, "poisoned": {k: s["poisoned"][k] for k in KEYS},
            "x_prime_true_label": s["attack"]["targeted"]["x_prime_true_label"],
            "train_seconds": s["train_seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--no-baseline", action="store_true", help="skip the open_clip_train demo")
    ap.add_argument("--out", default="docs/results/demo")
    a = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_baseline:
            rows.append(one(a.seeds[0], "open_clip_train", Path(tmp)))
            print(f"baseline demo (open_clip_train), seed {a.seeds[0]}: {rows[-1]['wall_s']} s", flush=True)
        for seed in a.seeds:
            rows.append(one(seed, "fast", Path(tmp)))
            r = rows[-1]
            print(f"fast demo seed {seed}: {r['wall_s']} s  clean/poisoned: acc {r['clean']['zeroshot_accuracy']:.3f}/"
                  f"{r['poisoned']['zeroshot_accuracy']:.3f}  targeted {r['clean']['targeted_asr']:.0f}/"
                  f"{r['poisoned']['targeted_asr']:.0f}  backdoor ASR {r['clean']['backdoor_asr']:.3f}/"
                  f"{r['poisoned']['backdoor_asr']:.3f}  z {r['clean']['backdoor_z']:.2f}/{r['poisoned']['backdoor_z']:.2f}",
                  flush=True)
    fast = [r for r in rows if r["backend"] == "fast"]
    base = [r for r in rows if r["backend"] == "open_clip_train"]
    summary = {}
    for arm in ("clean", "poisoned"):
        summary[arm] = {k: {"mean": float(np.mean([r[arm][k] for r in fast])),
                            "std": float(np.std([r[arm][k] for r in fast], ddof=1)) if len(fast) > 1 else float("nan")}
                        for k in KEYS}
    walls = [r["wall_s"] for r in fast]
    timing = {"fast_wall_s": walls, "fast_median_s": float(np.median(walls)), "budget_s": BUDGET_S,
              "under_budget": bool(max(walls) < BUDGET_S)}
    if base:
        timing["open_clip_train_wall_s"] = base[0]["wall_s"]
        same = next(r for r in fast if r["seed"] == base[0]["seed"])
        timing["speedup_fast_vs_open_clip_train"] = round(base[0]["wall_s"] / same["wall_s"], 2)
    print(f"\ndemo wall time (fast backend): median {timing['fast_median_s']:.0f} s, max {max(walls):.0f} s "
          f"over {len(walls)} seeds; budget {BUDGET_S:.0f} s -> {'PASS' if timing['under_budget'] else 'FAIL'}")
    if base:
        print(f"baseline open_clip_train demo: {timing['open_clip_train_wall_s']:.0f} s; "
              f"fast/baseline speedup x{timing['speedup_fast_vs_open_clip_train']}")
    for arm in ("clean", "poisoned"):
        print(arm, {k: f"{v['mean']:.3f}±{v['std']:.3f}" for k, v in summary[arm].items()})

    out = Path(a.out)
    atomic_write_json(out / "demo_seeds.json", {"rows": rows, "summary": summary, "timing": timing,
                                                  "versions": package_versions(), "argv": sys.argv[1:]})
    md = ["# `clip-poison demo` over seeds", "",
          f"Made by `python benchmarks/bench_demo.py --seeds {' '.join(map(str, a.seeds))}`"
          f"{' --no-baseline' if a.no_baseline else ''} on the 2-core CPU machine. Default demo config: "
          "10,000 clean pairs, rn-tiny-32, 4 epochs, no random crop; targeted: 32 noisy copies of x' (0.32 %); "
          "backdoor: 300 poisons (3 %), 4-px checkerboard upper-left, target 'tent'.", "",
          "| backend | seed | wall s | x' class | acc clean / poisoned | targeted clean / poisoned | "
          "backdoor ASR clean / poisoned | ASR random placement clean / poisoned | z clean / poisoned |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, p = r["clean"], r["poisoned"]
        md.append(f"| {r['backend']} | {r['seed']} | {r['wall_s']:.0f} | {r['x_prime_true_label']} | "
                  f"{c['zeroshot_accuracy']:.3f} / {p['zeroshot_accuracy']:.3f} | {c['targeted_asr']:.0f} / {p['targeted_asr']:.0f} | "
                  f"{c['backdoor_asr']:.3f} / {p['backdoor_asr']:.3f} | {c['backdoor_asr_random_placement']:.3f} / "
                  f"{p['backdoor_asr_random_placement']:.3f} | {c['backdoor_z']:.2f} / {p['backdoor_z']:.2f} |")
    md += ["", "Mean ± std over the fast-backend seeds:", "", "| metric | clean | poisoned |", "|---|---|---|"]
    for k in KEYS:
        md.append(f"| {k} | {summary['clean'][k]['mean']:.3f} ± {summary['clean'][k]['std']:.3f} | "
                  f"{summary['poisoned'][k]['mean']:.3f} ± {summary['poisoned'][k]['std']:.3f} |")
    md += ["", f"Wall time (fast backend): median {timing['fast_median_s']:.0f} s, max {max(walls):.0f} s; "
           f"budget {BUDGET_S:.0f} s."]
    if base:
        md.append(f"Baseline (same demo, open_clip_train backend, seed {base[0]['seed']}): "
                  f"{timing['open_clip_train_wall_s']:.0f} s, i.e. the fast demo is x{timing['speedup_fast_vs_open_clip_train']} faster.")
    atomic_write_bytes(out / "README.md", ("\n".join(md) + "\n").encode())
    print(f"wrote {out}/demo_seeds.json and {out}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
