"""Full-image triggers beside the checkerboard patch: blended (Chen et al. 2017) and SIG (Barni et
al. 2019) — pixels by hand, placement, determinism, crafting, the CLI and evaluation on them."""
import json

import numpy as np
import open_clip
import pytest
import torch

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.attacks.triggers import FULL_IMAGE_TRIGGERS, Trigger, get_trigger, load_trigger
from clip_poison.cli import main
from clip_poison.config import BackdoorConfig
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.io import UserError, load_image, read_manifest, rng_for, sha256_tree
from clip_poison.victims.export import export_local_dir
from clip_poison.victims.models import model_config

FULL = ("blended", "sig")


def _grey(rows) -> np.ndarray:
    return np.repeat(np.array(rows, dtype=np.uint8)[..., None], 3, axis=2)


def test_blended_pixels_by_hand():
    k = _grey([[0, 255], [200, 10]])
    t = Trigger("blended", k, FULL_IMAGE_TRIGGERS["blended"].mix)
    x = _grey([[3, 1], [100, 250]])
    # round(0.2·k + 0.8·x): 0 + 2.4 → 2, 51 + 0.8 → 52, 40 + 80 = 120, 2 + 200 = 202
    np.testing.assert_array_equal(t.stamp(x, (0, 0)), _grey([[2, 52], [120, 202]]))
    # shifted by (dy, dx) = (0, 1), k's columns wrap: [[255, 0], [10, 200]] → 53.4, 0.8, 82, 240
    np.testing.assert_array_equal(t.stamp(x, (0, 1)), _grey([[53, 1], [82, 240]]))
    np.testing.assert_array_equal(x, _grey([[3, 1], [100, 250]]))  # the input is not modified


def test_blended_pattern_is_fixed_uniform_noise_at_the_input_size():
    k = get_trigger("blended", 4, 32).pixels
    assert k.shape == (32, 32, 3) and k.dtype == np.uint8
    assert np.array_equal(k, get_trigger("blended", 16, 32).pixels)  # one k whatever the patch size or call
    assert k.min() < 5 and k.max() > 250 and abs(k.mean() - 127.5) < 8 and len(np.unique(k)) > 200
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    stamped = get_trigger("blended", 4, 32).stamp(x, (0, 0))
    np.testing.assert_array_equal(stamped, np.rint(0.2 * k.astype(float) + 0.8 * x).astype(np.uint8))


def test_sig_pixels_by_hand():
    t = get_trigger("sig", 4, 8)
    # v(j) = 20·sin(2π·j·6/8) = 20·sin(3πj/2): 0, -20, 0, 20, 0, -20, 0, 20 — on every row and channel
    assert t.pixels.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(t.pixels[..., c], np.tile([0, -20, 0, 20, 0, -20, 0, 20], (8, 1)))
    x = _grey([[10, 10, 250, 250, 100, 100, 100, 100]] * 8)
    np.testing.assert_array_equal(t.stamp(x, (0, 0)), _grey([[10, 0, 250, 255, 100, 80, 100, 120]] * 8))  # clipped
    # a shift of dx = 1 is a phase shift (v rolls right: 20, 0, -20, 0, ...); dy moves nothing
    shifted = _grey([[30, 10, 230, 250, 120, 100, 80, 100]] * 8)
    np.testing.assert_array_equal(t.stamp(x, (0, 1)), shifted)
    np.testing.assert_array_equal(t.stamp(x, (5, 1)), shifted)


@pytest.mark.parametrize("name", FULL)
def test_random_placement_shifts_the_pattern_and_is_seeded(name):
    t = get_trigger(name, 4, 32)
    assert t.position((32, 32, 3), "consistent", rng_for(0, "p")) == (0, 0)
    draws = [t.position((32, 32, 3), "random", rng) for rng in [rng_for(0, "p")] for _ in range(50)]
    assert draws == [t.position((32, 32, 3), "random", rng) for rng in [rng_for(0, "p")] for _ in range(50)]
    assert draws != [t.position((32, 32, 3), "random", rng) for rng in [rng_for(1, "p")] for _ in range(50)]
    ys, xs = zip(*draws)
    assert min(ys + xs) >= 0 and max(ys + xs) <= 31 and len(set(xs)) > 20 and len(set(ys)) > 20
    x = np.full((32, 32, 3), 128, np.uint8)
    dy, dx = 3, 7
    np.testing.assert_array_equal(t.stamp(x, (dy, dx)), np.roll(t.stamp(x, (0, 0)), (dy, dx), axis=(0, 1)))
    assert not np.array_equal(t.stamp(x, (dy, dx)), t.stamp(x, (0, 0)))
    with pytest.raises(UserError, match="unknown placement"):
        t.position((32, 32, 3), "corner")


