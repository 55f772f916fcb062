"""Sweep specs: a base run config + axes whose product, times seeds, gives the runs (§4–§5 ablations).

A spec is a YAML file (CLIP_benchmark style: declarative, one file per experiment)::

    name: fig4-placement
    figure: "Figure 4"                 # which figure of the paper this mirrors
    attack: backdoor                   # backdoor | targeted
    base:                              # dataclass fields of config.py, by section
      world: {n_train: 5000}
      backdoor: {patch_size: 4}
      train: {epochs: 4}
    axes:                              # dotted field -> list of values; the runs are the product
      backdoor.n_poisons: [25, 50, 100]
      backdoor.placement: [consistent, random]
    seeds: [0, 1]
    clean_control: true                # an unpoisoned victim per (non-attack axes, seed)
    keep_checkpoints: false
    resources: {num_cpus: 2, num_gpus: 0}   # per run (Ray executor)
    sizes:                             # named overrides: base is deep-merged, axes/seeds replaced
      quick: {...}
      paper: {...}
    report: {plots: [...]}             # see report.py

One seed drives the whole run (world, poisons, training, evaluation), as in ``run.run_demo`` (``run.seeded``);
clean control runs use the same seeds, so poisoned and clean victims of a seed see the same world,
the same clean data order (``CleanOrderSampler``) and the same initialisation.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import (BackdoorConfig, CraftOptions, EvalConfig, FinetuneConfig, RealWorldConfig, TargetedConfig,
                      TrainConfig, WorldConfig, stable_id, to_dict)
from ..io import UserError
from ..run import SEEDED_SECTIONS, seeded

PRESET_DIR = Path(__file__).parent / "presets"
# ``real_world`` replaces ``world`` when a spec trains on captioned real photos (data/realworld.py);
# ``eval`` is optional (the defaults evaluate the whole eval split; synthetic worlds fit the probe on
# 2,000 freshly rendered images, real worlds fit one only when ``probe_n`` asks for train-split photos).
SECTIONS = {"world": WorldConfig, "real_world": RealWorldConfig, "backdoor": BackdoorConfig,
            "targeted": TargetedConfig, "train": TrainConfig, "eval": EvalConfig, "craft": CraftOptions,
            "finetune": FinetuneConfig}
ATTACKS = ("backdoor", "targeted")
# Sections that change only the poisons: a clean control drops their axes (``craft``: how P is
# written and disguised, e.g. the adaptive attacker's caption substitution).
POISON_SECTIONS = ATTACKS + ("craft",)
# Fields a run's seed sets (one seed per run); a spec may not put them in base or axes.
SEEDED = {f"{sec}.seed" for sec in SEEDED_SECTIONS}
TOP_KEYS = {"name", "figure", "description", "attack", "base", "axes", "seeds", "clean_control",
            "keep_checkpoints", "resources", "sizes", "report", "n_targets", "analyses", "defense"}
ANALYSES = ("similarity",)


@dataclass
class SweepSpec:
    name: str
    attack: str
    base: dict
    axes: dict[str, list]
    seeds: list[int]
    figure: str = ""
    description: str = ""
    clean_control: bool = True
    keep_checkpoints: bool = False
    # §4.2 trains one model against many targets at once; n_targets targeted poison sets per run.
    n_targets: int = 1
    # Extra per-run analyses: "similarity" stores Figure 3's pair-similarity data (§5.1).
    analyses: list[str] = field(default_factory=list)
    # The defense step of every run (run.defend): {"scan_data": {...}, "scan_model": {...}}, resolved.
    defense: dict = field(default_factory=dict)
    resources: dict = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})
    report: dict = field(default_factory=dict)
    size: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _check_field(dotted: str, where: str) -> None:
    sec, _, name = dotted.partition(".")
    if sec not in SECTIONS or not name:
        raise UserError(f"{where}: {dotted!r} is not a config field; use SECTION.FIELD with SECTION one of "
                        f"{sorted(SECTIONS)} (e.g. backdoor.n_poisons)")
    names = {f.name for f in dataclasses.fields(SECTIONS[sec])}
    if name not in names:
        raise UserError(f"{where}: {sec} has no field {name!r}; its fields are {sorted(names)}")
    if dotted in SEEDED:
        raise UserError(f"{where}: {dotted} is set from the run's seed; list seeds under `seeds:` instead")


# The YAML types each annotation of the config dataclasses accepts (a bool is refused where a
# number is meant, although Python counts it as an int).
_YAML_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
               "tuple[float, float]": (list,)}


def _check_value(dotted: str, value: Any, where: str) -> None:
    sec, _, name = dotted.partition(".")
    ann = str(next(f.type for f in dataclasses.fields(SECTIONS[sec]) if f.name == name))
    ok = tuple(t for part in ann.split(" | ") for t in _YAML_TYPES.get(part, (object,)))
    pair = not isinstance(value, list) or (len(value) == 2 and all(type(v) in (int, float) for v in value))
    if (isinstance(value, bool) and bool not in ok) or not isinstance(value, ok) or not pair:
        raise UserError(f"{where}: {dotted} must be of type {ann}, got {value!r}; fix its value in the spec")


def _mapping(d: dict, key: str, where: str) -> dict:
    v = d.get(key) or {}
    if not isinstance(v, dict):
        raise UserError(f"{where}: {key} must be a mapping (one `name: value` per line, e.g. "
                        f"`axes: {{backdoor.n_poisons: [25, 50]}}`), got {v!r}")
    return v


def load_spec(path_or_preset: str | Path, size: str | None = None) -> SweepSpec:
    """Read a spec YAML (a path, or the name of a preset in ``experiments/presets``), apply a size,
    and validate every field name against the config dataclasses."""
    p = Path(path_or_preset)
    if not p.is_file():
        cand = PRESET_DIR / f"{path_or_preset}.yaml"
        if not cand.is_file():
            raise UserError(f"sweep spec {str(path_or_preset)!r} is neither a file nor a preset; "
                            f"presets: {preset_names()}")
        p = cand
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"sweep spec {p} is not valid YAML ({e})") from None
    return spec_from_dict(raw, size=size, where=str(p))


def spec_from_dict(raw: Any, size: str | None = None, where: str = "sweep spec") -> SweepSpec:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping at the top level")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise UserError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    raw = copy.deepcopy(raw)
    sizes = _mapping(raw, "sizes", where)
    raw.pop("sizes", None)
    if size is not None:
        if size not in sizes:
            raise UserError(f"{where}: no size {size!r}; this spec has {sorted(sizes) or 'none'}")
        over = _mapping(sizes, size, f"{where} sizes")
        bad = set(over) - TOP_KEYS
        if bad:
            raise UserError(f"{where}: size {size!r} has unknown keys {sorted(bad)}")
        raw["base"] = _deep_merge(_mapping(raw, "base", where), _mapping(over, "base", where))
        raw["axes"] = {**_mapping(raw, "axes", where), **_mapping(over, "axes", where)}
        raw.update({k: v for k, v in over.items() if k not in ("base", "axes")})
    for k in ("name", "attack"):
        if k not in raw:
            raise UserError(f"{where}: missing required key {k!r}")
    if raw["attack"] not in ATTACKS + ("none",):
        raise UserError(f"{where}: attack {raw['attack']!r} unknown; use one of {ATTACKS}, or none for a "
                        "sweep of clean victims only")
    base = _mapping(raw, "base", where)
    if "real_world" in base and "world" in base:
        raise UserError(f"{where}: base sets both world (synthetic) and real_world (photos); keep one")
    if "real_world" in base and not (base["real_world"] or {}).get("root"):
        raise UserError(f"{where}: base.real_world needs root: the labelled photo source "
                        "(e.g. ../shared/data/cifar10-wds)")
    for sec, vals in base.items():
        if sec not in SECTIONS or not isinstance(vals, dict):
            raise UserError(f"{where}: base.{sec} is not a config section; use {sorted(SECTIONS)}")
        for name in vals:
            _check_field(f"{sec}.{name}", f"{where} base")
            _check_value(f"{sec}.{name}", vals[name], f"{where} base")
    axes = _mapping(raw, "axes", where)
    for k, v in axes.items():
        _check_field(k, f"{where} axes")
        if not isinstance(v, list) or not v:
            raise UserError(f"{where}: axis {k} must be a non-empty list, got {v!r}")
        for x in v:
            _check_value(k, x, f"{where} axes")
        if k.split(".")[0] in ATTACKS and k.split(".")[0] != raw["attack"]:
            raise UserError(f"{where}: axis {k} belongs to the {k.split('.')[0]} attack but this sweep's "
                            f"attack is {raw['attack']}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds {seeds} repeat a value")
    n_targets = raw.get("n_targets", 1)
    if type(n_targets) is not int or n_targets < 1:
        raise UserError(f"{where}: n_targets must be a whole number >= 1, got {n_targets!r}")
    analyses = list(raw.get("analyses") or [])
    if set(analyses) - set(ANALYSES):
        raise UserError(f"{where}: unknown analyses {sorted(set(analyses) - set(ANALYSES))}; available {ANALYSES}")
    resources = _mapping(raw, "resources", where)
    for k, v in resources.items():  # a misspelt key would silently run every task on one CPU
        if k not in ("num_cpus", "num_gpus") or isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise UserError(f"{where}: resources.{k}: {v!r} is not a per-run request; use "
                            "`resources: {num_cpus: N, num_gpus: M}` with numbers >= 0")
    defense = resolve_defense(_mapping(raw, "defense", where), where)
    return SweepSpec(name=str(raw["name"]), analyses=analyses, defense=defense, attack=raw["attack"], base=base, axes=axes, seeds=seeds,
                     figure=str(raw.get("figure", "")), description=str(raw.get("description", "")).strip(),
                     clean_control=bool(raw.get("clean_control", True)),
                     keep_checkpoints=bool(raw.get("keep_checkpoints", False)), n_targets=n_targets,
                     resources={"num_cpus": 1, "num_gpus": 0, **resources},
                     report=_mapping(raw, "report", where), size=size)


def resolve_defense(d: dict, where: str) -> dict:
    """``defense:`` with every field of its scans filled in (``ScanDataConfig``, ``ModelScanConfig``),
    so a run's config (and id) says exactly what was scanned and how. The model scan's seed is the
    run's (one seed per run), so a spec may not set it."""
    from ..config import FilterConfig, ModelScanConfig, RepairRunConfig, ScanDataConfig
    from ..defenses.detectors import DETECTORS
    from ..defenses.scan_data import DENSITY

    kinds = {"scan_data": ScanDataConfig, "scan_model": ModelScanConfig, "filter": FilterConfig}
    out = {}
    for name, vals in d.items():
        if name not in (*kinds, "repair") or not isinstance(vals, dict):
            raise UserError(f"{where}: defense.{name} is not a defense; use {sorted((*kinds, 'repair'))}, each a "
                            "mapping of its settings")
        if "seed" in vals:
            raise UserError(f"{where}: defense.{name}.seed is set from the run's seed; list seeds under `seeds:` instead")
        if name == "repair":  # RepairRunConfig (what and at which lrs) + RepairConfig's recipe (less lr, seed)
            from ..config import RepairConfig
            if "lr" in vals:
                raise UserError(f"{where}: defense.repair takes `lrs:` (a list; null = the default), not lr")
            own = {f.name for f in dataclasses.fields(RepairRunConfig)}
            try:
                out[name] = {**to_dict(RepairRunConfig(**{k: v for k, v in vals.items() if k in own})),
                             **{k: v for k, v in to_dict(RepairConfig(**{k: v for k, v in vals.items() if k not in own})).items()
                                if k not in ("lr", "seed")}}
            except TypeError as e:
                raise UserError(f"{where}: bad defense.repair ({e}); its fields are "
                                f"{sorted(own | {f.name for f in dataclasses.fields(RepairConfig)} - {'lr', 'seed'})}") from None
            continue
        try:
            out[name] = {k: v for k, v in to_dict(kinds[name](**vals)).items() if k != "seed"}
        except TypeError as e:
            raise UserError(f"{where}: bad defense.{name} ({e}); its fields are "
                            f"{sorted(f.name for f in dataclasses.fields(kinds[name]))}") from None
    scanned = (out.get("scan_data") or {}).get("detectors", [])
    bad = [x for x in scanned if x not in DETECTORS]
    if bad:
        raise UserError(f"{where}: unknown detectors {bad} in defense.scan_data; available: {sorted(DETECTORS)}")
    if "filter" in out:
        cols = scanned + [f"{x}+ref" for x in scanned if x in DENSITY]
        missing = [x for x in out["filter"]["detectors"] if x not in cols]
        if missing:
            raise UserError(f"{where}: defense.filter ranks pairs by the data scan's columns; {missing} "
                            f"{'is' if len(missing) == 1 else 'are'} not among them ({cols or 'no defense.scan_data'}); "
                            "add the detector to defense.scan_data.detectors")
        if not 0 < out["filter"]["fraction"] < 1:
            raise UserError(f"{where}: defense.filter.fraction must be between 0 and 1")
    return out


