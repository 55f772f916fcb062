"""The one run loop: a resolved run config → world → poison sets → victim → evaluation → one result.

A run config is a plain dict (what sweeps store and hash into run ids, ``experiments/spec.py``)::

    seed                    one seed for the whole run (``seeded`` applies it to every section)
    world | real_world      the world's config (``config.WorldConfig`` / ``config.RealWorldConfig``)
    train                   ``config.TrainConfig``
    attack                  "backdoor" | "targeted" | "none": the poisons the victim trains on
    backdoor | targeted     that attack's config; ``n_targets`` targets for a targeted victim
    craft                   optional ``config.CraftOptions`` of the victim's poisons (e.g. caption substitution)
    eval_attacks            attacks the victim is only measured against (one poison set each is
                            crafted for its manifest): {"attack", "configs"} or a list of them
    eval                    ``config.EvalConfig`` (eval subset size, probe size)
    analyses                ["similarity"]: Figure 3's data (§5.1)
    defense                 {"scan_data": config.ScanDataConfig, "scan_model": model-scan settings}:
                            the defense step after evaluation (``defend``)

``run`` is the loop; ``run_demo`` is three runs (clean, targeted-only, backdoor-only victims) on one
world, and a sweep (``experiments/runner.py``) is many. Every stage is one step here, the defenses
included (``defend``: scans of the training set and of the victim).
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from .config import BackdoorConfig, CraftOptions, DemoConfig, TargetedConfig, TrainConfig, stable_id, to_dict
from .io import UserError, atomic_dir, atomic_write_json, package_versions, rng_for

Stage = Callable[[str], None]
Progress = Callable[[int, int], None]
WORLD_SECTIONS = ("world", "real_world")
SEEDED_SECTIONS = ("world", "real_world", "backdoor", "targeted", "train")


def seeded(cfg: dict, seed: int) -> dict:
    """A copy of the run config with ``seed`` in every seeded section: one seed for the whole run
    (world, poisons, training, evaluation), each stage deriving its own streams from it."""
    out = copy.deepcopy(cfg)
    for sec in SEEDED_SECTIONS:
        if isinstance(out.get(sec), dict):
            out[sec]["seed"] = seed
    out["seed"] = seed
    return out


def write_world_for(cfg: dict, out: Path, overwrite: bool = False) -> dict:
    """Render the run's world (synthetic, or captioned real photos) under ``out``."""
    from .config import RealWorldConfig, WorldConfig
    from .data.realworld import write_real_world
    from .data.world import write_world

    if "real_world" in cfg:
        return write_real_world(RealWorldConfig(**cfg["real_world"]), out, overwrite=overwrite)
    return write_world(WorldConfig(**cfg["world"]), out, overwrite=overwrite)


def world_id(cfg: dict) -> str:
    """The id of a run's world (what sweeps cache worlds under)."""
    return stable_id({"real_world": cfg["real_world"]}) if "real_world" in cfg else stable_id(cfg["world"])


def targeted_configs(base: dict, n_targets: int, seed: int, classnames: list[str]) -> list[TargetedConfig]:
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


def craft(attack: str, acfg: dict, n_targets: int, seed: int, train, evalset, image_size: int, out: Path,
          options: dict | None = None) -> Path:
    """One poison set of ``attack`` under ``out/<attack>-<config id>``; a set already there (the
    same attack config on the same world) is reused, so the demo's victims share their sets."""
    from .attacks.backdoor import craft_backdoor_poisons
    from .attacks.targeted import craft_multi_targeted_poisons

    key = {'attack': attack, 'config': acfg, 'n_targets': n_targets, 'seed': seed, **({'craft': options} if options else {})}
    out = out / f"{attack}-{stable_id(key, 8)}"
    opt = CraftOptions(**(options or {}))
    if (out / "manifest.json").is_file():
        return out
    if attack == "backdoor":
        craft_backdoor_poisons(BackdoorConfig(**acfg), train, image_size, out, options=opt)
    else:  # one multi-target set: x'_k are drawn without replacement, so no two targets share an image
        craft_multi_targeted_poisons(targeted_configs(acfg, n_targets, seed, evalset.classnames), train, evalset, out,
                                     options=opt)
    return out


