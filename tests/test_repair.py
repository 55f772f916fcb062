"""CleanCLIP repair (defenses/repair.py): the loss against hand-written references, the recipe's lr
rule, the input checkpoint left untouched, same seed → same bytes, and bad inputs refused first."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip_poison.cli import main
from clip_poison.config import REPAIR_LR_DIVISOR, RepairConfig, TrainConfig
from clip_poison.defenses import repair as repair_mod
from clip_poison.defenses.inmodal import augment_caption, augment_images, inmodal_loss
from clip_poison.defenses.repair import CleanCLIPObjective, repair
from clip_poison.io import UserError, rng_for, sha256_file
from clip_poison.victims.export import WEIGHTS
from clip_poison.victims.fast import TrainContext, train_fast
from clip_poison.victims.models import register_victims

SMALL = RepairConfig(epochs=1, batch_size=32, warmup=2)  # 9 steps on the tiny world's 300 pairs


# --- hand-written references: explicit loops, log-softmax by hand, float64 ----------------------

def _naive_ce(logits: list[list[float]]) -> float:
    """Mean over rows i of -log softmax(row i)[i]."""
    total = 0.0
    for i, row in enumerate(logits):
        m = max(row)
        total += -(row[i] - (m + math.log(sum(math.exp(v - m) for v in row))))
    return total / len(logits)


def _naive_logits(a: torch.Tensor, b: torch.Tensor, scale: float) -> list[list[float]]:
    a, b = a.double().tolist(), b.double().tolist()
    return [[scale * sum(x * y for x, y in zip(u, v)) for v in b] for u in a]


def _transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(r) for r in zip(*m)]


def naive_inmodal(image, image_aug, text, text_aug, scale: float) -> float:
    return (_naive_ce(_naive_logits(image, image_aug, scale)) + _naive_ce(_naive_logits(text, text_aug, scale))) / 2


def naive_clip(image, text, scale: float) -> float:
    logits = _naive_logits(image, text, scale)
    return (_naive_ce(logits) + _naive_ce(_transpose(logits))) / 2


def _unit(*shape, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_inmodal_loss_equals_a_naive_loop_reference():
    b, d, scale = 6, 5, 7.3
    x = [_unit(b, d, seed=s) for s in range(4)]
    got = inmodal_loss(*x, torch.tensor(scale, dtype=torch.float64)).item()
    assert got == pytest.approx(naive_inmodal(*x, scale), rel=1e-12)
    # the pairing matters: views in another order give another loss
    assert naive_inmodal(x[0], x[1].flip(0), x[2], x[3], scale) != pytest.approx(got, rel=1e-3)


class _Recorder:
    """A stand-in model: features are fixed functions of the inputs, and every call is kept."""

    def __init__(self):
        self.calls = []
        self.proj_img = torch.randn(3 * 8 * 8, 6, generator=torch.Generator().manual_seed(1))
        self.proj_txt = torch.randn(77, 6, generator=torch.Generator().manual_seed(2))

    def __call__(self, imgs, tokens):
        self.calls.append((imgs, tokens))
        return {"image_features": F.normalize(imgs.flatten(1) @ self.proj_img, dim=-1),
                "text_features": F.normalize(tokens.float() @ self.proj_txt, dim=-1),
                "logit_scale": torch.tensor(9.0)}


def test_objective_is_weighted_clip_plus_inmodal_on_the_right_halves():
    n, seed = 10, 3
    pixels = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    captions = [f"a red tent number {i} in the snow by the lake" for i in range(n)]
    normalize = lambda x: x.float() / 255.0 - 0.5  # noqa: E731
    fwd = _Recorder()
    ctx = TrainContext(model=None, forward=fwd, pixels=pixels, captions=captions, tokenizer=open_clip.tokenize,
                       normalize=normalize, n_clean=n, cfg=TrainConfig(), steps_per_epoch=1)
    obj = CleanCLIPObjective(RepairConfig(clip_weight=0.3, inmodal_weight=1.7, seed=seed))
    obj.setup(ctx)
    # one fixed EDA view per caption, from the repair's own seeded stream
    rng = rng_for(seed, "repair/eda")
    assert obj.aug_captions == [augment_caption(c, rng) for c in captions]
    assert obj.aug_captions != [" ".join(c.split()) for c in captions]

    idx = torch.tensor([7, 2, 5, 0])
    tokens = open_clip.tokenize(captions)[idx]
    torch.manual_seed(11)
    total = obj.loss(normalize(pixels[idx]), tokens, idx, epoch=0).item()
    torch.manual_seed(11)
    views = normalize(augment_images(pixels[idx]))

    (imgs_in, toks_in), = fwd.calls  # one forward of 2B rows: originals, then their views
    assert torch.equal(imgs_in, torch.cat([normalize(pixels[idx]), views]))
    assert torch.equal(toks_in, torch.cat([tokens, open_clip.tokenize([obj.aug_captions[i] for i in idx])]))
    out = fwd(imgs_in, toks_in)
    im, tx, b = out["image_features"], out["text_features"], len(idx)
    want = 0.3 * naive_clip(im[:b], tx[:b], 9.0) + 1.7 * naive_inmodal(im[:b], im[b:], tx[:b], tx[b:], 9.0)
    assert total == pytest.approx(want, rel=1e-5)
    swapped = 1.7 * naive_clip(im[:b], tx[:b], 9.0) + 0.3 * naive_inmodal(im[:b], im[b:], tx[:b], tx[b:], 9.0)
    assert total != pytest.approx(swapped, rel=1e-3)


# --- real repairs of a tiny victim ---------------------------------------------------------------

@pytest.fixture(scope="module")
def victim(tiny_world, tmp_path_factory):
    d = tmp_path_factory.mktemp("repair") / "victim"
    train_fast(tiny_world / "train.csv", [], TrainConfig(model="rn-tiny-32", epochs=1, batch_size=64, warmup=2), d)
    return d


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repaired(victim, tiny_world, tmp_path_factory):
    before = _file_hashes(victim)
    out = tmp_path_factory.mktemp("repair") / "repaired"
    info = repair(victim, tiny_world / "train.csv", SMALL, out)
    return out, info, before


@pytest.mark.slow
def test_repair_moves_the_weights_from_the_input_and_never_touches_it(victim, repaired):
    out, info, before = repaired
    assert _file_hashes(victim) == before  # every file of the input, byte for byte
    w_in = torch.load(victim / WEIGHTS, weights_only=True)
    w_out = torch.load(out / WEIGHTS, weights_only=True)
    register_victims()
    torch.manual_seed(0)
    fresh = open_clip.create_model("rn-tiny-32").state_dict()
    keys = [k for k in w_in if w_in[k].is_floating_point() and "running_" not in k]

    def dist(a, b):
        return math.sqrt(sum(((a[k] - b[k]) ** 2).sum().item() for k in keys))

    assert dist(w_out, w_in) > 0  # repair trained
    # ... starting from the input, not from scratch (measured: 0.20 from the input, 4.5 from a fresh init)
    assert dist(w_out, w_in) < dist(w_out, fresh) / 4
    recorded = json.loads((out / "train.json").read_text())
    assert recorded["init"]["weights_sha256"] == before[WEIGHTS]
    assert recorded["objective"]["name"] == "cleanclip" == info["objective"]["name"]
    assert recorded["objective"]["text_augmentation"]["ops"] == ["random swap", "random deletion"]


@pytest.mark.slow
def test_default_lr_is_a_fiftieth_of_the_checkpoints_and_recorded(victim, repaired):
    _, info, _ = repaired
    trained = json.loads((victim / "train.json").read_text())["recipe"]["lr"]
    assert info["recipe"]["lr"] == pytest.approx(trained / REPAIR_LR_DIVISOR) == info["objective"]["lr"]
    assert f"1/{REPAIR_LR_DIVISOR} of the checkpoint's lr {trained:g}" in info["objective"]["lr_rule"]
    assert info["recipe"]["init"] == str(victim) and info["recipe"]["epochs"] == SMALL.epochs


@pytest.mark.slow
def test_cli_repair_with_the_same_seed_writes_the_same_bytes(victim, repaired, tiny_world, tmp_path, capsys):
    out, _, _ = repaired
    assert main([str(a) for a in ["repair", "--checkpoint", victim, "--data", tiny_world / "train.csv", "--out",
                                  tmp_path / "again", "--epochs", 1, "--batch-size", 32, "--warmup", 2]]) == 0
    assert "1/50 of the checkpoint's lr 0.002, CleanCLIP's ratio" in capsys.readouterr().out
    assert (tmp_path / "again" / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()


@pytest.fixture
def no_record(victim, tmp_path):
    """The victim's checkpoint without its train.json (a checkpoint from elsewhere)."""
    d = Path(shutil.copytree(victim, tmp_path / "bare"))
    (d / "train.json").unlink()
    return d


