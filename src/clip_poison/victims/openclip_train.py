"""Train a victim with OpenCLIP's own trainer (``open_clip_train``), the reference backend.

Runs ``python -m open_clip_train.main`` (through ``_otrain_entry``) in a subprocess on X ∪ P, or
under torchrun with one process per GPU when ``TrainConfig.gpus`` > 1 (open_clip_train is DDP-native),
reads its log lines for progress, refuses to call a run "trained" unless a checkpoint was written, and
exports the result as an open_clip ``local-dir:`` folder.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..config import CAPTION_KEY, IMG_KEY, TrainConfig
from ..data.csvdata import read_csv_dataset, write_csv_rows
from ..io import UserError, check_stamped_size, read_manifest, atomic_dir, atomic_write_json, package_versions, sha256_file
from .device import check_gpus, resolve_precision, train_device
from .export import export_local_dir, init_weights
from .models import image_size, model_config

PROGRESS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")
LOSS = re.compile(r" Loss: ([0-9.]+) \(")  # the step's total loss ("Contrastive_loss:" is its one term)

Progress = Callable[[int, int], None]  # (samples done, samples total)


def openclip_crop_ratio(size: int, scale) -> tuple[float, float]:
    """The aspect-ratio range of the RandomResizedCrop open_clip really trains with. open_clip_train
    takes ``--aug-cfg ratio=...`` but ``image_transform`` never passes it on (it only warns about
    unused items), so the crop keeps torchvision's default (3/4, 4/3): read it off the transform."""
    from open_clip.transform import image_transform

    return tuple(float(r) for r in image_transform(size, is_train=True, aug_cfg={"scale": tuple(scale)}).transforms[0].ratio)


def recorded_path(path: str | Path, out: str | Path) -> str:
    """An input's path as ``train.json`` records it: absolute and resolved, except where the input
    and the checkpoint ``out`` are built inside the same temporary ``.partial`` folder (a demo
    builds world, poisons and victims in one and renames it at the end): then relative to ``out``,
    the one form that still names the input after the rename."""
    p, o = Path(path).resolve(), Path(out).resolve()
    tmp = next((a for a in o.parents if a.name.endswith(".partial")), None)
    return os.path.relpath(p, o) if tmp is not None and tmp in p.parents else str(p)


PATHS_NOTE = "paths are absolute, or relative to this train.json's folder (inputs built beside it, as in a demo)"


def training_rows(train_csv: str | Path, poison_dirs: list[str | Path],
                  image_size: int | None = None) -> tuple[list[str], list[str], int, list[dict]]:
    """Clean rows first, then every poison set's rows, all with absolute paths. A poison set made
    with ``--mode replace`` lists the clean rows it replaces (``replaces``); those are left out
    here, so |X'| = |X|. A backdoor set stamped for another ``image_size`` than the model's is
    refused. The clean CSV and the poison folders are only read."""
    from ..data.wds import is_wds_spec

    if is_wds_spec(train_csv):
        raise UserError(f"{train_csv} is webdataset shards; the fast backend reads OpenCLIP CSV only, so train with "
                        "--backend open_clip_train (it streams 'clean::poison' shards)")
    clean = read_csv_dataset(train_csv)
    manifests = [read_manifest(d) for d in poison_dirs]
    drop: set[int] = set()
    for d, manifest in zip(poison_dirs, manifests):
        if image_size is not None:
            check_stamped_size(manifest, image_size, d)
        if manifest.get("format", "csv") != "csv":
            raise UserError(f"poison set {d} is webdataset shards; train on it with the open_clip_train backend "
                            "and webdataset clean data (--data 'clean/{0..9}.tar'), or re-craft it with --format csv")
        if manifest.get("replaces"):
            src_hash = manifest.get("source", {}).get("csv_sha256")
            if src_hash and src_hash != sha256_file(train_csv):
                raise UserError(f"poison set {d} replaces rows of a different dataset than {train_csv} (hash differs); "
                                "its `replaces` row numbers would drop the wrong pairs; train on the CSV it was made from")
            drop.update(int(i) for i in manifest["replaces"])
    keep = [i for i in range(len(clean)) if i not in drop]
    paths, caps, sources = [clean.paths[i] for i in keep], [clean.captions[i] for i in keep], []
    for d, manifest in zip(poison_dirs, manifests):
        p = read_csv_dataset(Path(d) / manifest["csv"], own_files_only=True)
        paths += p.paths
        caps += p.captions
        sources.append({"dir": str(d), "attack": manifest["attack"], "n_poisons": len(p),
                        "mode": manifest.get("mode", "add"), "n_replaced": len(manifest.get("replaces", [])),
                        "manifest_sha256": sha256_file(Path(d) / "manifest.json")})
    return paths, caps, len(keep), sources