def headline(r: dict) -> dict:
    """The headline numbers of one evaluation as flat columns (the report's tidy table, the demo's
    summary): every attack the evaluation measured, its first backdoor set."""
    out = {"zeroshot_accuracy": r["zeroshot"]["accuracy"]}
    if "probe" in r:
        out["probe_accuracy"] = r["probe"]["accuracy"]
    if r["backdoor"]:
        b = r["backdoor"][0]
        out.update({"backdoor_asr_consistent": b["consistent"]["asr"], "backdoor_asr_random": b["random"]["asr"],
                    "backdoor_z_consistent": b["consistent"]["z"]["z"], "backdoor_z_random": b["random"]["z"]["z"]})
        if "probe" in b["consistent"]:
            out.update({"probe_backdoor_asr_consistent": b["consistent"]["probe"]["asr"],
                        "probe_backdoor_asr_random": b["random"]["probe"]["asr"]})
    if r["targeted"]:
        out["targeted_success_rate"] = float(np.mean([t["success"] for t in r["targeted"]]))
        if all("probe" in t for t in r["targeted"]):
            out["probe_targeted_success_rate"] = float(np.mean([t["probe"]["success"] for t in r["targeted"]]))
    return out


# What every result made before the precision followed the device trained in: its record is left out of
# results that trained so, which keep the keys they had (as config.late does for config fields).
CPU_FP32 = {"asked": "auto", "used": "fp32", "device": "cpu", "gpus": 1}


def train_record(info: dict) -> dict:
    """A result's ``train`` section: the victim's train.json less its setup records (recipe, model
    config, data, versions), and less its precision record when that is the CPU fp32 of old results."""
    return {k: v for k, v in info.items()
            if k not in ("model_cfg", "recipe", "versions", "data") and not (k == "precision" and v == CPU_FP32)}


def defend(cfg: dict, world: Path, victim: Path, train_dirs: list[Path], train_csv: Path | None = None) -> dict:
    """The defense step: the data scan of a poisoned victim's training set (a clean victim's has
    nothing to find) and the blind model scan of every victim, both on clean images the defender
    may assume (``load_clean_reference``: never trained on, never an x')."""
    from .data.worldfolder import load_clean_reference
    from .defenses.scan_data import scan_run

    d, ev = cfg["defense"], cfg.get("eval") or {}
    sd, sm = d.get("scan_data"), d.get("scan_model")
    # the model scan optimises on max_images and holds out as many for its z-score
    n_ref = max(sd["reference_n"] if sd else 0, 2 * sm["max_images"] if sm else 0)
    ref = load_clean_reference(world, ev.get("max_n"), n_ref).images if n_ref else None
    out = {}
    if sd and train_dirs:
        out["scan_data"] = scan_run(train_csv or world / "train.csv", train_dirs, victim,
                                    ref[:sd["reference_n"]] if ref else None, sd, cfg["seed"],
                                    bool(cfg["train"].get("record_pair_loss")), keep_scores=bool(d.get("filter")))
    if sm:
        from .defenses.model_scan import scan_model_run
        out["scan_model"] = scan_model_run(victim, ref[:2 * sm["max_images"]], sm, cfg["seed"])
    return out


def defense_headline(d: dict) -> dict:
    """Flat columns of the defense step for the report's table: ``scan/<detector>/<metric>`` and
    ``model_scan/pl1``, ``model_scan/z``."""
    out = {f"scan/{det}/{m}": v[m] for det, v in (d.get("scan_data") or {}).get("detectors", {}).items()
           for m in ("roc_auc", "pr_auc", "fpr_at_95tpr")}
    if "scan_model" in d:
        out.update({f"model_scan/{m}": d["scan_model"][m] for m in ("pl1", "z")})
    return out


