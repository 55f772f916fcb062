"""Sweep specs, the report, and (slow) real tiny sweeps: resume, failure isolation, Ray."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clip_poison.experiments.executors import (LocalExecutor, RayExecutor, auto_parallel, cpu_count, run_sweep,
                                               worker_threads)
from clip_poison.experiments.report import build_report, load_results
from clip_poison.experiments.spec import expand, load_spec, preset_names, spec_from_dict
from clip_poison.io import UserError, atomic_write_json

TINY = {
    "name": "tiny", "attack": "backdoor",
    "base": {"world": {"n_train": 200, "n_eval": 40}, "backdoor": {"n_poisons": 4},
             "train": {"model": "vit-tiny-32", "epochs": 1, "batch_size": 64, "warmup": 1}},
    "axes": {}, "seeds": [0],
}


def _spec(**over):
    raw = json.loads(json.dumps(TINY))
    raw.update(over)
    return spec_from_dict(raw)


# ---------------------------------------------------------------- spec expansion and ids


def test_expansion_is_axes_product_times_seeds_plus_clean_controls():
    s = _spec(axes={"backdoor.n_poisons": [2, 4, 8], "backdoor.placement": ["consistent", "random"]}, seeds=[0, 1])
    runs = expand(s)
    pois = [r for r in runs if not r["clean"]]
    clean = [r for r in runs if r["clean"]]
    assert len(pois) == 3 * 2 * 2
    # Attack axes do not change a clean victim: one clean control per seed, same seeds as poisoned.
    assert sorted(r["config"]["seed"] for r in clean) == [0, 1]
    assert {r["config"]["seed"] for r in pois} == {0, 1}
    assert all("backdoor" not in r["config"] for r in clean)
    # The seed drives every stage of a run.
    r = pois[-1]
    assert r["config"]["world"]["seed"] == r["config"]["backdoor"]["seed"] == r["config"]["train"]["seed"] == 1
    # Ids are unique and depend only on the resolved config, not on axis order.
    assert len({r["id"] for r in runs}) == len(runs)
    s2 = _spec(axes={"backdoor.placement": ["random", "consistent"], "backdoor.n_poisons": [8, 4, 2]}, seeds=[1, 0])
    assert {r["id"] for r in expand(s2)} == {r["id"] for r in runs}
    assert [r["id"] for r in expand(s)] == [r["id"] for r in runs]  # same spec, same ids, same order


def test_ids_change_with_any_config_field():
    a = expand(_spec())[0]["id"]
    b = expand(_spec(base={**TINY["base"], "train": {**TINY["base"]["train"], "lr": 1e-3}}))[0]["id"]
    assert a != b


def test_clean_controls_keep_non_attack_axes_and_every_trigger():
    s = _spec(axes={"backdoor.patch_size": [2, 4], "world.n_train": [200, 300]})
    clean = [r for r in expand(s) if r["clean"]]
    assert sorted(r["config"]["world"]["n_train"] for r in clean) == [200, 300]
    for r in clean:
        assert [c["patch_size"] for c in r["config"]["eval_attacks"]["configs"]] == [2, 4]


def test_real_world_section_replaces_world_and_eval_is_unseeded():
    base = {"real_world": {"root": "/data/cifar10-wds", "n_train": 300}, "backdoor": {"n_poisons": 3},
            "train": {"epochs": 1}, "eval": {"max_n": 100, "probe_n": 50}}
    runs = expand(_spec(base=base, axes={"backdoor.n_poisons": [3, 6]}, seeds=[0, 1]))
    for r in runs:
        c = r["config"]
        assert "world" not in c and c["real_world"]["root"] == "/data/cifar10-wds"
        assert c["real_world"]["seed"] == c["train"]["seed"] == c["seed"]
        assert c["eval"] == {"max_n": 100, "probe_n": 50}
    # Specs that do not set eval keep the ids they had (no eval section in the resolved config).
    assert "eval" not in expand(_spec())[0]["config"]


def test_clean_only_sweep_has_no_poisoned_runs():
    runs = expand(_spec(attack="none", axes={"train.model": ["rn-tiny-32", "vit-tiny-32"]}, seeds=[0, 1]))
    assert len(runs) == 4 and all(r["clean"] for r in runs)
    assert all(r["config"]["eval_attacks"] == {"attack": "none", "configs": []} for r in runs)
    assert all("backdoor" not in r["config"] for r in runs)


def test_targets_of_one_victim_have_distinct_labels():
    from clip_poison.run import targeted_configs as _targeted_configs

    names = [f"c{i}" for i in range(10)]
    for seed in range(20):
        cfgs = _targeted_configs({"target_label": "c3", "n_poisons": 2}, 4, seed, names)
        labels = [c.target_label for c in cfgs]
        assert labels[0] == "c3" and len(set(labels)) == 4 and set(labels) <= set(names)
        assert cfgs[0].seed == 0  # target 0 keeps the run's attack config
    assert _targeted_configs({"target_label": "c3"}, 4, 1, names)[1].target_label == \
        _targeted_configs({"target_label": "c3", "n_poisons": 64}, 4, 1, names)[1].target_label
    with pytest.raises(UserError, match="exceeds the 10 classes"):
        _targeted_configs({"target_label": "c3"}, 11, 0, names)


@pytest.mark.parametrize("bad, words", [
    ({"base": {"real_world": {"n_train": 10}}}, "needs root"),
    ({"base": {"world": {}, "real_world": {"root": "x"}}}, "keep one"),
    ({"axes": {"backdoor.n_poison": [1]}}, "no field 'n_poison'"),
    ({"axes": {"train.seed": [1, 2]}}, "set from the run's seed"),
    ({"axes": {"targeted.n_poisons": [1]}}, "belongs to the targeted attack"),
    ({"axes": {"backdoor.n_poisons": 5}}, "non-empty list"),
    ({"attack": "evasion"}, "attack 'evasion' unknown"),
    ({"seeds": [0, 0]}, "repeat"),
    ({"colour": 1}, "unknown keys"),
    ({"defense": {"scan_weights": {}}}, "not a defense"),
    ({"defense": {"scan_data": {"detectors": ["telepathy"]}}}, "unknown detectors"),
    ({"defense": {"scan_data": {"kk": 3}}}, "bad defense.scan_data"),
    ({"defense": {"scan_model": {"seed": 3}}}, "set from the run's seed"),
    ({"axes": {"craft.caption_substitution": 0.5}}, "non-empty list"),
])
def test_bad_specs_are_user_errors_naming_the_problem(bad, words):
    with pytest.raises(UserError, match=words):
        _spec(**bad)


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("size", ["quick", "paper"])
def test_every_preset_expands_in_both_sizes(name, size):
    spec = load_spec(name, size)
    runs = expand(spec)
    if spec.attack == "none":  # a clean-only sweep (the cifar10 ladder)
        assert runs and all(r["clean"] for r in runs)
    else:
        assert any(r["clean"] for r in runs) == spec.clean_control and any(not r["clean"] for r in runs)


def test_unknown_size_or_preset():
    with pytest.raises(UserError, match="no size 'huge'"):
        load_spec("fig4-placement", "huge")
    with pytest.raises(UserError, match="neither a file nor a preset"):
        load_spec("fig99")


# ---------------------------------------------------------------- report from synthetic results


def _fake_results(d: Path) -> dict:
    """A tiny hand-made results folder: 2 seeds x 2 counts, one clean control per seed, one failure."""
    spec = _spec(axes={"backdoor.n_poisons": [10, 100]}, seeds=[0, 1],
                 report={"plots": [{"name": "asr", "x": "n_poisons", "logx": True,
                                    "y": {"backdoor_asr_consistent": "consistent"}}]})
    runs = expand(spec)
    rng = np.random.default_rng(0)
    truth = {}
    for i, r in enumerate(runs):
        asr = 0.05 if r["clean"] else (0.2 if r["point"]["backdoor.n_poisons"] == 10 else 0.9) + rng.uniform(-.05, .05)
        res = {"id": r["id"], "clean": r["clean"], "point": r["point"], "config": r["config"], "seed": r["config"]["seed"],
               "status": "ok", "attack": "backdoor", "n_train": 200,
               "n_poisons": 0 if r["clean"] else r["point"]["backdoor.n_poisons"],
               "metrics": {"zeroshot_accuracy": 0.5, "backdoor_asr_consistent": asr, "backdoor_asr_random": asr / 2,
                           "backdoor_z_consistent": asr * 2, "backdoor_z_random": asr},
               "backdoor": [{"patch_size": 4, "trigger": "checkerboard", "label": "tent", "asr_consistent": asr,
                             "asr_random": asr / 2, "z_consistent": asr * 2, "z_random": asr}],
               "train": {"augmentation": {"random_resized_crop_scale": [1.0, 1.0]}}}
        res["poison_rate"] = res["n_poisons"] / 200
        truth[r["id"]] = asr
        atomic_write_json(d / "results" / f"{r['id']}.json", res)
    atomic_write_json(d / "results" / "deadbeef0000.json", {"id": "deadbeef0000", "status": "failed",
                                                            "error": "UserError: boom", "clean": False})
    atomic_write_json(d / "sweep.json", {"spec": spec.to_dict()})
    return truth


def test_report_builds_table_figures_and_markdown(tmp_path):
    truth = _fake_results(tmp_path)
    r = build_report(tmp_path / "results", tmp_path / "rep")
    df = pd.read_parquet(r["table_parquet"])
    assert len(df) == len(truth) and r["n_failed"] == 1
    pd.testing.assert_frame_equal(df, pd.read_csv(r["table_csv"]), check_dtype=False)
    for _, row in df.iterrows():
        assert row["backdoor_asr_consistent"] == pytest.approx(truth[row["run_id"]])
    pois = df[~df["clean"] & (df["n_poisons"] == 100)]
    assert pois["backdoor_asr_consistent"].mean() > 0.8 and pois["seed"].nunique() == 2
    png = r["figures"][0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = r["report_md"].read_text()
    assert "![asr](fig-asr.png)" in md and "deadbeef0000" in md and "boom" in md
    assert all(f"results/{i}.json" in md for i in truth)


def test_report_on_a_folder_without_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no results/ folder"):
        build_report(tmp_path)


# ---------------------------------------------------------------- real tiny sweeps (slow)


@pytest.mark.slow
def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    s = _spec(axes={"backdoor.patch_size": [64, 2]}, clean_control=False)
    out = run_sweep(s, tmp_path, LocalExecutor(progress=False))
    assert out == {**out, "n_runs": 2, "ran": 2, "failed": 1}
    res = {json.loads(p.read_text())["config"]["backdoor"]["patch_size"]: json.loads(p.read_text())
           for p in (tmp_path / "results").glob("*.json")}
    assert res[64]["status"] == "failed" and "does not fit" in res[64]["error"]
    assert res[2]["status"] == "ok" and 0 <= res[2]["metrics"]["backdoor_asr_consistent"] <= 1
    assert res[2]["versions"]["torch"] and res[2]["config"]["train"]["epochs"] == 1
    assert not any((tmp_path / "work").iterdir())  # checkpoints deleted (keep_checkpoints false)


@pytest.mark.slow
def test_killed_sweep_resumes_without_recomputing_finished_runs(tmp_path):
    import yaml

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**TINY, "seeds": [0, 1, 2], "clean_control": False}))
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "clip_poison.cli", "sweep", str(spec_file), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "results").glob("*.json")):
            assert proc.poll() is None, "sweep exited before writing a result"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # killed mid-sweep, as a lost job would be
    finally:
        proc.wait()
    done = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "results").glob("*.json")}
    assert 1 <= len(done) < 3
    s = run_sweep(load_spec(spec_file), out, LocalExecutor(progress=False))
    assert s["skipped"] == len(done) and s["ran"] == 3 - len(done) and s["failed"] == 0
    for name, (data, mtime) in done.items():  # finished results untouched
        p = out / "results" / name
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime
    assert len(list((out / "results").glob("*.json"))) == 3
    assert run_sweep(load_spec(spec_file), out, LocalExecutor(progress=False))["ran"] == 0


# Keys that say how long a run took or where it ran, never what it computed.
RUN_VOLATILE = {"seconds", "eval_seconds", "timings", "samples_per_second", "host", "versions"}


def _computed(x):
    if isinstance(x, dict):
        return {k: _computed(v) for k, v in x.items() if k not in RUN_VOLATILE}
    return [_computed(v) for v in x] if isinstance(x, list) else x


@pytest.mark.slow
def test_parallel_victims_equal_sequential_runs_at_the_same_thread_count(tmp_path):
    """Two victims at once in two worker processes give the results two runs one after the other
    give at the workers' thread count (1 each on 2 cores), to the last bit."""
    import torch

    spec = _spec(seeds=[0, 1], clean_control=False, keep_checkpoints=True)
    assert run_sweep(spec, tmp_path / "par", LocalExecutor(progress=False, parallel=2))["failed"] == 0
    threads, before = worker_threads(2), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert run_sweep(spec, tmp_path / "seq", LocalExecutor(progress=False))["failed"] == 0
    finally:
        torch.set_num_threads(before)
    par = {p.name: json.loads(p.read_text()) for p in (tmp_path / "par" / "results").glob("*.json")}
    seq = {p.name: json.loads(p.read_text()) for p in (tmp_path / "seq" / "results").glob("*.json")}
    assert sorted(par) == sorted(seq) and len(par) == 2
    for name, r in par.items():
        assert r["train"]["threads"] == seq[name]["train"]["threads"] == threads
        weights = [Path(x["checkpoint"], "open_clip_pytorch_model.bin").read_bytes() for x in (r, seq[name])]
        assert weights[0] == weights[1], name
        assert _computed({**r, "checkpoint": 0}) == _computed({**seq[name], "checkpoint": 0}), name
    a, b = par.values()
    assert a["train"]["loss_per_step"] != b["train"]["loss_per_step"]  # two seeds, two different victims