def webdataset_inputs(shards: str, poison_dirs: list[str | Path],
                      image_size: int | None = None) -> tuple[str, int, int, list[dict]]:
    """``--train-data`` for webdataset input: the clean shards, then every poison set's shards,
    joined with ``::`` (open_clip_train mixes sources that way); plus the clean and total counts
    (one streaming pass over the clean ``.txt`` members; open_clip_train needs the total)."""
    from ..data.sources import WdsTrainingData

    n_clean = len(WdsTrainingData(shards))
    parts, n_total, sources = [str(shards)], n_clean, []
    for d in poison_dirs:
        m = read_manifest(d)
        if image_size is not None:
            check_stamped_size(m, image_size, d)
        if m.get("format", "csv") != "wds":
            raise UserError(f"poison set {d} is CSV but the clean data is webdataset shards; re-craft it with --format wds")
        if m.get("replaces"):
            raise UserError(f"poison set {d} was made with --mode replace; open_clip_train's webdataset loader cannot "
                            "drop clean samples without rewriting shards, so train it on CSV data or re-craft with --mode add")
        parts += [str(Path(d) / name) for name in m["shards"]]
        n_total += int(m["n_poisons"])
        sources.append({"dir": str(d), "attack": m["attack"], "n_poisons": int(m["n_poisons"]), "mode": "add",
                        "manifest_sha256": sha256_file(Path(d) / "manifest.json")})
    return "::".join(parts), n_clean, n_total, sources


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux): the kernel sends the trainer SIGTERM when the thread that started it
    dies, even by SIGKILL, so a killed clip-poison leaves no trainer running. libc is looked up here,
    in the parent: the child between fork and exec must not import (another thread may hold the lock)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def tie() -> None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return tie