def _resolve(spec: SweepSpec, point: dict[str, Any], seed: int, attack: str) -> dict:
    """The full config of one run: every dataclass field, defaults filled in, seeds applied."""
    cfg: dict[str, Any] = {}
    world = "real_world" if "real_world" in spec.base else "world"
    sections = [world, attack, "train"] if attack != "none" else [world, "train"]
    # eval only when the spec sets it, so the ids of specs without it stay what they were.
    for opt in ("eval", "craft", "finetune"):
        if opt in spec.base or any(k.startswith(f"{opt}.") for k in spec.axes):
            sections += [opt] if opt != "craft" or attack != "none" else []
    for sec in sections:
        vals = dict(spec.base.get(sec, {}))
        vals.update({k.split(".", 1)[1]: v for k, v in point.items() if k.split(".")[0] == sec})
        try:
            obj = SECTIONS[sec](**vals)
        except TypeError as e:
            raise UserError(f"sweep {spec.name}: bad {sec} config ({e})") from None
        d = to_dict(obj)
        if "crop_scale" in d:
            d["crop_scale"] = list(d["crop_scale"])
        cfg[sec] = d
    cfg["attack"] = attack
    cfg = seeded(cfg, seed)
    if spec.analyses:
        cfg["analyses"] = list(spec.analyses)
    if spec.defense:
        cfg["defense"] = copy.deepcopy(spec.defense)
    if attack == "targeted":
        cfg["n_targets"] = spec.n_targets
    return cfg