@pytest.mark.slow
def test_a_failing_run_in_a_worker_is_recorded_and_the_other_finishes(tmp_path):
    seen = []
    s = run_sweep(_spec(axes={"backdoor.patch_size": [64, 2]}, clean_control=False), tmp_path,
                  LocalExecutor(progress=False, parallel=2), on_result=lambda kind, r: seen.append(r["id"]))
    assert s == {**s, "n_runs": 2, "ran": 2, "failed": 1} and len(set(seen)) == 2
    res = {json.loads(p.read_text())["config"]["backdoor"]["patch_size"]: json.loads(p.read_text())
           for p in (tmp_path / "results").glob("*.json")}
    assert res[64]["status"] == "failed" and "does not fit" in res[64]["error"]
    assert res[2]["status"] == "ok" and 0 <= res[2]["metrics"]["backdoor_asr_consistent"] <= 1
    assert res[2]["train"]["threads"] == worker_threads(2)
    assert not any((tmp_path / "work").iterdir())


def test_parallel_auto_uses_the_measured_best_for_this_many_cores_else_one(tmp_path):
    table = tmp_path / "parallel.json"
    assert auto_parallel(["rn-tiny-32"], table)[0] == 1 and "missing" in auto_parallel(["rn-tiny-32"], table)[1]
    atomic_write_json(table, {"cpus": cpu_count(), "best": {"rn-tiny-32": 2, "rn-5m-32": 1}})
    assert auto_parallel(["rn-tiny-32", "rn-tiny-32"], table)[0] == 2
    assert auto_parallel(["rn-tiny-32", "rn-5m-32"], table)[0] == 1  # the smaller best of a sweep's models
    n, why = auto_parallel(["rn-tiny-32", "vit-30m-32"], table)
    assert n == 1 and "no measurement for vit-30m-32" in why
    atomic_write_json(table, {"cpus": cpu_count(), "best": {"rn-tiny-32": 2}, "quick": True})
    assert auto_parallel(["rn-tiny-32"], table)[0] == 1
    atomic_write_json(table, {"cpus": cpu_count() + 1, "best": {"rn-tiny-32": 2}})
    n, why = auto_parallel(["rn-tiny-32"], table)
    assert n == 1 and f"measured on {cpu_count() + 1} cores" in why


