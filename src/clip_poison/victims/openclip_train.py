"""Train a victim with OpenCLIP's own trainer (``open_clip_train``), the reference backend.

Runs ``python -m open_clip_train.main`` (through ``_otrain_entry``) in a subprocess on X ∪ P, reads
its log lines for progress, refuses to call a run "trained" unless a checkpoint was written, and
exports the result as an open_clip ``local-dir:`` folder.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..attacks.poisonset import read_manifest
from ..config import TrainConfig
from ..data.csvdata import read_csv_dataset, write_csv_rows
from ..io import UserError, atomic_dir, atomic_write_json, package_versions, sha256_file
from .export import export_local_dir
from .models import model_config

PROGRESS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")

Progress = Callable[[int, int], None]  # (samples done, samples total)


def training_rows(train_csv: str | Path, poison_dirs: list[str | Path]) -> tuple[list[str], list[str], int, list[dict]]:
    """Clean rows first, then every poison set's rows, all with absolute paths. The clean CSV and
    the poison folders are only read."""
    clean = read_csv_dataset(train_csv)
    paths, caps, sources = list(clean.paths), list(clean.captions), []
    for d in poison_dirs:
        manifest = read_manifest(d)
        p = read_csv_dataset(Path(d) / manifest["csv"])
        paths += p.paths
        caps += p.captions
        sources.append({"dir": str(d), "attack": manifest["attack"], "n_poisons": len(p),
                        "manifest_sha256": sha256_file(Path(d) / "manifest.json")})
    return paths, caps, len(clean), sources


def open_clip_train_argv(cfg: TrainConfig, csv_path: Path, logs: Path, n_samples: int) -> list[str]:
    lo, hi = cfg.crop_scale
    return [
        "--train-data", str(csv_path), "--dataset-type", "csv", "--csv-separator", ",",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--train-num-samples", str(n_samples),
        "--model", cfg.model, "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size),
        "--lr", str(cfg.lr), "--wd", str(cfg.wd), "--warmup", str(cfg.warmup),
        # fp32: amp on CPU is ~20x slower (TOOLCHAIN.md).
        "--precision", "fp32", "--workers", str(cfg.workers), "--seed", str(cfg.seed),
        "--logs", str(logs), "--name", "run", "--save-frequency", "0", "--report-to", "",
        "--log-every-n-steps", "1", "--aug-cfg", f"scale=({lo},{hi})", "ratio=(1.0,1.0)",
    ]


def train_open_clip_train(train_csv: str | Path, poison_dirs: list[str | Path], cfg: TrainConfig,
                          out: str | Path, overwrite: bool = False, progress: Progress | None = None) -> dict:
    """Train on X ∪ P and write a local-dir checkpoint plus ``train.json`` to ``out``."""
    model_cfg = model_config(cfg.model)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError("--epochs and --batch-size must be >= 1")
    t0 = time.time()
    paths, caps, n_clean, sources = training_rows(train_csv, poison_dirs)
    if len(paths) < cfg.batch_size:
        raise UserError(f"{len(paths)} training pairs are fewer than one batch of {cfg.batch_size}; "
                        "lower --batch-size")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        work = tmp / "open_clip_train"
        csv_path = work / "train_x_union_p.csv"
        write_csv_rows(csv_path, paths, caps)
        argv = [sys.executable, "-m", "clip_poison.victims._otrain_entry", "--n-clean", str(n_clean),
                "--order-seed", str(cfg.seed), "--"] + open_clip_train_argv(cfg, csv_path, work / "logs", len(paths))
        total = cfg.epochs * (len(paths) // cfg.batch_size) * cfg.batch_size
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        tail: list[str] = []
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            m = PROGRESS.search(line)
            if m and progress:
                epoch, done = int(m.group(1)), int(m.group(2))
                progress(min(total, epoch * (total // cfg.epochs) + done), total)
        rc = proc.wait()
        ckpt = work / "logs" / "run" / "checkpoints" / f"epoch_{cfg.epochs}.pt"
        if rc != 0 or not ckpt.is_file():
            raise RuntimeError(f"open_clip_train failed (exit {rc}, checkpoint {'found' if ckpt.is_file() else 'missing'}); "
                               "its last output:\n" + "".join(tail))
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        export_local_dir(model_cfg, state, tmp)
        ckpt.unlink()  # the exported copy is the checkpoint; no second 30 MB file per victim
        info = {"backend": "open_clip_train", "recipe": asdict(cfg),
                "augmentation": {"random_resized_crop_scale": list(cfg.crop_scale), "ratio": [1.0, 1.0],
                                 "note": "OpenCLIP train transform; (1.0, 1.0) means no crop"},
                "data": {"train_csv": str(train_csv), "train_csv_sha256": sha256_file(train_csv),
                         "n_clean": n_clean, "n_poisons": len(paths) - n_clean, "poison_sets": sources},
                "model_cfg": model_cfg, "seconds": round(time.time() - t0, 2), "versions": package_versions()}
        atomic_write_json(tmp / "train.json", info)
    return info