@pytest.mark.slow
def test_checkpoint_without_record_needs_lr_and_model_before_any_work(no_record, tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(repair_mod, "train_victim", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(UserError, match="--lr"):
        repair(no_record, tiny_world / "train.csv", SMALL, tmp_path / "r", model="rn-tiny-32")
    with pytest.raises(UserError, match="--model"):
        repair(no_record, tiny_world / "train.csv", RepairConfig(lr=1e-5), tmp_path / "r")
    assert not (tmp_path / "r").exists()


# --- bad inputs through the CLI (rows of docs/bad-inputs.md) --------------------------------------

def test_missing_checkpoint(bad_input, tiny_world, tmp_path):
    bad_input(["repair", "--checkpoint", tmp_path / "nope", "--data", tiny_world / "train.csv", "--out", tmp_path / "r"],
              what="`--checkpoint` is not a checkpoint folder", kind="missing input",
              expect=["not an open_clip local-dir checkpoint", "clip-poison train"])
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_out_inside_the_checkpoint(bad_input, victim, tiny_world, tmp_path):
    ckpt = Path(shutil.copytree(victim, tmp_path / "ckpt"))
    before = _file_hashes(ckpt)
    bad_input(["repair", "--checkpoint", ckpt, "--data", tiny_world / "train.csv", "--out", ckpt / "fixed"],
              what="`--out` inside `--checkpoint`", kind="unsafe path", expect=["is inside the input", "outside every input"])
    assert _file_hashes(ckpt) == before


@pytest.mark.slow
def test_checkpoint_without_train_json_and_no_lr(bad_input, no_record, tiny_world, tmp_path):
    bad_input(["repair", "--checkpoint", no_record, "--data", tiny_world / "train.csv", "--model", "rn-tiny-32",
               "--out", tmp_path / "r"], what="`--checkpoint` records no lr and no `--lr`", kind="missing input",
              expect=["does not record the lr", "pass --lr"])
    bad_input(["repair", "--checkpoint", no_record, "--data", tiny_world / "train.csv", "--lr", "1e-5",
               "--out", tmp_path / "r"], what="`--checkpoint` records no model name and no `--model`",
              kind="missing input", expect=["does not record its model name", "--model"])
    assert not (tmp_path / "r").exists()


def test_both_weights_zero(bad_input, tmp_path):
    bad_input(["repair", "--checkpoint", tmp_path, "--data", tmp_path / "d.csv", "--out", tmp_path / "r",
               "--clip-weight", "0", "--inmodal-weight", "0"], what="`--clip-weight 0 --inmodal-weight 0`",
              kind="invalid value", expect=["both 0", "weight > 0"])