def test_parallel_is_a_positive_count_or_auto_and_local_only(bad_input, tmp_path):
    bad_input(["sweep", "fig2-backdoor", "--parallel", "0", "--out", tmp_path / "s"],
              what="`sweep --parallel 0`", kind="invalid value", expect=["'auto' or a whole number >= 1"])
    bad_input(["sweep", "fig2-backdoor", "--parallel", "2", "--executor", "ray", "--out", tmp_path / "s"],
              what="`sweep --parallel 2 --executor ray`", kind="unsupported", expect=["for the local executor"])
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_ray_executor_runs_two_tiny_runs_on_a_local_instance(tmp_path):
    import ray

    tmp_ray = Path(f"/tmp/rt{os.getpid()}")  # Ray's socket paths must stay short
    ex = RayExecutor(resources={"num_cpus": 1}, progress=False,
                     init_kwargs={"num_cpus": 2, "_temp_dir": str(tmp_ray), "include_dashboard": False})
    try:
        s = run_sweep(_spec(seeds=[0, 1], clean_control=False), tmp_path, ex)
    finally:
        import shutil
        shutil.rmtree(tmp_ray, ignore_errors=True)
    assert not ray.is_initialized()
    assert s["ran"] == 2 and s["failed"] == 0
    df, raws = load_results(tmp_path)
    assert sorted(df["seed"]) == [0, 1]
    assert all(r["status"] == "ok" for r in raws)


