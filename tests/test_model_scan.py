"""Model scan (defenses/model_scan.py): blind trigger inversion after DECREE, on toy encoders with
and without a planted backdoor, and end to end on a small open_clip checkpoint through the CLI."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_poison.cli import main
from clip_poison.config import ModelScanConfig
from clip_poison.defenses import model_scan
from clip_poison.defenses.model_scan import invert_trigger, mean_pair_cosine, scan_model, trigger_z_score
from clip_poison.io import sha256_pixels, sha256_tree
from clip_poison.metrics.zscore import pair_similarity_moments_naive
from clip_poison.victims.export import export_local_dir
from clip_poison.victims.models import model_config

H = 32  # toy input size
CORNER = 3  # the planted trigger: a 3×3 white patch in the upper-left corner


def toy_encoder(backdoor: bool, d: int = 16):
    """A fixed linear map of the image (so clean embeddings depend on the image); with ``backdoor``,
    a 3×3 white upper-left patch adds one large vector that swamps it, so the embeddings collapse."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d, 3 * H * H, generator=g) / (3 * H * H) ** 0.5
    v = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)

    def encode(x: torch.Tensor) -> torch.Tensor:
        h = (x - 0.5).flatten(1) @ w.T
        if not backdoor:
            return h
        on = torch.sigmoid(15 * (x[:, :, :CORNER, :CORNER].mean(dim=(1, 2, 3)) - 0.8))[:, None]
        return h + on * 20 * v

    return encode


def toy_images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, H, H, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def toy_scans():
    images = toy_images(128, 1)
    return {name: invert_trigger(toy_encoder(name == "backdoor"), images) for name in ("backdoor", "clean")}


def test_inversion_finds_the_planted_corner_trigger(toy_scans):
    r = toy_scans["backdoor"]
    assert r["reached"] and r["mean_cosine"] >= ModelScanConfig().threshold
    # the true trigger covers 9 of 1,024 pixels; the inverted mask is that small and sits on it
    assert r["pl1"] < 0.02
    assert r["mask"][:CORNER + 1, :CORNER + 1].sum() / r["mask"].sum() > 0.8
    assert r["pattern"][:, :CORNER, :CORNER].mean() > 0.8  # white, as planted


def test_a_clean_toy_encoder_needs_a_much_larger_mask(toy_scans):
    clean, bd = toy_scans["clean"], toy_scans["backdoor"]
    assert not clean["reached"] or (clean["pl1"] > 0.1 and clean["pl1"] > 10 * bd["pl1"])
    assert clean["mask"][:CORNER + 1, :CORNER + 1].sum() / clean["mask"].sum() < 0.1


def test_inverted_trigger_collapses_held_out_images(toy_scans):
    r = toy_scans["backdoor"]
    z = trigger_z_score(toy_encoder(True), toy_images(64, 2), r["mask"], r["pattern"])
    assert z["triggered_mean"] > 0.95 and z["z"] > 3 and z["n"] == 64


def test_inversion_is_deterministic_for_a_seed():
    enc, images = toy_encoder(True), toy_images(64, 3)
    cfg = ModelScanConfig(max_steps=60)
    a, b = invert_trigger(enc, images, cfg), invert_trigger(enc, images, cfg)
    c = invert_trigger(enc, images, ModelScanConfig(max_steps=60, seed=1))
    assert np.array_equal(a["mask"], b["mask"]) and a["pl1"] == b["pl1"] and a["steps"] == b["steps"]
    assert not np.array_equal(a["mask"], c["mask"])


def test_an_already_collapsed_encoder_needs_no_mask():
    r = invert_trigger(lambda x: torch.ones(len(x), 4) + 0 * x.flatten(1)[:, :4], toy_images(8, 4))
    assert r["pl1"] == 0.0 and r["reached"] and r["steps"] == 0 and not r["mask"].any()


