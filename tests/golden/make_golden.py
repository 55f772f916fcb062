"""Golden results of tiny runs, to show a refactor changes no number.

``python tests/golden/make_golden.py`` runs tiny versions of the demo (synthetic and real-photo
world) and of one sweep run per kind the presets use (backdoor, targeted with two targets, a clean
control, the Figure 3 similarity analysis, another model size, a real-photo world with a probe), and
writes their result dicts, minus volatile fields (seconds, versions, host, paths, cache counters),
to ``tests/golden/<name>.json``. ``tests/test_golden.py`` reruns them and compares.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN = {"model": "vit-tiny-32", "epochs": 1, "batch_size": 64, "warmup": 1}
# Keys whose values change from run to run or machine to machine, never with the numbers (threads: the
# machine's default count; what it moves is the last bits, within test_golden's tolerances).
VOLATILE = {"seconds", "eval_seconds", "versions", "host", "checkpoint", "embedding_cache", "train_seconds",
            "root", "dir", "path", "paths", "csv", "out", "data", "samples_per_second", "created", "timings",
            "threads", "eval_device"}


def scrub(x, tmp: str):
    """The result without volatile fields; temporary folders replaced by ``TMP``."""
    if isinstance(x, dict):
        return {k: scrub(v, tmp) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list | tuple):
        return [scrub(v, tmp) for v in x]
    if isinstance(x, str):
        return x.replace(tmp, "TMP")
    return x


def photo_source(root: Path) -> Path:
    """A tiny labelled source in CLIP_benchmark's webdataset layout (random photos, 10 classes)."""
    from clip_poison.data.evalsets import write_wds_evalset

    rng = np.random.default_rng(0)
    templates = ["a photo of a {c}.", "a blurry photo of a {c}."]
    write_wds_evalset(root, rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8), np.arange(300) % 10, CLASSES,
                      templates, split="train", shard_size=100)
    write_wds_evalset(root, rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8), np.arange(60) % 10, CLASSES,
                      templates, split="test")
    return root


def _sweep_specs(photos: Path) -> dict[str, dict]:
    synth = {"world": {"n_train": 300, "n_eval": 60}, "train": TRAIN}
    return {
        "sweep-backdoor": {"attack": "backdoor", "base": {**synth, "backdoor": {"n_poisons": 8}}},
        "sweep-targeted": {"attack": "targeted", "n_targets": 2, "base": {**synth, "targeted": {"n_poisons": 4}}},
        "sweep-similarity": {"attack": "backdoor", "analyses": ["similarity"],
                             "base": {**synth, "backdoor": {"n_poisons": 8}}},
        "sweep-modelsize": {"attack": "backdoor",
                            "base": {**synth, "backdoor": {"n_poisons": 8}, "train": {**TRAIN, "model": "rn-tiny-32"}}},
        "sweep-photos": {"attack": "backdoor",
                         "base": {"real_world": {"root": str(photos), "n_train": 200}, "train": TRAIN,
                                  "backdoor": {"target_label": "cat", "n_poisons": 6},
                                  "eval": {"max_n": 50, "probe_n": 100}}},
    }


def golden_runs(tmp: Path, only: set[str] | None = None) -> dict[str, dict]:
    """Name → scrubbed result dict of every tiny run (``only``: a subset of the names)."""
    from clip_poison.config import (BackdoorConfig, DemoConfig, RealWorldConfig, TargetedConfig, TrainConfig,
                                    WorldConfig, stable_id)
    from clip_poison.experiments.runner import execute_run
    from clip_poison.experiments.spec import expand, spec_from_dict
    from clip_poison.run import run_demo

    tmp = Path(tmp)
    photos = photo_source(tmp / "photos" / "wds")
    out: dict[str, dict] = {}

    def want(name: str) -> bool:
        return only is None or name in only

    def demo_cfg(**over) -> DemoConfig:
        return DemoConfig(world=WorldConfig(n_train=300, n_eval=60), targeted=TargetedConfig(n_poisons=4, **over),
                          backdoor=BackdoorConfig(n_poisons=10, **over), train=TrainConfig(**TRAIN), seed=1)

    if want("demo"):
        out["demo"] = scrub(run_demo(demo_cfg(), tmp / "demo"), str(tmp))
    if want("demo-photos"):
        out["demo-photos"] = scrub(run_demo(demo_cfg(target_label="cat"), tmp / "demo-photos",
                                            real_world=RealWorldConfig(root=str(photos), n_train=200),
                                            eval_max_n=40), str(tmp))
    for name, raw in _sweep_specs(photos).items():
        if not want(name):
            continue
        runs = expand(spec_from_dict({"name": name, "seeds": [0], "axes": {}, **raw}))
        for run in runs:
            key = f"{name}-{'clean' if run['clean'] else 'poisoned'}"
            if name != "sweep-backdoor" and run["clean"] and name != "sweep-targeted":
                continue  # one clean control per attack is enough
            res = execute_run(run, tmp / "sweeps" / name, write=False)
            assert res["status"] == "ok", res.get("traceback")
            out[key] = scrub(res, str(tmp))
            if str(tmp) in json.dumps(run["config"]):  # a config naming a temporary folder: its id with TMP
                out[key]["id"] = stable_id(out[key]["config"])
    return out


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = golden_runs(Path(tmp), set(sys.argv[1:]) or None)
    for name, res in runs.items():
        (HERE / f"{name}.json").write_text(json.dumps(res, indent=1, sort_keys=True, allow_nan=True) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
