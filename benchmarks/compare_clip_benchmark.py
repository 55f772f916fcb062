"""Does CLIP_benchmark agree with clip-poison on the same exported checkpoints?

For every finished run of a sweep that kept its checkpoint (``keep_checkpoints: true``, e.g. the
``cifar10-ladder`` preset), run ``clip_benchmark eval`` on the exported ``local-dir:`` folder — plain
open_clip, no clip-poison code — on the run's eval set (the world's test split, whole), and put
its top-1 accuracy beside the zero-shot accuracy the sweep recorded. Writes JSON + markdown.

    python benchmarks/compare_clip_benchmark.py runs/sweeps/cifar10-ladder-quick \
        --out docs/results/cifar10/ladder

``--no_amp`` is passed: CLIP_benchmark's default autocast runs bfloat16 on CPU, which moves a few
predictions; the comparison is fp32 against fp32. Runs evaluated on a subset (eval.max_n) are
skipped: CLIP_benchmark scores the whole split.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clip_poison.data.worldfolder import world_eval_pointer
from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions, read_json


def clip_benchmark_acc1(ckpt: Path, root: Path, split: str, tmp: Path) -> float:
    cli = Path(sys.executable).parent / "clip_benchmark"
    out = tmp / "cb.json"
    p = subprocess.run([str(cli), "eval", "--model_type", "open_clip", "--model", f"local-dir:{ckpt}",
                    "--pretrained", "none", "--dataset", "wds/eval", "--dataset_root", str(root),
                    "--split", split, "--task", "zeroshot_classification", "--num_workers", "0", "--no_amp",
                    "--batch_size", "256", "--output", str(out)], capture_output=True, text=True, cwd=tmp,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode != 0:
        raise SystemExit(f"clip_benchmark failed on {ckpt}:\n{p.stderr[-2000:]}")
    return float(json.loads(out.read_text())["metrics"]["acc1"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, help="a sweep folder whose runs kept their checkpoints")
    ap.add_argument("--out", type=Path, required=True, help="folder for clip_benchmark.json / .md")
    a = ap.parse_args()
    rows = []
    for f in sorted((a.sweep / "results").glob("*.json")):
        r = read_json(f)
        if r.get("status") != "ok" or not r.get("checkpoint"):
            continue
        if (r["config"].get("eval") or {}).get("max_n"):
            print(f"{r['id']}: evaluated on a subset (eval.max_n); skipped")
            continue
        ckpt = Path(r["checkpoint"]).resolve()  # recorded relative to where the sweep ran
        if not (ckpt / "open_clip_config.json").is_file():
            print(f"{r['id']}: checkpoint {ckpt} is gone; skipped")
            continue
        world = a.sweep / "worlds"
        wdirs = [d for d in world.iterdir() if (d / "world.json").is_file()]
        # The run's world: the one whose recorded config matches the run's (source + seed + size).
        wcfg = r["config"].get("real_world") or r["config"].get("world")
        wdir = next(d for d in wdirs if read_json(d / "world.json").get("config") == wcfg)
        root, split = world_eval_pointer(wdir)
        t = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            theirs = clip_benchmark_acc1(ckpt, root, split, Path(tmp))
        ours = r["metrics"]["zeroshot_accuracy"]
        row = {"run_id": r["id"], "model": r["config"]["train"]["model"], "seed": r["seed"], "ours": ours,
               "clip_benchmark": theirs, "diff_pp": round(100 * (ours - theirs), 3), "cb_seconds": round(time.time() - t, 1)}
        rows.append(row)
        print(f"{row['model']:12s} seed {row['seed']}  clip-poison {ours:.4f}  CLIP_benchmark {theirs:.4f}  "
              f"diff {row['diff_pp']:+.2f} pp", flush=True)
    if not rows:
        print("no run with a kept checkpoint evaluated on a whole split", file=sys.stderr)
        return 1
    worst = max(abs(x["diff_pp"]) for x in rows)
    res = {"rows": rows, "max_abs_diff_pp": worst, "sweep": str(a.sweep), "versions": package_versions()}
    atomic_write_json(a.out / "clip_benchmark.json", res)
    lines = ["# clip-poison vs CLIP_benchmark on the same exported checkpoints\n",
             f"Zero-shot top-1 on the whole eval split; CLIP_benchmark run with `--no_amp` (fp32) on the "
             f"`local-dir:` export of each victim. Largest difference: **{worst:.2f} percentage points**.\n",
             "| model | seed | clip-poison | CLIP_benchmark | diff (pp) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {x['model']} | {x['seed']} | {x['ours']:.4f} | {x['clip_benchmark']:.4f} | {x['diff_pp']:+.2f} |"
              for x in rows]
    by = {}
    for x in rows:
        by.setdefault(x["model"], []).append(x)
    lines += ["", "| model | seeds | clip-poison mean ± std | CLIP_benchmark mean ± std |", "| --- | --- | --- | --- |"]
    for m, xs in by.items():
        o, c = np.array([x["ours"] for x in xs]), np.array([x["clip_benchmark"] for x in xs])
        lines.append(f"| {m} | {len(xs)} | {o.mean():.3f} ± {o.std(ddof=1) if len(xs) > 1 else 0:.3f} | "
                     f"{c.mean():.3f} ± {c.std(ddof=1) if len(xs) > 1 else 0:.3f} |")
    atomic_write_bytes(a.out / "clip_benchmark.md", ("\n".join(lines) + "\n").encode())
    print(f"largest difference {worst:.2f} pp; wrote {a.out / 'clip_benchmark.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