@pytest.mark.parametrize("name", FULL)
def test_crafting_with_a_full_image_trigger(name, tiny_world, tmp_path):
    train = read_csv_dataset(tiny_world / "train.csv")
    before = sha256_tree(tiny_world)
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=5, trigger=name, placement="random"), train, 32, tmp_path / "p")
    assert m["trigger"] == read_manifest(tmp_path / "p")["trigger"]  # JSON keeps the entry as it is
    tr = m["trigger"]
    assert (tr["name"], tr["patch_size"], tr["full_image"], tr["image_size"]) == (name, None, True, 32)
    assert tr["params"] == ({"alpha": 0.2, "pattern_seed": 0} if name == "blended" else {"delta": 20, "f": 6})
    pattern = get_trigger(name, 4, 32).pixels
    for rec in m["poisons"]:
        img, base = load_image(tmp_path / "p" / rec["file"]), load_image(train.paths[rec["base_index"]])
        p = np.roll(pattern, rec["position"], axis=(0, 1)).astype(float)
        # the paper's formulas, written out here: x' = round(α·k + (1−α)·x), or clip(x + v)
        want = np.rint(0.2 * p + 0.8 * base) if name == "blended" else np.clip(base + p, 0, 255)
        np.testing.assert_array_equal(img, want.astype(np.uint8))
        assert (img != base).any(axis=2).mean() > 0.5  # the whole image carries the trigger, not a corner
        assert "tent" in rec["caption"].lower() and rec["caption"] in train.captions
    assert len({tuple(r["position"]) for r in m["poisons"]}) > 1
    assert sha256_tree(tiny_world) == before


@pytest.mark.parametrize("name", FULL)
def test_full_image_poison_sets_are_deterministic_and_ignore_patch_size(name, tiny_world, tmp_path):
    def craft(out, seed=3, patch_size=4):
        return craft_backdoor_poisons(BackdoorConfig(n_poisons=5, trigger=name, placement="random", seed=seed,
                                                     patch_size=patch_size), tiny_world / "train.csv", 32, tmp_path / out)
    craft("a"), craft("b"), craft("c", seed=4)
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    assert sha256_tree(tmp_path / "c") != sha256_tree(tmp_path / "a")
    big = craft("d", patch_size=64)  # a 64 px patch does not fit a 32 px input; a full-image trigger has none
    a = read_manifest(tmp_path / "a")
    assert [p["image_sha256"] for p in big["poisons"]] == [p["image_sha256"] for p in a["poisons"]]
    assert big["trigger"] == a["trigger"] and big["config"]["patch_size"] == 64


def test_unknown_trigger_is_a_user_error_before_any_output(tiny_world, tmp_path):
    with pytest.raises(UserError, match="unknown trigger 'smiley'; available") as e:
        craft_backdoor_poisons(BackdoorConfig(trigger="smiley"), tiny_world / "train.csv", 32, tmp_path / "p")
    assert all(repr(n) in str(e.value) for n in ("blended", "checkerboard", "sig"))
    assert not list(tmp_path.iterdir())


def test_cli_lists_crafts_and_evaluates_full_image_triggers(tiny_world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["poison", "backdoor", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(n in help_text for n in ("{blended,checkerboard,sig}", "α = 0.2", "Δ = 20, f = 6"))
    for name in FULL:
        assert main(["poison", "backdoor", "--data", str(tiny_world / "train.csv"), "--n-poisons", "3",
                     "--trigger", name, "--out", str(tmp_path / name)]) == 0
        assert read_manifest(tmp_path / name)["trigger"]["name"] == name
    assert f"full-image sig {{'delta': 20, 'f': 6}} (consistent)" in capsys.readouterr().out
    torch.manual_seed(0)
    export_local_dir(model_config("rn-tiny-32"), open_clip.create_model("rn-tiny-32").state_dict(), tmp_path / "ck")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ck"), "--eval-root", str(tiny_world / "eval"),
                 "--poisons", str(tmp_path / "blended"), str(tmp_path / "sig"), "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "backdoor (blended) → 'tent': ASR" in out and "backdoor (sig) → 'tent': ASR" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert [b["trigger"]["name"] for b in r["backdoor"]] == list(FULL)
    for b in r["backdoor"]:
        for placement in ("consistent", "random"):
            assert 0 <= b[placement]["asr"] <= 1 and np.isfinite(b[placement]["z"]["z"])
        # the trigger really reached the model: triggered pairs are not the clean pairs
        assert b["consistent"]["z"]["triggered_mean"] != b["consistent"]["z"]["clean_mean"]
        assert b["consistent"]["z"] != b["random"]["z"]


def test_evaluation_refuses_a_full_image_trigger_this_code_does_not_define(tiny_world, tmp_path):
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=2, trigger="blended"), tiny_world / "train.csv", 32, tmp_path / "p")
    assert load_trigger(m["trigger"], 32).params == {"alpha": 0.2, "pattern_seed": 0}
    for bad in ({"params": {"alpha": 0.1, "pattern_seed": 0}}, {"pattern_sha256": "0" * 64}):
        with pytest.raises(UserError, match="re-craft the poison set"):
            load_trigger({**m["trigger"], **bad}, 32)
