"""A tiny end-to-end run (seconds) through the real open_clip_train and the fast backend."""
import json

import numpy as np
import open_clip
import pytest
import torch

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.attacks.targeted import craft_targeted_poisons
from clip_poison.config import BackdoorConfig, TargetedConfig, TrainConfig
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.io import sha256_tree
from clip_poison.metrics.evaluate import evaluate_checkpoint
from clip_poison.victims.export import WEIGHTS
from clip_poison.victims.train import train_victim


@pytest.fixture(scope="module")
def poisons(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("poisons")
    train = read_csv_dataset(tiny_world / "train.csv")
    ev = load_wds_evalset(tiny_world / "eval")
    mt = craft_targeted_poisons(TargetedConfig(n_poisons=4, target_label="apple"), train, ev, root / "t")
    mb = craft_backdoor_poisons(BackdoorConfig(n_poisons=6), train, 32, root / "b")
    return root, mt, mb


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["open_clip_train", "fast"])
def test_poison_train_evaluate_end_to_end(backend, tiny_world, poisons, tmp_path):
    root, mt, mb = poisons
    before = sha256_tree(tiny_world)
    cfg = TrainConfig(model="vit-tiny-32", epochs=1, batch_size=64, warmup=2, backend=backend, workers=0)
    info = train_victim(tiny_world / "train.csv", [root / "t", root / "b"], cfg, tmp_path / "v")
    assert info["backend"] == backend
    assert info["data"]["n_clean"] == 300 and info["data"]["n_poisons"] == 10
    assert sha256_tree(tiny_world) == before  # X is read, never rewritten

    # The export is a plain open_clip local-dir checkpoint whose weights really load.
    sd = torch.load(tmp_path / "v" / WEIGHTS, map_location="cpu", weights_only=True)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'v'}")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    random_init = open_clip.create_model("vit-tiny-32")
    assert not torch.equal(random_init.state_dict()["visual.conv1.weight"], sd["visual.conv1.weight"])

    r = evaluate_checkpoint(tmp_path / "v", load_wds_evalset(tiny_world / "eval"), [mt, mb])
    assert 0.0 <= r["zeroshot"]["accuracy"] <= 1.0 and r["zeroshot"]["n"] == 60
    assert r["targeted"][0]["eval_index"] == mt["target"]["eval_index"]
    tent = r["backdoor"][0]
    assert tent["consistent"]["n"] == 60 - 6  # the 6 eval tents are left out of the ASR denominator
    assert np.isfinite(tent["consistent"]["z"]["z"])
    json.dumps(r)  # plain JSON


@pytest.mark.slow
def test_open_clip_train_keeps_clean_order_and_same_init(tiny_world, poisons, tmp_path):
    """The order sampler inserts poisons without reshuffling the clean rows."""
    from clip_poison.victims.order import CleanOrderSampler

    a = list(CleanOrderSampler(range(300), 300, seed=0))
    b = list(CleanOrderSampler(range(310), 300, seed=0))
    assert sorted(a) == list(range(300)) and sorted(b) == list(range(310))
    assert [i for i in b if i < 300] == a