def test_mean_pair_cosine_leaves_out_self_pairs():
    e = torch.randn(7, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref, _ = pair_similarity_moments_naive(e.numpy())
    assert mean_pair_cosine(e).item() == pytest.approx(ref, abs=1e-12)


# ---------------------------------------------------------------- a real checkpoint, end to end

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained vit-tiny-32 (its embeddings are not collapsed: clean mean cosine about 0.9)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("scan") / "ckpt"
    export_local_dir(model_config("vit-tiny-32"), open_clip.create_model("vit-tiny-32").state_dict(), d)
    return d


def test_cli_writes_scan_and_trigger_and_leaves_the_checkpoint_untouched(checkpoint, tiny_world, tmp_path):
    before = sha256_tree(checkpoint)
    out = tmp_path / "scan"
    assert main(["scan", "model", "--checkpoint", str(checkpoint), "--images", str(tiny_world), "--out", str(out),
                 "--max-images", "8"]) == 0
    assert sha256_tree(checkpoint) == before
    r = json.loads((out / "scan.json").read_text())
    for key in ("pl1", "z", "steps", "seconds", "collapse_threshold", "reached", "mean_cosine", "n_images", "seed"):
        assert key in r
    assert r["n_images"] == 8 and r["n_heldout"] == 8 and r["collapse_threshold"] == ModelScanConfig().threshold
    assert r["checkpoint"]["weights_sha256"] and r["checkpoint"]["path"] == str(checkpoint.resolve())
    assert 0 < r["pl1"] < 1 and r["steps"] > 0 and np.isfinite(r["z"])
    with Image.open(out / "trigger.png") as im:
        assert im.size[0] >= 256 and im.size[0] % 32 == 0  # 32 px upscaled by whole pixels
    with Image.open(out / "mask.png") as im:
        mask = np.asarray(im)[::im.size[0] // 32, ::im.size[0] // 32, 0] / 255
    assert mask.mean() == pytest.approx(r["pl1"], abs=0.01)
    again = ["scan", "model", "--checkpoint", str(checkpoint), "--images", str(tiny_world), "--out", str(out),
             "--max-images", "2"]
    assert main(again) == 2 and json.loads((out / "scan.json").read_text()) == r  # kept without --overwrite
    assert main(again + ["--overwrite"]) == 0 and json.loads((out / "scan.json").read_text())["n_images"] == 2


def test_scan_is_deterministic_for_a_seed(checkpoint, tiny_world, tmp_path):
    cfg = ModelScanConfig(max_images=8, max_steps=150)
    runs = [scan_model(checkpoint, tiny_world, tmp_path / f"s{i}", cfg=cfg) for i in range(2)]
    texts = [json.loads((tmp_path / f"s{i}" / "scan.json").read_text()) for i in range(2)]
    for t in texts:
        t.pop("seconds")
    assert texts[0] == texts[1] and runs[0]["pl1"] == runs[1]["pl1"]
    assert (tmp_path / "s0" / "trigger.png").read_bytes() == (tmp_path / "s1" / "trigger.png").read_bytes()
    other = scan_model(checkpoint, tiny_world, tmp_path / "s2", cfg=ModelScanConfig(max_images=8, max_steps=150, seed=1))
    assert other["pl1"] != runs[0]["pl1"]


def test_z_score_is_measured_on_images_the_trigger_never_saw(checkpoint, tiny_world, tmp_path, monkeypatch):
    seen = {}
    real_invert, real_z = model_scan.invert_trigger, model_scan.trigger_z_score

    def invert(encode, images, cfg, progress=None):
        seen["opt"] = images
        return real_invert(encode, images, cfg, progress)

    def z(encode, heldout, mask, pattern):
        seen["held"] = heldout
        return real_z(encode, heldout, mask, pattern)

    monkeypatch.setattr(model_scan, "invert_trigger", invert)
    monkeypatch.setattr(model_scan, "trigger_z_score", z)
    scan_model(checkpoint, tiny_world, tmp_path / "s", cfg=ModelScanConfig(max_images=8, max_steps=20))
    opt, held = ({sha256_pixels(x.numpy()) for x in seen[k]} for k in ("opt", "held"))
    assert len(opt) == 8 and len(held) == 8 and not opt & held


# ---------------------------------------------------------------- bad inputs

def test_missing_checkpoint_is_refused(bad_input, tiny_world, tmp_path):
    bad_input(["scan", "model", "--checkpoint", tmp_path / "nope", "--images", tiny_world, "--out", tmp_path / "o"],
              what="checkpoint folder does not exist", kind="missing input", expect=["checkpoint folder not found"])
    assert not (tmp_path / "o").exists()


def test_pt_only_checkpoint_is_refused(bad_input, checkpoint, tiny_world, tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "model.pt").write_bytes((checkpoint / "open_clip_pytorch_model.bin").read_bytes())
    bad_input(["scan", "model", "--checkpoint", d, "--images", tiny_world, "--out", tmp_path / "o"],
              what="checkpoint folder holds only a .pt file", kind="malformed input",
              expect=["not an open_clip local-dir checkpoint", "open_clip_config.json"])
    assert not (tmp_path / "o").exists()


def test_empty_image_root_is_refused(bad_input, checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    bad_input(["scan", "model", "--checkpoint", checkpoint, "--images", tmp_path / "empty", "--out", tmp_path / "o"],
              what="image folder is empty", kind="missing input", expect=["has no split 'test'"])
    assert not (tmp_path / "o").exists()


def test_fewer_than_two_images_is_refused(bad_input, checkpoint, tiny_world, tmp_path):
    bad_input(["scan", "model", "--checkpoint", checkpoint, "--images", tiny_world, "--out", tmp_path / "o",
               "--max-images", "1"], what="--max-images 1", kind="invalid value", expect=["at least 2 images"])
    assert not (tmp_path / "o").exists()