def _eval_attacks(cfg: dict) -> list[tuple[str, dict]]:
    ev = cfg.get("eval_attacks") or []
    return [(e["attack"], a) for e in ([ev] if isinstance(ev, dict) else ev) for a in e["configs"]]


def write_pairs(out: Path, paths: list[str], captions: list[str], rows) -> Path:
    """Rows ``rows`` of a training set (absolute image paths) as an OpenCLIP CSV: the run's own
    subsets (fine-tune split, repair data, filtered X ∪ P)."""
    from .data.csvdata import write_csv_rows

    write_csv_rows(out, [paths[i] for i in rows], [captions[i] for i in rows])
    return out


def finetune_split(cfg: dict, world: Path, work: Path, progress: Progress | None = None,
                   say: Stage | None = None) -> tuple[Path, str | None]:
    """The fine-tuning threat model (``config.FinetuneConfig``): the world's training pairs in two
    seeded parts written as CSVs under ``work``, the clean pretrained model when the run starts from
    it. Returns the fine-tune CSV (the victim's X) and the checkpoint the victim starts from."""
    from .config import FinetuneConfig
    from .data.csvdata import read_csv_dataset
    from .victims.train import train_victim

    ft = FinetuneConfig(**cfg["finetune"])
    if not 0 < ft.pretrain_fraction < 1:
        raise UserError(f"finetune.pretrain_fraction must be between 0 and 1, got {ft.pretrain_fraction}")
    x = read_csv_dataset(world / "train.csv")
    order = rng_for(cfg["seed"], "finetune/split").permutation(len(x))
    n_pre = int(round(ft.pretrain_fraction * len(x)))
    parts = {"pretrain": np.sort(order[:n_pre]), "finetune": np.sort(order[n_pre:])}
    for name, rows in parts.items():
        write_pairs(work / f"{name}.csv", x.paths, x.captions, rows)
    init = None if ft.init == "scratch" else ft.init
    if ft.init == "pretrained":
        init = str(work / "pretrained")
        if not (work / "pretrained" / "train.json").is_file():
            tcfg = TrainConfig(**{**cfg["train"], "crop_scale": tuple(cfg["train"]["crop_scale"]), "init": None,
                                  "defense": "none", "record_pair_loss": False})
            (say or (lambda m: None))(f"victims: pretraining a clean model on {n_pre} of {len(x)} pairs")
            train_victim(work / "pretrain.csv", [], tcfg, work / "pretrained", progress=progress)
    return work / "finetune.csv", init


def repair_data(train_csv: Path, n: int, seed: int, out: Path) -> Path:
    """The clean pairs a repair fine-tunes on: a seeded subset of X (never P), as CleanCLIP's clean
    subset of the pre-training data."""
    from .data.csvdata import read_csv_dataset

    x = read_csv_dataset(train_csv)
    if not 1 <= n <= len(x):
        raise UserError(f"defense.repair.n_clean is {n}; it must be between 1 and |X| = {len(x)}")
    rows = np.sort(rng_for(seed, "mitigate/repair-data").choice(len(x), n, replace=False))
    write_pairs(out, x.paths, x.captions, rows)
    return out