def test_ray_request_must_fit_on_one_node_not_just_in_the_cluster_total():
    from clip_poison.experiments.executors import _check_schedulable

    nodes = [{"CPU": 1.0, "memory": 1e9}, {"CPU": 1.0, "GPU": 1.0}]
    _check_schedulable({"num_cpus": 1, "num_gpus": 1}, nodes)  # the second node can run it
    with pytest.raises(UserError, match=r"asks for \{'num_cpus': 2, 'num_gpus': 0\}.*cluster total: \{'CPU': 2.0"):
        _check_schedulable({"num_cpus": 2, "num_gpus": 0}, nodes)  # two CPUs in all, but never on one node
    with pytest.raises(UserError, match="add a node"):
        _check_schedulable({"num_cpus": 1, "num_gpus": 2}, nodes)


@pytest.mark.slow
def test_ray_two_node_cluster_without_a_shared_sweep_folder(tmp_path, monkeypatch):
    """Two Ray nodes of two CPUs each (``ray.cluster_utils.Cluster``), runs asking for two CPUs
    (more than Ray's default of one, so a request that were dropped would let both runs share a node).

    What is simulated: both nodes are processes on this machine, so they do share its disk. "Not
    shared" is simulated in two ways: each node gets its own ``TMPDIR`` (its node-local folder),
    and a task is never told the driver's sweep folder (it gets only its run), so every
    ``results/<id>.json`` must come from the driver and the sweep folder must hold nothing a task
    made. A killed worker is simulated by a worker setup hook that ``os._exit()``s the first attempt
    of one run (a marker file says the attempt happened), as the OOM killer would."""
    import ray
    from ray.cluster_utils import Cluster

    from clip_poison.run import world_id

    ray_tmp = Path(f"/tmp/rc{os.getpid()}")  # Ray's socket paths must stay short
    (ray_tmp / "ray").mkdir(parents=True)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))  # the cluster's address file too, not /tmp/ray
    node_tmp = [tmp_path / "node0", tmp_path / "node1"]
    for d in node_tmp:
        d.mkdir()
    spec = _spec(seeds=[0, 1], clean_control=False)
    runs = expand(spec)
    doomed, marker = runs[1]["id"], tmp_path / "killed-once"

    def die_on_first_attempt():  # runs in every Ray worker before its first task
        import clip_poison.experiments.executors as ex
        real = ex.execute_run

        def execute_run(run, *a, **kw):
            if run["id"] == doomed and not marker.exists():
                marker.touch()
                os._exit(1)  # the worker process dies inside its task: no exception, no cleanup
            return real(run, *a, **kw)
        ex.execute_run = execute_run

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "temp_dir": str(ray_tmp / "ray"), "include_dashboard": False,
        "env_vars": {"TMPDIR": str(node_tmp[0])}})
    try:
        cluster.add_node(num_cpus=2, env_vars={"TMPDIR": str(node_tmp[1])})
        node_ids = [n.node_id for n in (cluster.head_node, *cluster.worker_nodes)]
        # A run asking for a GPU no node has is refused before anything is submitted (not left pending).
        with pytest.raises(UserError, match=r"num_gpus': 1.*no node.*cluster total: \{'CPU': 4.0, 'GPU': 0\}"):
            run_sweep(spec, tmp_path / "gpu", RayExecutor(cluster.address, {"num_cpus": 1, "num_gpus": 1},
                                                          progress=False))
        assert not (tmp_path / "gpu" / "results").exists()
        seen = []
        s = run_sweep(spec, tmp_path / "s", RayExecutor(cluster.address, {"num_cpus": 2, "num_gpus": 0},
                                                        progress=False, init_kwargs={"runtime_env": {
                                                            "worker_process_setup_hook": die_on_first_attempt}}),
                      on_result=lambda kind, r: seen.append(r["id"]))
        assert not ray.is_initialized()  # the executor disconnected from the cluster it did not start
    finally:
        import shutil
        ray.shutdown()  # a no-op unless a failure above left the driver connected (it would block cluster.shutdown)
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert s["ran"] == 2 and s["failed"] == 0
    assert marker.exists()  # the doomed run's first attempt did die; Ray retried it
    assert sorted(seen) == sorted(r["id"] for r in runs)  # each result returned once, the retried one too
    # The driver wrote every result; no task touched the sweep folder.
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["results", "sweep.json"]
    df, raws = load_results(tmp_path / "s")
    assert sorted(r["id"] for r in raws) == sorted(r["id"] for r in runs)
    assert all(r["status"] == "ok" for r in raws) and sorted(df["seed"]) == [0, 1]
    # Two CPUs per node and two per run: the two runs ran on the two nodes, each world in its node's folder.
    assert sorted(r["node"] for r in raws) == sorted(node_ids)
    assert all(r["resources"] == {"CPU": 2.0} for r in raws)
    for r in raws:
        tmp = node_tmp[node_ids.index(r["node"])]
        assert (tmp / "clip-poison-ray" / "worlds" / world_id(r["config"]) / "world.json").is_file()
        assert not (tmp / "clip-poison-ray" / "work" / r["id"]).exists()  # the finished attempt cleaned up