def run_trainer(argv: list[str], env: dict | None, on_line: Callable[[str], None]) -> int:
    """Run the trainer, feeding its output lines to ``on_line``; its life is tied to ours: it is
    killed when this process dies (Linux) and on any exception or Ctrl-C here."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=_die_with_parent())
    try:
        for line in proc.stdout:
            on_line(line)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def open_clip_train_argv(cfg: TrainConfig, csv_path: Path | None, logs: Path, n_samples: int,
                         wds_data: str | None = None, device: str | None = None) -> list[str]:
    """open_clip_train's arguments for the recipe; ``device`` (default: this machine's) picks the
    precision. With N GPUs each rank takes batch_size / N of every batch, and ``--local-loss
    --gather-with-grad`` (what OpenCLIP's maintainers use and checked equal to the global loss)
    makes the loss and its gradient those of one contrastive batch of batch_size: the same recipe."""
    lo, hi = cfg.crop_scale
    ddp = ["--local-loss", "--gather-with-grad"] if cfg.gpus > 1 else []
    data = (["--train-data", wds_data, "--dataset-type", "webdataset"] if wds_data else
            ["--train-data", str(csv_path), "--dataset-type", "csv", "--csv-separator", ",",
             "--csv-img-key", IMG_KEY, "--csv-caption-key", CAPTION_KEY])
    return data + [
        "--train-num-samples", str(n_samples),
        "--model", cfg.model, "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size // cfg.gpus),
        "--lr", str(cfg.lr), "--wd", str(cfg.wd), "--warmup", str(cfg.warmup),
        "--precision", resolve_precision(cfg.precision, device or train_device()),
        "--workers", str(cfg.workers), "--seed", str(cfg.seed),
        "--logs", str(logs), "--name", "run", "--save-frequency", "0", "--report-to", "",
        # no ratio=: open_clip ignores it (openclip_crop_ratio), so passing one would only mislead
        "--log-every-n-steps", "1", "--aug-cfg", f"scale=({lo},{hi})",
    ] + ddp + (["--pretrained", str(init_file(cfg.init))] if cfg.init else [])


def trainer_argv(cfg: TrainConfig, n_clean: int, oc_args: list[str]) -> list[str]:
    """The trainer's command line around open_clip_train's arguments: this interpreter running
    ``_otrain_entry`` for one device; for ``cfg.gpus`` > 1, torchrun (``torch.distributed.run``, the
    module behind the ``torchrun`` command, under this interpreter) starting one such process per
    GPU on this machine (``--standalone``: a free local port, so runs side by side do not collide)."""
    launcher = [sys.executable]
    if cfg.gpus > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.gpus)]
    return launcher + ["-m", "clip_poison.victims._otrain_entry", "--n-clean", str(n_clean),
                       "--order-seed", str(cfg.seed), "--"] + oc_args


def init_file(init: str | Path) -> Path:
    """The weights file open_clip_train's ``--pretrained`` loads for ``--init`` (a file path, the
    form open_clip accepts besides a pretrained tag)."""
    from .export import WEIGHTS

    p = Path(init).resolve()
    return p / WEIGHTS if p.is_dir() else p


def train_open_clip_train(train_csv: str | Path, poison_dirs: list[str | Path], cfg: TrainConfig,
                          out: str | Path, overwrite: bool = False, progress: Progress | None = None) -> dict:
    """Train on X ∪ P and write a local-dir checkpoint plus ``train.json`` to ``out``."""
    if cfg.record_pair_loss:
        raise UserError("--record-pair-loss needs --backend fast: open_clip_train computes each step's loss inside "
                        "its own train_one_epoch, which cannot be hooked to keep every pair's loss without forking "
                        "the trainer; train with --backend fast")
    model_cfg = model_config(cfg.model)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError("--epochs and --batch-size must be >= 1")
    check_gpus(cfg)
    device = train_device()
    precision = resolve_precision(cfg.precision, device)
    t0 = time.time()
    # checked here (same message as the fast backend), not deep inside the subprocess's log
    init_info = init_weights(cfg.init, model_cfg, cfg.model)[1] if cfg.init else None
    from ..data.wds import expand_shards, is_wds_spec

    wds_data = None
    if is_wds_spec(train_csv):
        # Webdataset input: clean and poison shards are streamed by open_clip_train itself (`::`).
        wds_data, n_clean, n_total, sources = webdataset_inputs(str(train_csv), poison_dirs, image_size(cfg.model))
        n_shards = sum(len(expand_shards(part)) for part in wds_data.split("::"))
        if cfg.workers * cfg.gpus > n_shards:  # open_clip_train asserts shards >= workers x GPUs
            raise UserError(f"--workers {cfg.workers} x --gpus {cfg.gpus} exceeds the {n_shards} shards; lower --workers")
    else:
        paths, caps, n_clean, sources = training_rows(train_csv, poison_dirs, image_size(cfg.model))
        n_total = len(paths)
    sources = [{**s, "dir": recorded_path(s["dir"], out)} for s in sources]
    if n_total < cfg.batch_size:
        raise UserError(f"{n_total} training pairs are fewer than one batch of {cfg.batch_size}; "
                        "lower --batch-size")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        work = tmp / "open_clip_train"
        csv_path = None
        if wds_data is None:
            csv_path = work / "train_x_union_p.csv"
            write_csv_rows(csv_path, paths, caps)
        argv = trainer_argv(cfg, n_clean, open_clip_train_argv(cfg, csv_path, work / "logs", n_total, wds_data, device))
        total = cfg.epochs * (n_total // cfg.batch_size) * cfg.batch_size
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if cfg.gpus == 1:  # the trainer computes with this process's threads (torchrun gives each rank 1 unless set)
            env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        tail: list[str] = []
        losses: list[float] = []

        def on_line(line: str) -> None:
            tail.append(line)
            del tail[:-40]
            m = PROGRESS.search(line)
            if m and progress:
                epoch, done = int(m.group(1)), int(m.group(2))
                progress(min(total, epoch * (total // cfg.epochs) + done), total)
            if m and (loss := LOSS.search(line)):
                losses.append(float(loss.group(1)))
        rc = run_trainer(argv, env, on_line)
        ckpt = work / "logs" / "run" / "checkpoints" / f"epoch_{cfg.epochs}.pt"
        if rc != 0 or not ckpt.is_file():
            raise RuntimeError(f"open_clip_train failed (exit {rc}, checkpoint {'found' if ckpt.is_file() else 'missing'}); "
                               "its last output:\n" + "".join(tail))
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        export_local_dir(model_cfg, state, tmp)
        ckpt.unlink()  # the exported copy is the checkpoint; no second 30 MB file per victim
        info = {"backend": "open_clip_train", "recipe": asdict(cfg),
                "augmentation": {"random_resized_crop_scale": list(cfg.crop_scale),
                                 "ratio": list(openclip_crop_ratio(image_size(cfg.model), cfg.crop_scale)),
                                 "note": "OpenCLIP train transform; scale (1.0, 1.0) means no crop"},
                "data": {"train_csv": str(train_csv) if wds_data else recorded_path(train_csv, out), "paths": PATHS_NOTE,
                         "train_csv_sha256": None if wds_data else sha256_file(train_csv),
                         "train_data": wds_data or str(csv_path.name), "format": "wds" if wds_data else "csv",
                         "n_clean": n_clean, "n_poisons": n_total - n_clean, "poison_sets": sources},
                **({"init": init_info} if init_info else {}),
                "precision": {"asked": cfg.precision, "used": precision, "device": device, "gpus": cfg.gpus},
                "threads": int(env.get("OMP_NUM_THREADS", 1)),  # per process; CPU results depend on it
                # as open_clip_train logs it (5 significant digits), one per step
                "model_cfg": model_cfg, "loss_per_step": losses,
                "seconds": round(time.time() - t0, 2), "versions": package_versions()}
        atomic_write_json(tmp / "train.json", info)
    return info