def mitigate(cfg: dict, tcfg: TrainConfig, train_csv: Path, train_dirs: list[Path], victim: Path,
             scores: dict | None, measure: Callable[[Path], dict], work: Path, say: Stage) -> dict:
    """The mitigations of a poisoned victim, each measured like the victim itself (``measure``):
    CleanCLIP repairs at each learning rate (``defense.repair``) and filter-and-retrain
    (``defense.filter``: the data scan's top-ranked pairs removed, the victim's recipe from scratch).
    Robust training is a victim of its own (``train.defense``), not a step here."""
    from .config import RepairConfig
    from .defenses.repair import repair
    from .defenses.scan_data import top_fraction
    from .victims.openclip_train import training_rows
    from .victims.train import train_victim

    d, seed, out = cfg["defense"], cfg["seed"], {}
    work.mkdir(parents=True, exist_ok=True)
    if d.get("repair"):
        rc = dict(d["repair"])
        data = repair_data(train_csv, int(rc.pop("n_clean")), seed, work / "repair-clean.csv")
        out["repair"] = []
        for i, lr in enumerate(rc.pop("lrs")):
            say(f"defenses: CleanCLIP repair at lr {lr if lr is not None else 'default'}")
            t0 = time.time()
            info = repair(victim, data, RepairConfig(**rc, lr=lr, seed=seed), work / f"repair-{i}")
            out["repair"].append({"lr": info["objective"]["lr"], "lr_default": lr is None,
                                  "metrics": measure(work / f"repair-{i}"), "seconds": round(time.time() - t0, 2)})
    if d.get("filter"):
        paths, caps, n_clean, _ = training_rows(train_csv, train_dirs)
        tcfg = replace(tcfg, record_pair_loss=False)  # the victim's recipe, seed and start
        out["filter"] = []
        for det in d["filter"]["detectors"]:
            sc = scores[det]
            drop = top_fraction(sc, d["filter"]["fraction"])
            keep, n_drop = np.setdiff1d(np.arange(len(sc)), drop), len(drop)
            say(f"defenses: retraining without the {n_drop} pairs {det} ranks most suspicious")
            t0 = time.time()
            csv = work / f"filter-{det}.csv"
            write_pairs(csv, paths, caps, keep)
            train_victim(csv, [], tcfg, work / f"filter-{det}")
            out["filter"].append({"detector": det, "fraction": d["filter"]["fraction"], "n_removed": n_drop,
                                  "poisons_removed": int((drop >= n_clean).sum()), "n_poisons": len(sc) - n_clean,
                                  "metrics": measure(work / f"filter-{det}"), "seconds": round(time.time() - t0, 2)})
    return out