def test_report_draws_categorical_x_and_hue_with_one_clean_line(tmp_path):
    _fake_results(tmp_path)
    meta = json.loads((tmp_path / "sweep.json").read_text())
    meta["spec"]["report"] = {"plots": [{"name": "m", "x": "train.model", "hue": "backdoor.n_poisons",
                                         "y": {"backdoor_z_consistent": "z"}}]}
    atomic_write_json(tmp_path / "sweep.json", meta)
    r = build_report(tmp_path)
    assert [f.name for f in r["figures"]] == ["fig-m.png"] and r["figures"][0].stat().st_size > 1000


# ---------------------------------------------------------------- real-photo sweeps (slow)


@pytest.fixture(scope="module")
def photo_source(tmp_path_factory) -> Path:
    """A tiny labelled source in CLIP_benchmark's webdataset layout (random photos, 10 classes)."""
    from clip_poison.data.evalsets import write_wds_evalset

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("photos") / "wds"
    write_wds_evalset(root, rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8), np.arange(300) % 10, names,
                      ["a photo of a {c}.", "a blurry photo of a {c}."], split="train", shard_size=100)
    write_wds_evalset(root, rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8), np.arange(60) % 10, names,
                      ["a photo of a {c}.", "a blurry photo of a {c}."], split="test")
    return root