def run_id(config: dict) -> str:
    """Stable id of a run: a hash of its resolved config only (never of order or sweep name)."""
    return stable_id(config)


def expand(spec: SweepSpec) -> list[dict]:
    """All runs of a sweep: product(axes) × seeds, plus clean controls sharing the seeds.

    A clean control drops the attack's axes (they do not change an unpoisoned victim) but keeps
    every other axis (data size, model), and is evaluated against each distinct trigger/target the
    sweep's poisoned runs use, so every poisoned point has a clean baseline on the same inputs.
    Returns dicts ``{"id", "config", "point", "clean"}`` in a stable order.
    """
    keys = list(spec.axes)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*(spec.axes[k] for k in keys))]
    runs, seen = [], set()

    def add(cfg: dict, point: dict, clean: bool) -> None:
        rid = run_id(cfg)
        if rid not in seen:
            seen.add(rid)
            runs.append({"id": rid, "config": cfg, "point": point, "clean": clean})

    if spec.attack == "none":
        # A clean-only sweep (e.g. clean accuracy over a model ladder): every run is a clean victim.
        for seed in spec.seeds:
            for point in points:
                cfg = _resolve(spec, point, seed, "none")
                cfg["eval_attacks"] = {"attack": "none", "configs": []}
                add(cfg, point, True)
        return runs
    for seed in spec.seeds:
        for point in points:
            add(_resolve(spec, point, seed, spec.attack), point, False)
        if spec.clean_control:
            other = [k for k in keys if k.split(".")[0] not in POISON_SECTIONS]
            for vals in dict.fromkeys(tuple(p[k] for k in other) for p in points):
                cpoint = dict(zip(other, vals))
                cfg = _resolve(spec, cpoint, seed, "none")
                # The attacks this clean victim is measured against: one per distinct eval-relevant
                # attack config (trigger + target), with a single poison (only the manifest is used).
                evals = []
                for p in points:
                    if any(p[k] != cpoint[k] for k in other):
                        continue
                    a = _resolve(spec, p, seed, spec.attack)[spec.attack]
                    a["n_poisons"] = 1
                    if spec.attack == "backdoor":
                        a["placement"] = "consistent"  # both test placements are always measured
                    if a not in evals:
                        evals.append(a)
                cfg["eval_attacks"] = {"attack": spec.attack, "configs": evals}
                if spec.attack == "targeted":
                    cfg["n_targets"] = spec.n_targets
                add(cfg, cpoint, True)
    return runs
