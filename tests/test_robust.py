"""Robust training (defenses/robust.py): SafeCLIP's split on constructed pairs, a defended run end to
end on the fast backend, and the refusals."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch

from clip_poison.cli import build_parser, main
from clip_poison.config import TrainConfig
from clip_poison.defenses import robust
from clip_poison.defenses.robust import MIN_EPOCHS, SAFE_FRACTION_CAP, SAFE_FRACTION_STEP, objective_for, safe_split
from clip_poison.io import UserError
from clip_poison.victims import fast
from clip_poison.victims import train as victims_train
from clip_poison.victims.export import WEIGHTS


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _planted_pairs(n=1000, n_planted=100, d=64, seed=0):
    """Image and caption features where most captions match their image (cosine about 0.8) and
    ``n_planted`` are another pair's caption in all but name (an independent direction, cosine about 0)."""
    rng = np.random.default_rng(seed)
    img = _unit(rng.normal(size=(n, d)))
    txt = _unit(img + 0.75 * rng.normal(size=(n, d)) / np.sqrt(d))
    planted = rng.choice(n, n_planted, replace=False)
    txt[planted] = _unit(rng.normal(size=(n_planted, d)))
    is_planted = np.zeros(n, dtype=bool)
    is_planted[planted] = True
    return img, txt, is_planted


def test_first_split_puts_planted_mismatches_in_the_risky_set():
    img, txt, planted = _planted_pairs()
    safe = safe_split(img, txt, None, seed=0)
    assert (~safe[planted]).mean() >= 0.95  # the planted pairs are caught
    assert (~safe[~planted]).mean() <= 0.02  # and few matching pairs are taken with them


def test_later_splits_keep_the_top_fraction_by_posterior():
    img, txt, planted = _planted_pairs()
    safe = safe_split(img, txt, 0.85, seed=0)
    assert safe.sum() == 850 and (~safe[planted]).all()
    safe = safe_split(img, txt, 0.95, seed=0)  # 50 risky: they must be the least aligned, all planted
    assert safe.sum() == 950 and planted[~safe].all()


def test_objective_for_names_the_choices_and_checks_the_run_length():
    assert objective_for(TrainConfig()) is None
    assert isinstance(objective_for(TrainConfig(defense="safeclip", epochs=MIN_EPOCHS)), robust.SafeCLIPObjective)
    with pytest.raises(UserError, match=r"unknown defense 'bogus'; use one of \['none', 'safeclip'\]"):
        objective_for(TrainConfig(defense="bogus"))
    with pytest.raises(UserError, match=f"needs --epochs >= {MIN_EPOCHS}"):
        objective_for(TrainConfig(defense="safeclip", epochs=MIN_EPOCHS - 1))
    # the CLI offers exactly the defenses objective_for knows
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert tuple(next(a for a in train._actions if a.dest == "defense").choices) == robust.DEFENSES


def test_train_victim_refuses_a_defense_without_its_objective(tiny_world, tmp_path):
    cfg = TrainConfig(defense="safeclip", epochs=MIN_EPOCHS)
    with pytest.raises(UserError, match=r"objective_for\(cfg\)"):
        victims_train.train_victim(tiny_world / "train.csv", [], cfg, tmp_path / "v")
    assert not (tmp_path / "v").exists()


class _ClipAtZeroLr(fast.Objective):
    name = "clip-at-zero-lr"

    def lr_scale(self, epoch: int) -> float:
        return 0.0

    def loss(self, imgs, tokens, idx, epoch):
        out = self.ctx.forward(imgs, tokens)
        return open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])