def _photo_spec(root: Path, attack: str, **over) -> dict:
    raw = {"name": f"photos-{attack}", "attack": attack, "seeds": [0],
           "base": {"real_world": {"root": str(root), "n_train": 200},
                    "train": {"model": "vit-tiny-32", "epochs": 1, "batch_size": 64, "warmup": 1},
                    "eval": {"max_n": 50, "probe_n": 100}}}
    raw.update(over)
    return raw


@pytest.mark.slow
def test_real_photo_backdoor_sweep_records_probe_asr_and_clean_control(tmp_path, photo_source):
    raw = _photo_spec(photo_source, "backdoor", axes={"backdoor.n_poisons": [6]})
    raw["base"]["backdoor"] = {"target_label": "cat", "patch_size": 4}
    s = run_sweep(spec_from_dict(raw), tmp_path, LocalExecutor(progress=False))
    assert s["ran"] == 2 and s["failed"] == 0
    df, raws = load_results(tmp_path)
    assert sorted(df["clean"]) == [False, True]
    for col in ("probe_accuracy", "probe_backdoor_asr_consistent", "probe_backdoor_asr_random",
                "backdoor_asr_consistent", "backdoor_z_consistent"):
        assert df[col].between(-10, 10).all(), col
    r = next(r for r in raws if not r["clean"])
    assert r["n_train"] == 200 and r["n_poisons"] == 6
    world = next(d for d in (tmp_path / "worlds").iterdir() if d.is_dir())
    info = json.loads((world / "world.json").read_text())
    assert info["kind"] == "real" and info["config"]["seed"] == 0 and info["n_train"] == 200
    assert build_report(tmp_path)["figures"]


@pytest.mark.slow
def test_real_photo_targeted_sweep_scores_four_distinct_targets(tmp_path, photo_source):
    raw = _photo_spec(photo_source, "targeted", axes={"targeted.n_poisons": [2]}, n_targets=4)
    raw["base"]["targeted"] = {"target_label": "cat"}
    s = run_sweep(spec_from_dict(raw), tmp_path, LocalExecutor(progress=False))
    assert s["ran"] == 2 and s["failed"] == 0
    _, raws = load_results(tmp_path)
    pois = next(r for r in raws if not r["clean"])
    clean = next(r for r in raws if r["clean"])
    assert pois["n_poisons"] == 8 and len(pois["targeted"]) == 4
    labels = [t["label"] for t in pois["targeted"]]
    assert labels[0] == "cat" and len(set(labels)) == 4
    assert len({t["eval_index"] for t in pois["targeted"]}) == 4
    # The clean control is scored on the very same (x', y') pairs.
    assert [(t["eval_index"], t["label"]) for t in clean["targeted"]] == \
        [(t["eval_index"], t["label"]) for t in pois["targeted"]]
    assert all("probe" in t for t in pois["targeted"])
    assert 0 <= pois["metrics"]["probe_targeted_success_rate"] <= 1


@pytest.mark.slow
def test_clean_only_sweep_runs_and_reports(tmp_path, photo_source):
    raw = _photo_spec(photo_source, "none", axes={"train.model": ["vit-tiny-32"]}, keep_checkpoints=True)
    s = run_sweep(spec_from_dict(raw), tmp_path, LocalExecutor(progress=False))
    assert s["ran"] == 1 and s["failed"] == 0
    df, raws = load_results(tmp_path)
    assert raws[0]["clean"] and raws[0]["attack"] == "none" and "probe_accuracy" in df.columns
    assert (Path(raws[0]["checkpoint"]) / "open_clip_pytorch_model.bin").is_file()
    r = build_report(tmp_path, out=tmp_path / "rep")
    assert r["figures"] and all(f.stat().st_size > 1000 for f in r["figures"])


