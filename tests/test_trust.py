"""Headline numbers measure one attack at a time, and an attack really works on a trained victim."""
import json

import pytest

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.io import check_distinct_targets
from clip_poison.attacks.targeted import craft_targeted_poisons
from clip_poison.config import BackdoorConfig, DemoConfig, TargetedConfig, TrainConfig, WorldConfig
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.metrics.evaluate import evaluate_checkpoint
from clip_poison.run import run_demo
from clip_poison.victims.train import train_victim
from clip_poison.data.world import write_world


@pytest.fixture(scope="module")
def same_label_sets(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("same_label")
    train, ev = read_csv_dataset(tiny_world / "train.csv"), load_wds_evalset(tiny_world / "eval")
    craft_targeted_poisons(TargetedConfig(n_poisons=2, target_label="tent"), train, ev, root / "t")
    craft_backdoor_poisons(BackdoorConfig(n_poisons=4, target_label="tent"), train, 32, root / "b")
    return root


def test_two_attacks_on_one_label_are_refused_in_one_victim(bad_input, tiny_world, same_label_sets, tmp_path):
    bad_input(["train", "--data", tiny_world / "train.csv", "--poisons", same_label_sets / "t", same_label_sets / "b",
               "--out", tmp_path / "v"], what="two poison sets with the same target label in one victim",
              kind="mismatch", expect=["both target 'tent'", "--allow-shared-label"])
    assert not (tmp_path / "v").exists()
    check_distinct_targets([same_label_sets / "t", same_label_sets / "b"], allow_shared=True)  # asked for: allowed


def test_demo_trains_one_victim_per_attack(tmp_path):
    cfg = DemoConfig(seed=3)
    cfg.world.n_train, cfg.world.n_eval = 300, 60
    cfg.targeted.n_poisons, cfg.backdoor.n_poisons = 2, 6
    cfg.train.epochs, cfg.train.batch_size = 1, 64
    s = run_demo(cfg, tmp_path / "demo")
    for victim, attacks in (("clean", []), ("targeted", ["targeted"]), ("backdoor", ["backdoor"])):
        info = json.loads((tmp_path / "demo" / "victims" / victim / "train.json").read_text())
        assert [p["attack"] for p in info["data"]["poison_sets"]] == attacks
        assert set(s[victim]) >= {"zeroshot_accuracy", "targeted_success_rate", "backdoor_asr_consistent", "backdoor_z_consistent"}
    assert s["attack"]["targeted"]["victim"] == "targeted" and s["attack"]["backdoor"]["victim"] == "backdoor"
    assert "poisoned" not in s


@pytest.mark.slow
def test_a_backdoor_takes_on_a_trained_victim(tmp_path):
    """8 % backdoor poisons in the 5,000-pair world (400 poisons): every seed tried so far was
    backdoored at this setting (fig2-backdoor and fig4-placement, seeds 0 and 1, ASR 0.99). A clean
    victim with the same seed stays near chance on the same triggered images."""
    write_world(WorldConfig(seed=0, n_train=5000, n_eval=1000), tmp_path / "w")
    train, ev = read_csv_dataset(tmp_path / "w" / "train.csv"), load_wds_evalset(tmp_path / "w" / "eval")
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=400, seed=0), train, 32, tmp_path / "b")
    asr = {}
    for name, sets in (("clean", []), ("poisoned", [tmp_path / "b"])):
        train_victim(tmp_path / "w" / "train.csv", sets, TrainConfig(seed=0), tmp_path / name)
        r = evaluate_checkpoint(tmp_path / name, ev, [m], metrics="zeroshot,backdoor", cache_dir=False)
        asr[name] = r["backdoor"][0]["consistent"]["asr"]
    assert asr["clean"] < 0.15
    assert asr["poisoned"] > 0.6 and asr["poisoned"] > asr["clean"] + 0.5, asr


@pytest.mark.slow
def test_backends_agree_at_the_loss_level(tiny_world, same_label_sets, tmp_path):
    """Same seed, same data, same order: the two backends' first steps have the same contrastive
    loss (the same init, batches and update rule). open_clip_train logs 5 significant digits; later
    steps drift only as float summation order does (fused vs for-loop AdamW)."""
    cfg = dict(model="rn-tiny-32", epochs=1, batch_size=64, warmup=2, seed=5, workers=0)
    sets = [same_label_sets / "b"]
    fast = train_victim(tiny_world / "train.csv", sets, TrainConfig(**cfg, backend="fast"), tmp_path / "f")
    oct_ = train_victim(tiny_world / "train.csv", sets, TrainConfig(**cfg, backend="open_clip_train"), tmp_path / "o")
    a, b = fast["loss_per_step"], oct_["loss_per_step"]
    assert len(a) == len(b) == (300 + 4) // 64
    assert a[0] == pytest.approx(b[0], abs=1e-4)  # step 1: identical up to the logged digits
    assert a == pytest.approx(b, abs=2e-3)
    assert len(set(a)) > 1  # the loss moves: the model really trains in both