def run(cfg: dict, world: Path, victim: Path, poisons: Path, progress: Progress | None = None,
        stage: Stage | None = None) -> dict:
    """Run one resolved run config on the world folder ``world`` (rendered already: runs share
    worlds), writing its poison sets under ``poisons`` and the victim checkpoint to ``victim``.
    Returns the result: ``metrics`` (``headline``), per-attack ``backdoor``/``targeted`` entries,
    ``similarity`` when asked, ``train``, ``defense`` and ``mitigate`` when asked, and (for callers
    to keep or drop) the full ``evaluation`` and the ``manifests`` it was measured against."""
    from .io import read_manifest
    from .data.csvdata import read_csv_dataset
    from .data.worldfolder import load_probe_train, load_world_evalset
    from .metrics.evaluate import DEFAULT_METRICS, evaluate_checkpoint
    from .victims.models import image_size
    from .victims.train import train_victim

    say = stage or (lambda s: None)
    work = victim.parent / f"{victim.name}-work"  # the run's own files besides the victim (splits, repairs)
    train_csv, init = world / "train.csv", cfg["train"].get("init")
    if cfg.get("finetune"):
        work.mkdir(parents=True, exist_ok=True)
        train_csv, init = finetune_split(cfg, world, work, progress, say)
    train = read_csv_dataset(train_csv)
    ecfg = cfg.get("eval") or {}
    evalset = load_world_evalset(world, ecfg.get("max_n"))
    # §4.2: the probe is fit on labelled images the eval set does not contain: train-split photos
    # for real worlds (when probe_n asks for them), freshly rendered ones for synthetic worlds.
    probe_n = ecfg.get("probe_n", 0)
    probe_train = (None if probe_n is None or ("real_world" in cfg and not probe_n)
                   else load_probe_train(world, "train", int(probe_n) or None))
    size, n_targets, seed, attack = image_size(cfg["train"]["model"]), int(cfg.get("n_targets", 1)), cfg["seed"], cfg["attack"]
    say(f"attacks: crafting the poison sets of the {attack if attack != 'none' else 'clean'} victim")
    sets = ([(attack, cfg[attack])] if attack != "none" else []) + _eval_attacks(cfg)
    # craft options (the adaptive attacker's disguises) apply to the victim's own poisons only
    dirs = [craft(a, acfg, n_targets, seed, train, evalset, size, poisons, cfg.get("craft") if i == 0 and attack != "none" else None)
            for i, (a, acfg) in enumerate(sets)]
    train_dirs = dirs[:1] if attack != "none" else []
    tcfg = TrainConfig(**{**cfg["train"], "crop_scale": tuple(cfg["train"]["crop_scale"]), "init": init})
    objective = None
    if tcfg.defense != "none":
        from .defenses.robust import objective_for
        objective = objective_for(tcfg)
    say(f"victims: training the {attack if attack != 'none' else 'clean'} victim ({tcfg.backend}"
        + (f", {tcfg.defense}" if objective else "") + (", fine-tuned" if init else "") + "; "
        + (f"X ∪ the {attack} poisons)" if train_dirs else "X only)"))
    info = train_victim(train_csv, train_dirs, tcfg, victim, progress=progress, objective=objective)
    manifests = [read_manifest(d) for d in dirs]
    similarity = "similarity" in cfg.get("analyses", []) and attack == "backdoor"
    metrics = DEFAULT_METRICS + (("probe",) if probe_train is not None else ()) + (("fig3",) if similarity else ())
    say("metrics: evaluating the victim")
    ev = evaluate_checkpoint(victim, evalset, manifests, seed=seed, probe_train=probe_train, metrics=metrics)
    n_poisons = manifests[0]["n_poisons"] if train_dirs else 0
    ev_attack = cfg.get("eval_attacks", {}).get("attack", "none") if isinstance(cfg.get("eval_attacks"), dict) else "none"
    result = {
        # A clean control is filed under the attack it is the baseline for.
        "status": "ok", "attack": attack if attack != "none" else ev_attack, "n_train": len(train), "n_poisons": n_poisons,
        "poison_rate": n_poisons / len(train), "metrics": headline(ev),
        # A clean victim is measured against every trigger the sweep uses (one entry each).
        "backdoor": [{"patch_size": b["trigger"]["patch_size"], "trigger": b["trigger"]["name"],
                      "label": b["label"], "asr_consistent": b["consistent"]["asr"],
                      "asr_random": b["random"]["asr"], "z_consistent": b["consistent"]["z"]["z"],
                      "z_random": b["random"]["z"]["z"],
                      **({"probe_asr_consistent": b["consistent"]["probe"]["asr"],
                          "probe_asr_random": b["random"]["probe"]["asr"]} if "probe" in b["consistent"] else {})}
                     for b in ev["backdoor"]],
        "targeted": ev["targeted"],
        "train": train_record(info),
        "eval_seconds": ev["seconds"],
        "eval_device": ev["device"],
    }
    scores = None
    if cfg.get("defense"):
        say("defenses: scanning the training set and the victim")
        result["defense"] = defend(cfg, world, victim, train_dirs, train_csv)
        scores = (result["defense"].get("scan_data") or {}).pop("scores", None)
        result["metrics"].update(defense_headline(result["defense"]))
    if (cfg.get("defense") or {}).keys() & {"repair", "filter"} and train_dirs and objective is None:
        # one mitigation at a time: a robust-trained victim is not also repaired or filtered
        def measure(ckpt: Path) -> dict:
            return headline(evaluate_checkpoint(ckpt, evalset, manifests, seed=seed, probe_train=probe_train,
                                                metrics=metrics))
        result["mitigate"] = mitigate(cfg, tcfg, train_csv, train_dirs, victim, scores, measure, work, say)
    if similarity:  # Figure 3 (§5.1), from the evaluation's own cached embeddings
        b = ev["backdoor"][0]
        result["similarity"] = {"available": True, "trigger": b["trigger"],
                                "same_prediction": ev["fig3"]["similarity_vs_same_prediction"],
                                "histograms": b["fig3_histograms"]}
    return {**result, "evaluation": ev, "manifests": manifests}