def test_similarity_figure_leaves_zero_probability_bins_off_the_log_axis():
    """Figure 3 (left) is on a log axis: a bin where no pair shared a label (p = 0) cannot be drawn
    there, and must not turn into a band down to an arbitrary floor; the legend says how many."""
    from clip_poison.experiments.report import plot_similarity

    centers = [0.05, 0.15, 0.25, 0.35]
    hx = list(np.linspace(-0.95, 0.95, 20))

    def raw(clean, p_same, z):
        return {"status": "ok", "clean": clean, "similarity": {
            "available": True,
            "same_prediction": {"bin_centers": centers, "p_same": p_same},
            "histograms": {"bin_centers": hx, "clean_density": [0.5] * 20, "triggered_density": [0.5] * 20, "z": z}}}

    raws = [raw(False, [0.0, 0.01, 0.1, None], 1.0), raw(False, [0.0, 0.03, 0.2, None], 2.0),
            raw(True, [0.0, 0.0, 0.1, 0.5], 0.0)]
    fig = plot_similarity(raws)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln.get_ydata() for ln in ax.get_lines()}
    assert set(lines) == {"poisoned victims (1 bins with p = 0 not drawn)", "clean victims (2 bins with p = 0 not drawn)"}
    poisoned = np.asarray(lines["poisoned victims (1 bins with p = 0 not drawn)"], float)
    assert np.isnan(poisoned[0]) and np.isnan(poisoned[3])  # p = 0 in both runs; no pairs at all
    assert poisoned[1:3] == pytest.approx([0.02, 0.15])  # bin-by-bin mean over the two victims
    for band in ax.collections:  # every band lies strictly above 0 (drawable on the log axis)
        for path in band.get_paths():
            assert (path.vertices[:, 1] > 0).all()
    right = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "poisoned victims: z = 1.50 ± 0.50" in right


def test_late_field_keeps_old_ids_until_set():
    """A config field added later (config.late) is left out of ids while at its default."""
    import dataclasses
    from clip_poison.config import late, stable_id, to_dict

    @dataclasses.dataclass
    class Old:
        a: int = 1

    @dataclasses.dataclass
    class New:
        a: int = 1
        b: float = late(0.0)

    assert to_dict(New()) == to_dict(Old()) and stable_id(New()) == stable_id(Old())
    assert stable_id(New(b=0.5)) != stable_id(Old()) and to_dict(New(b=0.5))["b"] == 0.5


def test_defense_section_resolves_into_every_run_and_craft_axes_are_poison_only():
    spec = _spec(axes={"backdoor.n_poisons": [5, 10], "craft.caption_substitution": [0.0, 0.5]}, seeds=[0],
                 defense={"scan_data": {"k": 4}, "scan_model": {"max_images": 64}})
    runs = expand(spec)
    assert sum(r["clean"] for r in runs) == 1  # craft changes only the poisons: one clean control
    for r in runs:
        d = r["config"]["defense"]
        assert d["scan_data"]["k"] == 4 and d["scan_data"]["reference_n"] == 2000
        assert d["scan_model"]["max_images"] == 64 and "seed" not in d["scan_model"]
        assert ("craft" in r["config"]) != r["clean"]
    # a spec without a defense keeps the ids it had
    assert all("defense" not in r["config"] for r in expand(_spec()))


@pytest.mark.slow
def test_defense_step_scans_data_and_model_and_reports_pool_sweeps(tmp_path, photo_source):
    defense = {"scan_data": {"detectors": ["near-duplicate", "k-dist", "clip-score", "loss-dynamics"], "k": 3,
                             "reference_n": 8},
               "scan_model": {"max_images": 10, "max_steps": 20}}
    base = {"real_world": {"root": str(photo_source), "n_train": 200},
            "train": {"model": "vit-tiny-32", "epochs": 2, "batch_size": 64, "warmup": 1, "record_pair_loss": True},
            "eval": {"max_n": 30, "probe_n": 0}, "backdoor": {"target_label": "cat"}}
    for name, seeds in (("a", [0]), ("b", [1])):
        spec = spec_from_dict(_photo_spec(photo_source, "backdoor", name=f"detect-{name}", base=base, seeds=seeds,
                                          axes={"backdoor.n_poisons": [12]}, defense=defense))
        assert run_sweep(spec, tmp_path / name, LocalExecutor(progress=False))["failed"] == 0
    _, raws = load_results(tmp_path / "a")
    pois = next(r for r in raws if not r["clean"])
    clean = next(r for r in raws if r["clean"])
    sd = pois["defense"]["scan_data"]
    assert set(sd["detectors"]) == {"near-duplicate", "k-dist", "k-dist+ref", "clip-score", "loss-dynamics"}
    assert sd["n_poisons"] == 12 and sd["n_rows"] == 212 and sd["reference_n"] == 8
    assert "scan_data" not in clean["defense"]  # a clean victim's data holds nothing to find
    for r in (pois, clean):
        assert {"pl1", "z", "trigger_png_base64"} <= set(r["defense"]["scan_model"])
        assert r["metrics"]["model_scan/pl1"] == r["defense"]["scan_model"]["pl1"]
    assert pois["metrics"]["scan/k-dist+ref/roc_auc"] == sd["detectors"]["k-dist+ref"]["roc_auc"]
    md = (tmp_path / "rep" / "report.md")
    r = build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")
    text = md.read_text()
    assert "## Data scan" in text and "Separation over 2 backdoored and 2 clean victims" in text
    assert (tmp_path / "rep" / "fig-model-scan.png").stat().st_size > 1000 and r["n_ok"] == 4
    with pytest.raises(UserError, match="more than one of the sweeps"):
        build_report([tmp_path / "a", tmp_path / "a"], tmp_path / "rep2")


