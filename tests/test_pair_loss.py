"""Recording every pair's contrastive loss during training (``--record-pair-loss``, fast backend):
the array's shape and row map, that recording leaves training bitwise unchanged, and that the
recorded losses average to the loss each step logged."""
import json
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.config import BackdoorConfig, CraftOptions, TrainConfig
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.io import UserError, load_image, resize_to_input, sha256_file
from clip_poison.victims.export import WEIGHTS
from clip_poison.victims.fast import PAIR_LOSS, per_pair_clip_loss
from clip_poison.victims.models import register_victims
from clip_poison.victims.openclip_train import training_rows
from clip_poison.victims.order import epoch_order
from clip_poison.victims.train import train_victim

CFG = TrainConfig(model="rn-tiny-32", epochs=2, batch_size=64, warmup=2)


@pytest.fixture(scope="module")
def poison_sets(tiny_world, tmp_path_factory):
    """An added backdoor set (12 rows) and a --mode replace one (8 rows, another label)."""
    root = tmp_path_factory.mktemp("p")
    train = read_csv_dataset(tiny_world / "train.csv")
    craft_backdoor_poisons(BackdoorConfig(n_poisons=12), train, 32, root / "add")
    craft_backdoor_poisons(BackdoorConfig(n_poisons=8, target_label="apple", seed=3), train, 32, root / "rep",
                           options=CraftOptions(mode="replace"))
    return [root / "add", root / "rep"]


def _first_step_losses(csv, poison_dirs, idx) -> np.ndarray:
    """The per-pair losses of the first training step (rows ``idx`` of X ∪ P), from the seeded
    initial model every run starts from, in plain NCHW fp32."""
    register_victims()
    paths, caps, _, _ = training_rows(csv, poison_dirs, 32)
    torch.manual_seed(CFG.seed)
    model = open_clip.create_model(CFG.model, output_dict=True).train()
    imgs = torch.from_numpy(np.stack([resize_to_input(load_image(paths[i]), 32) for i in idx])).permute(0, 3, 1, 2)
    mean = torch.tensor(model.visual.image_mean or open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std or open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model((imgs.float() / 255.0 - mean) / std, open_clip.get_tokenizer(CFG.model)([caps[i] for i in idx]))
        logits = open_clip.ClipLoss().get_logits(out["image_features"], out["text_features"], out["logit_scale"])
        return per_pair_clip_loss(*logits).numpy()


def test_per_pair_loss_averages_to_open_clips_clip_loss():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    img, txt = img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)
    loss_fn = open_clip.ClipLoss()
    per = per_pair_clip_loss(*loss_fn.get_logits(img, txt, torch.tensor(10.0)))
    assert per.shape == (16,)
    torch.testing.assert_close(per.mean(), loss_fn(img, txt, torch.tensor(10.0)))


@pytest.mark.slow
def test_recording_leaves_training_unchanged_and_matches_the_logged_loss(tiny_world, poison_sets, tmp_path):
    csv = tiny_world / "train.csv"
    plain = train_victim(csv, poison_sets, CFG, tmp_path / "plain")
    info = train_victim(csv, poison_sets, replace(CFG, record_pair_loss=True), tmp_path / "rec")
    # Training unchanged: the same weights to the bit and the same loss at every step.
    assert (tmp_path / "plain" / WEIGHTS).read_bytes() == (tmp_path / "rec" / WEIGHTS).read_bytes()
    assert plain["loss_per_step"] == info["loss_per_step"]
    assert not (tmp_path / "plain" / PAIR_LOSS).exists()

    L = np.load(tmp_path / "rec" / PAIR_LOSS)
    n_clean, n = 300 - 8, 300 - 8 + 12 + 8  # the replace set takes 8 clean rows' places
    assert L.shape == (n, CFG.epochs) and L.dtype == np.float32
    steps = n // CFG.batch_size
    logged = info["loss_per_step"]
    for e in range(CFG.epochs):
        order = epoch_order(n, n_clean, CFG.seed, e).numpy()
        for i in range(steps):
            batch = L[order[i * CFG.batch_size:(i + 1) * CFG.batch_size], e]
            # train.json rounds each step's loss to 6 decimals; the rows are float32
            assert batch.mean(dtype=np.float64) == pytest.approx(logged[e * steps + i], abs=2e-6)
        # exactly the dropped partial last batch is NaN
        assert np.isnan(L[:, e]).sum() == n - steps * CFG.batch_size
        assert np.isnan(L[order[steps * CFG.batch_size:], e]).all()

    # Each row holds its own pair's loss, not a batch-mate's: the first step, recomputed from the
    # seeded initial model, row by row.
    order_0 = epoch_order(n, n_clean, CFG.seed, 0).numpy()[:CFG.batch_size]
    want = _first_step_losses(csv, poison_sets, order_0)
    assert want.std() > 0.05  # pairs differ far more than the tolerance, so a swap would show
    np.testing.assert_allclose(L[order_0, 0], want, rtol=0, atol=1e-4)

    rows = json.loads((tmp_path / "rec" / "pair_loss.json").read_text())
    assert rows["shape"] == [n, CFG.epochs] and rows["file"] == PAIR_LOSS
    assert rows["clean"]["rows"] == [0, n_clean] and rows["clean"]["csv_sha256"] == sha256_file(csv)
    assert [s["rows"] for s in rows["poison_sets"]] == [[n_clean, n_clean + 12], [n_clean + 12, n]]
    assert [s["manifest_sha256"] for s in rows["poison_sets"]] == [sha256_file(p / "manifest.json") for p in poison_sets]
    assert [s["mode"] for s in rows["poison_sets"]] == ["add", "replace"]
    assert info["recipe"]["record_pair_loss"] is True


def test_open_clip_train_backend_refuses_to_record(tiny_world, tmp_path):
    cfg = replace(CFG, backend="open_clip_train", record_pair_loss=True)
    with pytest.raises(UserError, match="--backend fast"):
        train_victim(tiny_world / "train.csv", [], cfg, tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_cli_refuses_record_pair_loss_on_open_clip_train(bad_input, tiny_world, tmp_path):
    bad_input(["train", "--data", tiny_world / "train.csv", "--backend", "open_clip_train", "--record-pair-loss",
               "--out", tmp_path / "v"], what="--record-pair-loss with the open_clip_train backend",
              kind="unsupported", expect=["cannot be hooked", "--backend fast"])
    assert not (tmp_path / "v").exists()
