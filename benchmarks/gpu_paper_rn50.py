"""The GPU path end to end: the paper's RN50 recipe (`paper-rn50`) at a reduced size, one backdoored
victim, on whatever CUDA device torch sees (issue 17, "The GPU path, for real").

One `clip-poison sweep` in a fresh process: a synthetic world of --n-train pairs at 224 px (rendered
on the machine, not timed apart: the sweep's wall time includes it), --poisons backdoor poisons
(16-px checkerboard upper-left → "tent", stamped after resizing), RN50 trained by open_clip_train
with the paper's batch 1024, lr 2e-4, wd 0.02, precision `auto` (amp_bf16 on CUDA), --epochs epochs,
--gpus GPUs (torchrun when > 1), then the paper's evaluation (zero-shot, ASR at both test placements,
z-score) on the GPU. Writes OUT/gpu.json and OUT/gpu.md: wall time, world/train/eval seconds,
training samples/s, the precision and device the run recorded, nvidia-smi's GPU name, and the
attack's numbers (one seed, one victim: a smoke test of the path and its speed, not a finding).

On a lent GPU machine (`run` in the tool library; its $OUT comes back):

    python benchmarks/gpu_paper_rn50.py --out "$OUT"                  # ~10 min budget: the defaults
    python benchmarks/gpu_paper_rn50.py --quick --out runs/gpu-quick    # CPU smoke test of the script
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from clip_poison.io import atomic_write_bytes, atomic_write_json, package_versions
from clip_poison.victims.recipes import recipe


def spec(a) -> dict:
    paper = recipe("paper-rn50")  # one home for the recipe: lr, wd, crop, backend from the preset
    train = {"model": paper.model, "epochs": a.epochs, "batch_size": a.batch_size, "lr": paper.lr, "wd": paper.wd,
             "warmup": a.warmup, "backend": paper.backend, "workers": a.workers, "gpus": a.gpus,
             "crop_scale": list(paper.crop_scale)}
    base = {"world": {"n_train": a.n_train, "n_eval": a.n_eval, "image_size": a.image_size},
            "backdoor": {"target_label": "tent", "trigger": "checkerboard", "patch_size": a.patch_size,
                         "placement": "consistent", "n_poisons": a.poisons},
            "train": train, "eval": {"probe_n": None}}  # no probe: it would cost device time and is not reported
    return {"name": "gpu-paper-rn50", "figure": "the GPU path (paper-rn50 at a reduced size)",
            "attack": "backdoor", "base": base, "axes": {}, "seeds": [0], "clean_control": False}


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none (no nvidia-smi)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-eval", type=int, default=1_000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--poisons", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=20, help="steps (the paper's 10,000 exceed a reduced run)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=540, help="seconds before the sweep is stopped (its log is kept)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on any machine: checks the script; not a result")
    ap.add_argument("--out", required=True, help="folder for gpu.json, gpu.md and the sweep (must not exist)")
    a = ap.parse_args()
    if a.quick:
        a.n_train, a.n_eval, a.image_size, a.patch_size, a.poisons = 128, 40, 64, 8, 8
        a.epochs, a.batch_size, a.warmup, a.workers = 1, 32, 1, 1
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        ap.error(f"--out {out} is not empty; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec(a), sort_keys=False))
    argv = [sys.executable, "-m", "clip_poison.cli", "sweep", str(out / "spec.yaml"), "--out", str(out / "sweep")]
    t0 = time.perf_counter()
    with open(out / "sweep.log", "w") as log:  # streamed: a run stopped by the device's limit keeps its log
        try:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=a.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {a.timeout} s"
    wall = time.perf_counter() - t0
    results = [json.loads(p.read_text()) for p in sorted((out / "sweep" / "results").glob("*.json"))]
    r = results[0] if results else {}
    train, m = r.get("train") or {}, r.get("metrics") or {}
    doc = {"quick": a.quick, "status": r.get("status", f"no result (exit {rc})"), "error": r.get("error"),
           "gpu": gpu_name(), "wall_s": round(wall, 1), "run_s": r.get("seconds"), "eval_s": r.get("eval_seconds"),
           "train_s": train.get("seconds"),
           # open_clip_train reports no rate: pairs trained on (whole batches; the remainder is dropped)
           # / the trainer's wall time (its start-up included)
           "samples_per_second": train.get("samples_per_second") or (
               round((a.n_train + a.poisons) // a.batch_size * a.batch_size * a.epochs / train["seconds"], 1)
               if train.get("seconds") else None),
           # results leave out the CPU's fp32 record (run.train_record): absent means fp32 on the CPU
           "precision": train.get("precision") or ({"used": "fp32", "device": "cpu"} if train else None), "eval_device": r.get("eval_device"),
           "n_train": a.n_train, "image_size": a.image_size, "epochs": a.epochs, "batch_size": a.batch_size,
           "gpus": a.gpus, "poisons": a.poisons,
           "metrics": {k: m.get(k) for k in ("zeroshot_accuracy", "backdoor_asr_consistent", "backdoor_asr_random",
                                             "backdoor_z_consistent")},
           "versions": package_versions()}
    atomic_write_json(out / "gpu.json", doc)
    md = [f"# paper-rn50 at a reduced size{' (QUICK SMOKE TEST, not a result)' if a.quick else ''}", "",
          f"GPU: {doc['gpu']}. Status: {doc['status']}" + (f" ({doc['error']})" if doc["error"] else "") + ".", "",
          "| pairs | px | epochs | batch | GPUs | precision | eval on | wall s (world + poisons + train + eval) | train s | "
          "samples/s (pairs in whole batches × epochs / train s) | eval s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
          f"| {a.n_train} | {a.image_size} | {a.epochs} | {a.batch_size} | {a.gpus} | {(doc['precision'] or {}).get('used')} | {doc['eval_device']} | "
          f"{doc['wall_s']} | {doc['train_s']} | {doc['samples_per_second']} | {doc['eval_s']} |", "",
          f"One victim, {a.poisons} poisons, seed 0 (a smoke test of the path, not a finding): "
          + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in doc["metrics"].items()) + ".",
          "", "Produced by `benchmarks/gpu_paper_rn50.py`."]
    atomic_write_bytes(out / "gpu.md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))
    shutil.rmtree(out / "sweep" / "worlds", ignore_errors=True)  # regenerable, and too big to send back
    return 0 if doc["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