def test_counts_table_counts_seeds_and_pairs_by_hand():
    """The report's 'where it worked' table: backdoor cells = seeds with ASR > 0.5 (0.5 itself does
    not count), targeted cells = the runs' own per-target successes, clean controls in column 0."""
    import pandas as pd

    from clip_poison.experiments.report import counts_md

    rows = [  # (run id, clean, n_train, poisons, zero-shot ASR, probe ASR); floats as a NaN column makes them
        ("a", True, 10.0, None, 0.9, 0.1), ("b", True, 10.0, None, 0.1, 0.1),
        ("c", False, 10.0, 75, 0.5, 0.6), ("d", False, 10.0, 75, 0.51, 0.2),
        ("e", False, 20.0, 75, 0.0, 0.0), ("f", False, 20.0, 300, 1.0, 0.9), ("g", False, 20.0, 300, 0.7, 0.4),
        ("h", True, 20.0, None, 0.0, 0.0)]
    cols = ["run_id", "clean", "real_world.n_train", "backdoor.n_poisons", "backdoor_asr_consistent",
            "probe_backdoor_asr_consistent"]
    df = pd.DataFrame(rows, columns=cols)
    raws = [{"id": r[0], "status": "ok", "config": {}} for r in rows]
    # no axis_values: rows and columns fall back to sorted order (20 after 10, 300 after 75)
    md = "\n".join(counts_md(df.iloc[::-1], raws, ["real_world.n_train", "backdoor.n_poisons"]))
    assert "| 10 | 1/2 | 1/2 | – |" in md and "| 20 | 0/1 | 0/1 | 2/2 |" in md  # zero-shot
    assert "| 10 | 0/2 | 1/2 | – |" in md and "| 20 | 0/1 | 0/1 | 1/2 |" in md  # linear probe
    assert md.index("| 10 |") < md.index("| 20 |") and "| real_world.n_train | 0 | 75 | 300 |" in md
    # without clean controls there is no column 0
    assert "| 10 | 1/2 | – |" in "\n".join(counts_md(df[~df["clean"]], raws, ["real_world.n_train", "backdoor.n_poisons"]))

    # an attack-only row axis (placement): clean controls have none, so every row shows all of them
    pl = df.rename(columns={"real_world.n_train": "backdoor.placement"})
    pl["backdoor.placement"] = [None, None, "consistent", "consistent", "random", "random", "random", None]
    md = "\n".join(counts_md(pl, raws, ["backdoor.placement", "backdoor.n_poisons"],
                             {"backdoor.placement": ["consistent", "random"], "backdoor.n_poisons": [75, 300]}))
    assert "| consistent | 1/3 | 1/2 | – |" in md and "| random | 1/3 | 0/1 | 2/2 |" in md

    hit = lambda *ok: [{"success": o, "probe": {"success": False}} for o in ok]  # noqa: E731
    t = pd.DataFrame([("x", True, None, 0.25), ("y", False, 4, 0.5), ("z", False, 4, 0.75), ("w", False, 16, 1.0)],
                     columns=["run_id", "clean", "targeted.n_poisons", "targeted_success_rate"])
    traws = [{"id": "x", "status": "ok", "targeted": hit(True, False, False, False)},
             {"id": "y", "status": "ok", "targeted": hit(True, True, False, False)},
             {"id": "z", "status": "ok", "targeted": hit(True, True, True, False)},
             {"id": "w", "status": "ok", "targeted": hit(True, True, True)}]
    md = "\n".join(counts_md(t, traws, ["targeted.n_poisons"], {"targeted.n_poisons": [4, 16]}))
    assert "| all | 1/4 | 5/8 | 3/3 |" in md
    # Sweeps of another shape get no table: two non-count axes, or no count axis (a trigger sweep).
    assert counts_md(df.assign(m=1), raws, ["real_world.n_train", "m", "backdoor.n_poisons"]) == []
    assert counts_md(df.assign(**{"backdoor.trigger": "blended"}), raws, ["backdoor.trigger"]) == []
