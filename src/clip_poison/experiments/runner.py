"""One sweep run, start to finish: world (cached) → poison set(s) → victim → evaluation → result JSON.

Layout of a sweep folder::

    sweep.json             the resolved spec (name, figure, axes, seeds, report plots)
    worlds/<world id>/     embedded worlds, cached by their config (shared by runs and seeds)
    work/<run id>/         poison sets and the checkpoint of a run in progress (deleted afterwards
                           unless keep_checkpoints)
    results/<run id>.json  status ok|failed, resolved config, seed, versions, metrics

``execute_run`` is a plain function with no printing, so the local executor calls it in-process
and the Ray executor ships it to a worker unchanged.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import BackdoorConfig, TargetedConfig, TrainConfig, WorldConfig, stable_id
from ..io import UserError, atomic_write_json, package_versions, read_json, rng_for

Progress = Callable[[int, int], None]
RESULTS = "results"


def result_path(sweep_dir: str | Path, rid: str) -> Path:
    return Path(sweep_dir) / RESULTS / f"{rid}.json"


def finished(sweep_dir: str | Path, rid: str) -> bool:
    """A run is finished when its result exists with status ok (failed runs are retried)."""
    p = result_path(sweep_dir, rid)
    if not p.is_file():
        return False
    try:
        return read_json(p).get("status") == "ok"
    except UserError:
        return False  # a damaged result is recomputed


@contextlib.contextmanager
def _file_lock(path: Path):
    # Runs of one sweep (Ray tasks on one host, or hosts sharing a filesystem) may need the same
    # world at once; the lock makes exactly one of them render it.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_world(sweep_dir: str | Path, world_cfg: dict, real: bool = False) -> Path:
    """The world for ``world_cfg`` under ``worlds/<id>``, rendered once and reused: the synthetic
    world, or with ``real`` captioned real photos (``data/realworld.py``, source read in place)."""
    from ..data.realworld import RealWorldConfig, write_real_world
    from ..world import write_world

    root = Path(sweep_dir) / "worlds"
    wid = stable_id({"real_world": world_cfg}) if real else stable_id(world_cfg)
    out = root / wid
    with _file_lock(root / f".{wid}.lock"):
        if not (out / "world.json").is_file():
            if real:
                write_real_world(RealWorldConfig(**world_cfg), out, overwrite=True)
            else:
                write_world(WorldConfig(**world_cfg), out, overwrite=True)
    return out


def _targeted_configs(base: dict, n_targets: int, seed: int, classnames: list[str]) -> list[TargetedConfig]:
    """n_targets targeted attacks on one victim (§4.2: many (x', y') pairs per trained model).
    Target 0 uses the run's seed and label as given; the others draw labels of their own, all
    distinct (targets of one poison set may share neither a label nor an image)."""
    if n_targets > len(classnames):
        raise UserError(f"n_targets {n_targets} exceeds the {len(classnames)} classes; each target needs its own label")
    rng = rng_for(seed, "sweep/targets")
    others = [c for c in classnames if c != base.get("target_label", TargetedConfig.target_label)]
    labels = [str(x) for x in rng.permutation(others)[: n_targets - 1]]
    cfgs = [TargetedConfig(**base)]
    for k, lab in enumerate(labels, start=1):
        cfgs.append(TargetedConfig(**{**base, "target_label": lab, "seed": int(rng_for(seed, f"sweep/targets/{k}").integers(2**31))}))
    return cfgs


def _craft(attack: str, acfg: dict, n_targets: int, seed: int, train, evalset, image_size: int,
           out: Path) -> list[Path]:
    from ..attacks.backdoor import craft_backdoor_poisons
    from ..attacks.targeted import craft_multi_targeted_poisons

    if attack == "backdoor":
        craft_backdoor_poisons(BackdoorConfig(**acfg), train, image_size, out / "backdoor")
        return [out / "backdoor"]
    # One multi-target set: x'_k are drawn without replacement, so no two targets share an image.
    craft_multi_targeted_poisons(_targeted_configs(acfg, n_targets, seed, evalset.classnames), train, evalset,
                                 out / "targeted")
    return [out / "targeted"]


def _similarity(ckpt: Path, evalset, manifest: dict) -> dict:
    """Figure 3 data (§5.1): P(same zero-shot label) vs pair similarity, and the clean vs
    triggered (upper-left) pair-similarity histograms, on fixed bins so runs average."""
    from ..attacks.triggers import make_trigger
    from ..metrics.embed import embed_images
    from ..metrics.similarity import similarity_histograms, similarity_vs_same_prediction
    from ..metrics.zeroshot import zero_shot_predict, zero_shot_weights
    from ..victims.export import load_victim

    model, preprocess, tokenizer = load_victim(ckpt)
    clean = embed_images(model, preprocess, evalset.images)
    trig = manifest["trigger"]
    triggered = embed_images(model, preprocess, evalset.images, make_trigger(trig["name"], trig["patch_size"]),
                             [(0, 0)] * len(evalset))
    preds = zero_shot_predict(clean, zero_shot_weights(model, tokenizer, evalset.classnames, evalset.templates))
    return {"available": True, "trigger": trig,
            "same_prediction": similarity_vs_same_prediction(clean, preds, n_bins=20, value_range=(-1.0, 1.0)),
            "histograms": similarity_histograms(clean, triggered, bins=50, value_range=(-1.0, 1.0))}


def flat_metrics(attack: str, r: dict) -> dict:
    """The headline numbers of one evaluation as flat columns (the report's tidy table)."""
    out = {"zeroshot_accuracy": r["zeroshot"]["accuracy"]}
    if "probe" in r:
        out["probe_accuracy"] = r["probe"]["accuracy"]
    if attack == "backdoor" and r["backdoor"]:
        b = r["backdoor"][0]
        out.update({"backdoor_asr_consistent": b["consistent"]["asr"], "backdoor_asr_random": b["random"]["asr"],
                    "backdoor_z_consistent": b["consistent"]["z"]["z"], "backdoor_z_random": b["random"]["z"]["z"]})
        if "probe" in b["consistent"]:
            out.update({"probe_backdoor_asr_consistent": b["consistent"]["probe"]["asr"],
                        "probe_backdoor_asr_random": b["random"]["probe"]["asr"]})
    if attack == "targeted" and r["targeted"]:
        out["targeted_success_rate"] = float(np.mean([t["success"] for t in r["targeted"]]))
        if all("probe" in t for t in r["targeted"]):
            out["probe_targeted_success_rate"] = float(np.mean([t["probe"]["success"] for t in r["targeted"]]))
    return out


def execute_run(run: dict, sweep_dir: str | Path, keep_checkpoints: bool = False,
                progress: Progress | None = None, write: bool = True) -> dict:
    """Run one sweep point and write ``results/<id>.json`` atomically; never raises for a run that
    fails (the error is the result, status "failed"), so a sweep goes on past it."""
    from ..attacks.poisonset import read_manifest
    from ..data.csvdata import read_csv_dataset
    from ..data.evalsets import load_probe_train
    from ..data.realworld import load_world_evalset
    from ..metrics.evaluate import evaluate_checkpoint
    from ..victims.fast import train_victim
    from ..victims.models import image_size

    sweep_dir = Path(sweep_dir)
    cfg, rid = run["config"], run["id"]
    work = sweep_dir / "work" / rid
    t0 = time.time()
    result = {"id": rid, "clean": run["clean"], "point": run["point"], "config": cfg, "seed": cfg["seed"],
              "sweep": run.get("sweep", {}), "host": os.uname().nodename}
    try:
        if work.exists():
            shutil.rmtree(work)  # leftovers of a killed attempt
        real = "real_world" in cfg
        world = ensure_world(sweep_dir, cfg["real_world"] if real else cfg["world"], real=real)
        train = read_csv_dataset(world / "train.csv")
        ecfg = cfg.get("eval") or {}
        evalset = load_world_evalset(world, ecfg.get("max_n"))
        # §4.2: the probe is fit on labelled images the eval set does not contain: train-split photos
        # for real worlds (when probe_n asks for them), freshly rendered ones for synthetic worlds.
        probe_train = (None if real and not ecfg.get("probe_n")
                       else load_probe_train(world, "train", int(ecfg["probe_n"]) if ecfg.get("probe_n") else None))
        size = image_size(cfg["train"]["model"])
        n_targets = int(cfg.get("n_targets", 1))
        if run["clean"]:
            train_dirs, eval_dirs = [], []
            ev = cfg["eval_attacks"]
            for k, acfg in enumerate(ev["configs"]):
                eval_dirs += _craft(ev["attack"], acfg, n_targets, cfg["seed"], train, evalset, size,
                                    work / "poisons" / f"eval-{k}")
            attack = ev["attack"]
        else:
            attack = cfg["attack"]
            train_dirs = eval_dirs = _craft(attack, cfg[attack], n_targets, cfg["seed"], train, evalset, size,
                                            work / "poisons")
        tcfg = TrainConfig(**{**cfg["train"], "crop_scale": tuple(cfg["train"]["crop_scale"])})
        info = train_victim(world / "train.csv", train_dirs, tcfg, work / "victim", progress=progress)
        manifests = [read_manifest(d) for d in eval_dirs]
        ev_res = evaluate_checkpoint(work / "victim", evalset, manifests, seed=cfg["seed"], probe_train=probe_train)
        n_poisons = sum(m["n_poisons"] for m in manifests) if not run["clean"] else 0
        result.update({
            "status": "ok",
            "attack": attack,
            "n_train": len(train),
            "n_poisons": n_poisons,
            "poison_rate": n_poisons / len(train),
            "metrics": flat_metrics(attack, ev_res),
            # A clean victim is measured against every trigger the sweep uses (one entry each).
            "backdoor": [{"patch_size": b["trigger"]["patch_size"], "trigger": b["trigger"]["name"],
                          "label": b["label"], "asr_consistent": b["consistent"]["asr"],
                          "asr_random": b["random"]["asr"], "z_consistent": b["consistent"]["z"]["z"],
                          "z_random": b["random"]["z"]["z"],
                          **({"probe_asr_consistent": b["consistent"]["probe"]["asr"],
                              "probe_asr_random": b["random"]["probe"]["asr"]} if "probe" in b["consistent"] else {})}
                         for b in ev_res["backdoor"]],
            "targeted": ev_res["targeted"],
            "train": {k: v for k, v in info.items() if k not in ("model_cfg", "recipe", "versions", "data")},
            "eval_seconds": ev_res["seconds"],
        })
        if "similarity" in cfg.get("analyses", []) and attack == "backdoor":
            try:
                result["similarity"] = _similarity(work / "victim", evalset, manifests[0])
            except ImportError:
                result["similarity"] = {"available": False, "reason": "clip_poison.metrics.similarity not installed"}
        if keep_checkpoints:
            result["checkpoint"] = str(work / "victim")
    except Exception as e:  # a failed run is recorded and the sweep goes on
        result.update({"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=8)})
    finally:
        if not keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.time() - t0, 2)
    result["versions"] = package_versions()
    if write:
        atomic_write_json(result_path(sweep_dir, rid), result)
    return result
