"""The whole paper loop on the embedded world: world → poisons → three victims (clean, targeted
poisons only, backdoor poisons only) → evaluation → ``summary.json``. The CLI's ``demo`` command is a thin wrapper around ``run_demo``.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .attacks.backdoor import craft_backdoor_poisons
from .attacks.targeted import craft_targeted_poisons
from .config import DemoConfig
from .data.csvdata import read_csv_dataset
from .data.realworld import RealWorldConfig, load_world_evalset, write_real_world
from .io import atomic_dir, atomic_write_json, package_versions
from .metrics.evaluate import evaluate_checkpoint
from .victims.fast import train_victim
from .victims.models import image_size
from .world import write_world

Stage = Callable[[str], None]
TrainProgress = Callable[[str, int, int], None]


def flatten_result(r: dict) -> dict:
    """The headline numbers of one evaluation (its first targeted and first backdoor attack); NaN
    for an attack the evaluation did not measure."""
    bd = r["backdoor"][0] if r["backdoor"] else None
    return {
        "zeroshot_accuracy": r["zeroshot"]["accuracy"],
        "targeted_asr": float(r["targeted"][0]["success"]) if r["targeted"] else float("nan"),
        "targeted_predicted": r["targeted"][0]["predicted"] if r["targeted"] else None,
        "backdoor_asr": bd["consistent"]["asr"] if bd else float("nan"),
        "backdoor_asr_random_placement": bd["random"]["asr"] if bd else float("nan"),
        "backdoor_z": bd["consistent"]["z"]["z"] if bd else float("nan"),
        "backdoor_z_random_placement": bd["random"]["z"]["z"] if bd else float("nan"),
    }


# One victim per attack: a victim trained on two poison sets with the same y' measures neither
# attack (the old demo's "backdoor ASR 0.96" was both attacks together; the backdoor alone gave 0.37).
VICTIMS = ("clean", "targeted", "backdoor")


def run_demo(cfg: DemoConfig, out: str | Path, overwrite: bool = False, stage: Stage | None = None,
             train_progress: TrainProgress | None = None, real_world: RealWorldConfig | None = None,
             eval_max_n: int | None = None) -> dict:
    """The loop on the synthetic world, or with ``real_world`` on real photos (``data/realworld.py``:
    the source's train split captioned like alt-text; evaluation on its test split, first
    ``eval_max_n`` images when given)."""
    t0 = time.time()
    stage = stage or (lambda s: None)
    # One seed for the whole loop; each stage derives its own streams from it.
    cfg.world.seed = cfg.targeted.seed = cfg.backdoor.seed = cfg.train.seed = cfg.seed
    if real_world is not None:
        real_world.seed = cfg.seed
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if real_world is None:
            stage("world: rendering the synthetic image–caption world")
            write_world(cfg.world, tmp / "world")
        else:
            stage(f"world: captioning real photos from {real_world.root} (train split)")
            write_real_world(real_world, tmp / "world")
        train_csv = tmp / "world" / "train.csv"
        train = read_csv_dataset(train_csv)
        evalset = load_world_evalset(tmp / "world", eval_max_n)

        stage("attacks: crafting the targeted (§3.1) and backdoor (§3.3) poison sets")
        mt = craft_targeted_poisons(cfg.targeted, train, evalset, tmp / "poisons" / "targeted")
        mb = craft_backdoor_poisons(cfg.backdoor, train, image_size(cfg.train.model), tmp / "poisons" / "backdoor")
        # Each victim is measured against both manifests (the clean one is the baseline for both);
        # the headline of an attack is read from the victim trained on that attack's poisons alone.
        sets = {"clean": [], "targeted": [tmp / "poisons" / "targeted"], "backdoor": [tmp / "poisons" / "backdoor"]}
        results, train_info = {}, {}
        for name in VICTIMS:
            stage(f"victims: training the {name} victim ({cfg.train.backend}; "
                  + (f"X ∪ the {name} poisons only)" if sets[name] else "X only)"))
            progress = (lambda d, t, n=name: train_progress(n, d, t)) if train_progress else None
            train_info[name] = train_victim(train_csv, sets[name], cfg.train, tmp / "victims" / name, progress=progress)
            stage(f"metrics: evaluating the {name} victim")
            r = evaluate_checkpoint(tmp / "victims" / name, evalset, [mt, mb], seed=cfg.seed)
            atomic_write_json(tmp / "eval" / f"{name}.json", r)
            results[name] = r

        n_train = len(train)
        summary = {
            **{name: flatten_result(results[name]) for name in VICTIMS},
            "attack": {
                "targeted": {"x_prime_eval_index": mt["target"]["eval_index"],
                             "x_prime_true_label": mt["target"]["true_label"],
                             "target_label": mt["target"]["label"], "n_poisons": mt["n_poisons"],
                             "poison_rate": mt["n_poisons"] / n_train, "victim": "targeted"},
                "backdoor": {"target_label": mb["target"]["label"], "n_poisons": mb["n_poisons"],
                             "poison_rate": mb["n_poisons"] / n_train, "trigger": mb["trigger"], "victim": "backdoor"},
            },
            "n_train_clean": n_train,
            "train_seconds": {k: v["seconds"] for k, v in train_info.items()},
            "augmentation": train_info["clean"]["augmentation"],
            "config": asdict(cfg),
            "world": {"kind": "synthetic"} if real_world is None else {"kind": "real", **asdict(real_world)},
            "n_eval": len(evalset),
            "seed": cfg.seed,
            "versions": package_versions(),
        }
        summary["seconds"] = round(time.time() - t0, 1)
        atomic_write_json(tmp / "summary.json", summary)
    return summary
