"""Victims: the size ladder, recipe presets, the fast backend's data order, speed options and checkpoints."""
import argparse
import json
import math
from dataclasses import replace

import open_clip
import pytest
import torch

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.config import BackdoorConfig, TrainConfig
from clip_poison.data.csvdata import read_csv_dataset, write_csv_rows
from clip_poison.io import UserError
from clip_poison.victims.export import WEIGHTS
from clip_poison.victims.fast import build_optimizer, FastOptions, train_fast
from clip_poison.victims.order import epoch_order
from clip_poison.victims.models import describe, register_victims
from clip_poison.victims.openclip_train import training_rows
from clip_poison.victims.recipes import RUNG_RANGES, SIZE_LADDER, ladder_models, recipe


def test_size_ladder_image_tower_params_fall_in_their_rungs():
    rows = []
    for tower, rungs in SIZE_LADDER.items():
        for rung, name in rungs.items():
            d = describe(name)
            rows.append(f"{name:12s} {tower:15s} {rung:>4s}  image tower {d['visual_params'] / 1e6:6.2f} M  "
                        f"total {d['params'] / 1e6:6.2f} M  (token embedding {d['token_embedding_params'] / 1e6:.2f} M)")
            lo, hi = RUNG_RANGES[rung]
            assert lo <= d["visual_params"] <= hi, (name, d["visual_params"])
            assert d["tower"] == tower and d["image_size"] == 32
            # Only the image tower varies: the token embedding is the same 49,408 x 128 everywhere.
            assert d["token_embedding_params"] == 49408 * 128
    print("\n" + "\n".join(rows))


def test_ladder_rungs_share_one_text_tower():
    from clip_poison.victims.models import model_config

    cfgs = [model_config(m) for m in ladder_models()]
    assert all(c["text_cfg"] == cfgs[0]["text_cfg"] and c["embed_dim"] == cfgs[0]["embed_dim"] for c in cfgs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ladder_models())
def test_each_ladder_model_trains_one_step(name):
    register_victims()
    torch.manual_seed(0)
    model = open_clip.create_model(name, output_dict=True)
    opt = build_optimizer(model, TrainConfig(model=name, lr=1e-3), impl="fused")
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    x, t = torch.randn(8, 3, 32, 32), torch.randint(0, 49408, (8, 16))
    out = model(x, t)
    loss = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    after = model.visual.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())


def test_paper_recipe_preset_is_section_4_1():
    r = recipe("paper-rn50")
    assert (r.model, r.batch_size, r.epochs, r.lr, r.wd) == ("RN50", 1024, 30, 2e-4, 0.02)
    assert recipe("laptop") == TrainConfig()
    assert recipe("laptop", epochs=2).epochs == 2
    with pytest.raises(UserError, match="paper-rn50"):
        recipe("paper")


def test_unknown_optimizer_implementation_is_a_user_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="fused"):
        build_optimizer(model, TrainConfig(), impl="sparse")


def test_fast_order_equals_open_clip_train_loader_order(tiny_world, tmp_path):
    """The fast backend's batches are the batches open_clip_train's (patched) CSV loader yields."""
    from open_clip_train import data as oc_data

    from clip_poison.victims._otrain_entry import with_clean_order

    train = read_csv_dataset(tiny_world / "train.csv")
    craft_backdoor_poisons(BackdoorConfig(n_poisons=12), train, 32, tmp_path / "b")
    paths, caps, n_clean, _ = training_rows(tiny_world / "train.csv", [tmp_path / "b"])
    csv = tmp_path / "x_union_p.csv"
    write_csv_rows(csv, paths, caps)
    args = argparse.Namespace(train_data=str(csv), csv_img_key="filepath", csv_caption_key="title",
                              csv_separator=",", batch_size=32, workers=0, distributed=False,
                              world_size=1, rank=0)
    register_victims()
    tok = open_clip.get_tokenizer("rn-tiny-32")
    info = with_clean_order(oc_data.get_csv_dataset(args, lambda im: 0, True, tokenizer=tok), args, n_clean, 7)
    tokens = tok(caps)
    n = len(paths)
    for epoch in (0, 1):
        info.set_epoch(epoch)  # what open_clip_train calls at the start of every epoch
        theirs = torch.cat([texts for _, texts in info.dataloader])
        order = epoch_order(n, n_clean, 7, epoch)[: (n // 32) * 32]  # drop_last, as both backends
        assert torch.equal(theirs, tokens[order])
    assert not torch.equal(epoch_order(n, n_clean, 7, 0), epoch_order(n, n_clean, 7, 1))


@pytest.mark.slow
def test_fast_checkpoint_loads_weights_only_and_is_reproducible(tiny_world, tmp_path):
    cfg = TrainConfig(model="rn-tiny-32", epochs=1, batch_size=64, warmup=2)
    info = train_fast(tiny_world / "train.csv", [], cfg, tmp_path / "a")
    train_fast(tiny_world / "train.csv", [], cfg, tmp_path / "b")
    sd = torch.load(tmp_path / "a" / WEIGHTS, map_location="cpu", weights_only=True)
    assert all(v.is_contiguous() for v in sd.values())  # channels_last training leaves no NHWC tensors
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'a'}")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()  # same seed, same bytes
    recorded = json.loads((tmp_path / "a" / "train.json").read_text())
    assert recorded["fast_options"] == info["fast_options"] and recorded["fast_options"]["optimizer_impl"] == "fused"
    assert recorded["threads"] == torch.get_num_threads()  # CPU results depend on it: each result says it


@pytest.mark.slow
def test_speed_options_do_not_change_the_math(tiny_world, tmp_path):
    """Fused AdamW + channels_last train the same model as torch's default for-loop AdamW in NCHW,
    up to float rounding: measured here the whole-model difference is ~0.5 % of the training update,
    against ~20 % for a 10 % change of lr (the math check this test would catch) and >1000 % for
    another seed. Single small tensors can differ more: Adam turns rounding noise in near-zero
    gradients into full-size steps, so the check is on the whole model."""
    cfg = TrainConfig(model="rn-tiny-32", epochs=1, batch_size=64, warmup=2)
    plain = FastOptions(optimizer_impl="for-loop", channels_last=False)
    train_fast(tiny_world / "train.csv", [], cfg, tmp_path / "fast")
    train_fast(tiny_world / "train.csv", [], cfg, tmp_path / "plain", options=plain)
    train_fast(tiny_world / "train.csv", [], replace(cfg, lr=cfg.lr * 1.1), tmp_path / "lr", options=plain)
    w = {k: torch.load(tmp_path / k / WEIGHTS, weights_only=True) for k in ("fast", "plain", "lr")}
    torch.manual_seed(cfg.seed)
    init = open_clip.create_model("rn-tiny-32").state_dict()  # the seeded init every run starts from
    keys = [k for k in init if init[k].is_floating_point() and "running_" not in k]

    def dist(a: dict, b: dict) -> float:
        return math.sqrt(sum(((a[k] - b[k]) ** 2).sum().item() for k in keys))

    update = dist(w["plain"], init)
    assert update > 0.1  # training really moved the weights
    assert dist(w["fast"], w["plain"]) < 0.02 * update
    assert dist(w["lr"], w["plain"]) > 0.1 * update  # a real change of the recipe is far outside that band


def test_cli_lists_recipe_presets(capsys):
    from clip_poison.cli import main

    assert main(["list", "recipes"]) == 0
    out = capsys.readouterr().out
    assert "paper-rn50" in out and "RN50" in out and "1024" in out and "SGD" in out
