"""Mitigations in the run loop and the report: filter-and-retrain, repairs per learning rate, the
defense section's checks, the Pareto front of the ASR-vs-accuracy figure."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from clip_poison.cli import main
from clip_poison.defenses.scan_data import top_fraction
from clip_poison.experiments.report import _pareto, build_report, mitigation_rows
from clip_poison.experiments.runner import execute_run
from clip_poison.experiments.spec import expand, spec_from_dict
from clip_poison.io import UserError, sha256_tree


def test_top_fraction_drops_the_highest_scores_ties_in_row_order():
    s = [0.1, 0.9, 0.5, 0.9, 0.2, 0.9, 0.0, 0.3, 0.4, 0.6]
    assert top_fraction(s, 0.2).tolist() == [1, 3]  # three tie at 0.9: the first two rows go
    assert top_fraction(s, 0.5).tolist() == [1, 2, 3, 5, 9]
    with pytest.raises(UserError, match="between 0 and 1"):
        top_fraction(s, 1.0)


def test_pareto_front_by_hand():
    # (accuracy, ASR): b beats a (more accurate, less ASR); c and d trade off; e is dominated by d
    pts = np.array([[0.40, 0.9], [0.42, 0.8], [0.30, 0.0], [0.45, 0.5], [0.44, 0.6]])
    assert _pareto(pts).tolist() == [2, 3]


@pytest.mark.parametrize("defense, msg", [
    ({"filter": {"detectors": ["dao+ref"]}, "scan_data": {"detectors": ["clip-score"]}}, "not among them"),
    ({"filter": {"detectors": ["clip-score"]}}, "no defense.scan_data"),
    ({"filter": {"fraction": 1.5}, "scan_data": {"detectors": ["clip-score"]}}, "between 0 and 1"),
    ({"repair": {"lr": 1e-4}}, "takes `lrs:`"),
    ({"repair": {"epoch": 3}}, "bad defense.repair"),
])
def test_defense_section_refuses_what_it_cannot_run(defense, msg):
    with pytest.raises(UserError, match=msg):
        spec_from_dict({"name": "x", "attack": "backdoor", "defense": defense})


def _tiny_spec(**over) -> dict:
    return {"name": "tiny-mitigate", "attack": "backdoor",
            "base": {"world": {"n_train": 400, "n_eval": 120}, "backdoor": {"n_poisons": 40},
                     "train": {"epochs": 1, "batch_size": 64}, "eval": {"probe_n": 200}},
            "seeds": [0], **over}


@pytest.fixture(scope="module")
def mitigated(tmp_path_factory):
    spec = spec_from_dict(_tiny_spec(defense={
        "scan_data": {"detectors": ["clip-score", "dao"], "k": 5, "reference_n": 100},
        "repair": {"n_clean": 128, "lrs": [None, 1e-3], "epochs": 1},
        "filter": {"detectors": ["clip-score", "dao+ref"], "fraction": 0.1}}))
    sweep = tmp_path_factory.mktemp("mit")
    runs = {r["clean"]: r for r in expand(spec)}
    results = {c: execute_run(r, sweep, keep_checkpoints=True) for c, r in runs.items()}
    return sweep, results


def test_mitigations_run_once_per_poisoned_victim_and_are_measured(mitigated):
    sweep, res = mitigated
    pois, clean = res[False], res[True]
    assert pois["status"] == "ok", pois.get("traceback")
    assert "mitigate" not in clean  # a clean victim has nothing to repair or filter
    m = pois["mitigate"]
    lrs = [r["lr"] for r in m["repair"]]
    assert lrs == [pytest.approx(pois["config"]["train"]["lr"] / 50), 1e-3]
    assert [r["lr_default"] for r in m["repair"]] == [True, False]
    for r in m["repair"] + m["filter"]:
        assert 0 <= r["metrics"]["backdoor_asr_consistent"] <= 1 and "probe_accuracy" in r["metrics"]
    n = 400 + 40
    for f in m["filter"]:
        assert f["n_removed"] == round(0.1 * n) and f["n_poisons"] == 40
        assert 0 <= f["poisons_removed"] <= min(40, f["n_removed"])
    assert "scores" not in pois["defense"]["scan_data"]  # arrays never reach the result JSON
    json.dumps(pois)


def test_filter_removes_exactly_the_top_ranked_rows(mitigated, tmp_path):
    """The run loop's filter and `clip-poison scan filter` drop the same rows: the scan's top 10 %."""
    sweep, res = mitigated
    pois = res[False]
    ckpt = pois["checkpoint"]
    world = next((sweep / "worlds").iterdir())
    poisons = next(p for p in (sweep / "work" / pois["id"] / "poisons").iterdir())
    before = sha256_tree(ckpt)
    assert main(["scan", "data", "--data", str(world / "train.csv"), "--poisons", str(poisons), "--checkpoint", ckpt,
                 "--detectors", "clip-score", "--out", str(tmp_path / "scan")]) == 0
    assert main(["scan", "filter", "--scan", str(tmp_path / "scan"), "--detector", "clip-score", "--fraction", "0.1",
                 "--out", str(tmp_path / "kept.csv")]) == 0
    kept = pd.read_csv(tmp_path / "kept.csv")
    scores = pd.read_parquet(tmp_path / "scan" / "scores.parquet").sort_values("row")["score"].to_numpy()
    pairs = pd.read_parquet(tmp_path / "scan" / "pairs.parquet")
    dropped = set(pairs["ref"]) - set(kept["filepath"])
    assert len(kept) == 440 - 44 and len(dropped) == 44
    assert min(scores[pairs["ref"].isin(dropped)]) >= max(scores[~pairs["ref"].isin(dropped)])
    before_x = sha256_tree(world)
    for inp in (world / "train.csv", poisons / "poisons.csv"):  # the scanned data is an input: never replaced
        assert main(["scan", "filter", "--scan", str(tmp_path / "scan"), "--detector", "clip-score", "--out", str(inp),
                     "--overwrite"]) == 2
    assert sha256_tree(world) == before_x
    f = next(x for x in pois["mitigate"]["filter"] if x["detector"] == "clip-score")
    assert f["poisons_removed"] == int(pairs[pairs["ref"].isin(dropped)]["source"].ne("data").sum())
    assert sha256_tree(ckpt) == before  # repairs and scans only read the victim


def test_scan_filter_refuses_bad_input(mitigated, tmp_path, bad_input):
    bad_input(["scan", "filter", "--scan", tmp_path / "nope", "--detector", "clip-score", "--out", tmp_path / "k.csv"],
              what="`scan filter` of a folder that is no scan", kind="missing input", expect=["scan data"])
    (tmp_path / "s").mkdir()
    pd.DataFrame({"row": [0, 1], "detector": "clip-score", "score": [0.2, 0.1]}).to_parquet(tmp_path / "s" / "scores.parquet")
    pd.DataFrame({"row": [0, 1], "source": "data", "ref": ["/etc/passwd", "x.png"], "caption": ["a", "b"]}).to_parquet(
        tmp_path / "s" / "pairs.parquet")
    (tmp_path / "s" / "metrics.json").write_text(json.dumps({"data": {"kind": "csv"}}))
    bad_input(["scan", "filter", "--scan", tmp_path / "s", "--detector", "dao", "--fraction", "0.5", "--out",
               tmp_path / "k.csv"], what="`scan filter` by a detector the scan did not run", kind="mismatch",
              expect=["holds no scores of 'dao'"])
    bad_input(["scan", "filter", "--scan", tmp_path / "s", "--detector", "clip-score", "--fraction", "0.5", "--out",
               tmp_path / "k.csv"], what="`scan filter` of pairs naming no existing absolute image path",
              kind="unsafe path", expect=["not existing absolute paths", "x.png"])
    bad_input(["scan", "filter", "--scan", tmp_path / "s", "--detector", "clip-score", "--out", tmp_path / "s" / "k.csv"],
              what="`scan filter --out` inside the scan folder", kind="output conflict", expect=["inside"])
    assert not (tmp_path / "k.csv").exists()


def test_report_tables_each_mitigation_with_its_seed(mitigated, tmp_path):
    sweep, res = mitigated
    t = mitigation_rows([res[False], res[True]])
    assert set(t["method"]) == {"clean victim (no poisons)", "no defense", "repair (CleanCLIP) lr 4e-05 (default)",
                                "repair (CleanCLIP) lr 0.001", "filter top 10% by clip-score, retrain",
                                "filter top 10% by dao+ref, retrain"}
    nd = t[t["method"] == "no defense"].iloc[0]
    assert nd["asr"] == res[False]["metrics"]["backdoor_asr_consistent"]
    r = build_report(sweep, tmp_path / "rep")
    md = r["report_md"].read_text()
    assert "## Mitigations" in md and (tmp_path / "rep" / "fig-mitigate.png").is_file()


def test_robust_presets_train_on_the_mitigate_presets_poisons():
    """SafeCLIP victims are compared with the mitigate presets' victims: same world, attack and seeds;
    only the recipe's epochs (its warm-up) and the defense differ."""
    from clip_poison.experiments.spec import load_spec

    for attack in ("backdoor", "targeted"):
        mit, rob = (expand(load_spec(f"cifar10-{k}-{attack}", "quick")) for k in ("mitigate", "robust"))
        mit = {r["config"]["seed"]: r["config"] for r in mit if not r["clean"]}
        for r in rob:
            c, m = r["config"], mit[r["config"]["seed"]]
            assert c["real_world"] == m["real_world"] and c[attack] == m[attack] and c["eval"] == m["eval"]
            assert c.get("n_targets") == m.get("n_targets")
            diff = {k for k in c["train"] if c["train"][k] != m["train"].get(k)}
            assert diff == {"epochs", "defense"} and c["train"]["epochs"] == m["train"]["epochs"] + 6