@pytest.mark.slow
def test_the_trainer_applies_the_objectives_lr_scale(tiny_world, tmp_path):
    """lr_scale 0 leaves every trained parameter at its seeded init (buffers: BatchNorm statistics
    still move in train mode); SafeCLIP's cross-modal warm-up relies on this hook."""
    cfg = TrainConfig(epochs=1, batch_size=64, warmup=2)
    fast.train_fast(tiny_world / "train.csv", [], cfg, tmp_path / "v", objective=_ClipAtZeroLr())
    sd = torch.load(tmp_path / "v" / WEIGHTS, weights_only=True)
    torch.manual_seed(cfg.seed)
    init = open_clip.create_model(cfg.model)
    for name, p in init.named_parameters():
        assert torch.equal(p.detach(), sd[name]), name


@pytest.fixture(scope="module")
def backdoor_set(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("robust") / "p"
    assert main(["poison", "backdoor", "--data", str(tiny_world / "train.csv"), "--n-poisons", "30",
                 "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_train_defense_safeclip_end_to_end(tiny_world, backdoor_set, tmp_path, capsys):
    epochs = MIN_EPOCHS + 1  # two splits: the posterior threshold, then the grown fraction
    common = ["train", "--data", tiny_world / "train.csv", "--poisons", backdoor_set, "--epochs", epochs,
              "--batch-size", 32, "--warmup", 2]
    for name, extra in (("safe", ["--defense", "safeclip"]), ("again", ["--defense", "safeclip"]), ("plain", [])):
        assert main([str(a) for a in [*common, *extra, "--out", tmp_path / name]]) == 0
    printed = capsys.readouterr().out
    info = json.loads((tmp_path / "safe" / "train.json").read_text())
    obj, n = info["objective"], info["data"]["n_clean"] + info["data"]["n_poisons"]
    assert info["recipe"]["defense"] == "safeclip" and obj["name"] == "safeclip"
    assert obj["settings"]["inmodal_warmup_epochs"] == 5 and obj["settings"]["first_split_posterior"] == 0.9
    split = obj["split"]
    assert [s["epoch"] for s in split] == [epochs - 2, epochs - 1]  # after the 6 warm-up epochs
    for s in split:
        assert s["n_safe"] + s["n_risky"] == n and 0 < s["n_safe"] < n
        assert 0 <= s["poison_rows_risky"] <= min(s["n_risky"], info["data"]["n_poisons"])
    # the second split keeps the top ⌊r·N⌋ pairs, r = the first split's safe fraction + 1 %, capped
    r = min(split[0]["n_safe"] / n + SAFE_FRACTION_STEP, SAFE_FRACTION_CAP)
    assert split[1]["n_safe"] == int(n * r)
    assert f"safeclip: {split[-1]['n_safe']} pairs safe in the last epoch" in printed
    assert "objective" not in json.loads((tmp_path / "plain" / "train.json").read_text())
    safe, again, plain = ((tmp_path / k / WEIGHTS).read_bytes() for k in ("safe", "again", "plain"))
    assert safe == again  # same seed, same bytes
    assert safe != plain  # the defense changed what was trained


def test_defense_on_open_clip_train_is_refused_before_any_work(bad_input, tiny_world, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(victims_train, "train_fast", no_training)
    monkeypatch.setattr(victims_train, "train_open_clip_train", no_training)
    bad_input(["train", "--data", tiny_world / "train.csv", "--backend", "open_clip_train", "--defense", "safeclip",
               "--epochs", MIN_EPOCHS, "--out", tmp_path / "v"],
              what="`--defense safeclip` with `--backend open_clip_train`", kind="unsupported",
              expect=["--defense safeclip runs on --backend fast only", "train_one_epoch"])
    bad_input(["train", "--data", tiny_world / "train.csv", "--defense", "safeclip", "--epochs", MIN_EPOCHS - 1,
               "--out", tmp_path / "v"], what="`--defense safeclip` with fewer epochs than its warm-ups",
              kind="invalid value", expect=[f"needs --epochs >= {MIN_EPOCHS}"])
    bad_input(["train", "--data", tiny_world / "train.csv", "--defense", "bogus", "--out", tmp_path / "v"],
              what="unknown `--defense`", kind="invalid value", expect=["invalid choice: 'bogus'"])
    assert not (tmp_path / "v").exists()