# One victim per attack: a victim trained on two poison sets with the same y' measures neither
# attack (the old demo's "backdoor ASR 0.96" was both attacks together; the backdoor alone gave 0.37).
VICTIMS = ("clean", "targeted", "backdoor")


def demo_runs(cfg: DemoConfig, real_world=None, eval_max_n: int | None = None) -> dict[str, dict]:
    """The demo as run configs: a clean, a targeted-only and a backdoor-only victim of one seed,
    each measured against both attacks (the clean one is the baseline for both)."""
    d = seeded(to_dict(cfg), cfg.seed)
    base = {"world": d["world"]} if real_world is None else {"real_world": to_dict(real_world)}
    base.update(train=d["train"], eval={"max_n": eval_max_n, "probe_n": None})  # the demo fits no probe
    attacks = {"targeted": d["targeted"], "backdoor": d["backdoor"]}
    runs = {}
    for name in VICTIMS:
        other = [a for a in attacks if a != name]
        r = {**base, "attack": "none" if name == "clean" else name,
             "eval_attacks": [{"attack": a, "configs": [attacks[a]]} for a in other]}
        if name != "clean":
            r[name] = attacks[name]
        runs[name] = seeded(r, cfg.seed)
    return runs


def run_demo(cfg: DemoConfig, out: str | Path, overwrite: bool = False, stage: Stage | None = None,
             train_progress: Callable[[str, int, int], None] | None = None, real_world=None,
             eval_max_n: int | None = None) -> dict:
    """The paper's loop on the synthetic world, or with ``real_world`` on real photos
    (``data/realworld.py``: the source's train split captioned like alt-text; evaluation on its
    test split, first ``eval_max_n`` images when given): three runs, one ``summary.json``."""
    t0 = time.time()
    say = stage or (lambda s: None)
    runs = demo_runs(cfg, real_world, eval_max_n)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        say("world: rendering the synthetic image–caption world" if real_world is None
            else f"world: captioning real photos from {real_world.root} (train split)")
        write_world_for(runs["clean"], tmp / "world")
        results = {}
        for name, rcfg in runs.items():
            progress = (lambda d, t, n=name: train_progress(n, d, t)) if train_progress else None
            results[name] = run(rcfg, tmp / "world", tmp / "victims" / name, tmp / "poisons", progress, say)
            atomic_write_json(tmp / "eval" / f"{name}.json", results[name]["evaluation"])
        mt = next(m for m in results["targeted"]["manifests"] if m["attack"] == "targeted")
        mb = next(m for m in results["backdoor"]["manifests"] if m["attack"] == "backdoor")
        n_train = results["clean"]["n_train"]
        summary = {
            **{name: results[name]["metrics"] for name in VICTIMS},
            "attack": {
                "targeted": {"x_prime_eval_index": mt["target"]["eval_index"],
                             "x_prime_true_label": mt["target"]["true_label"],
                             "target_label": mt["target"]["label"], "n_poisons": mt["n_poisons"],
                             "poison_rate": mt["n_poisons"] / n_train, "victim": "targeted"},
                "backdoor": {"target_label": mb["target"]["label"], "n_poisons": mb["n_poisons"],
                             "poison_rate": mb["n_poisons"] / n_train, "trigger": mb["trigger"], "victim": "backdoor"},
            },
            "n_train_clean": n_train,
            "train_seconds": {k: v["train"]["seconds"] for k, v in results.items()},
            "augmentation": results["clean"]["train"]["augmentation"],
            "config": seeded(to_dict(cfg), cfg.seed),
            "world": {"kind": "synthetic"} if real_world is None else {"kind": "real", **runs["clean"]["real_world"]},
            "n_eval": results["clean"]["evaluation"]["eval_set"]["n"],
            "seed": cfg.seed,
            "versions": package_versions(),
        }
        summary["seconds"] = round(time.time() - t0, 1)
        atomic_write_json(tmp / "summary.json", summary)
    return summary
