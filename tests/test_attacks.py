import numpy as np
import pytest

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.attacks.targeted import craft_targeted_poisons
from clip_poison.attacks.triggers import TRIGGERS, apply_trigger, make_trigger, trigger_position
from clip_poison.config import BackdoorConfig, TargetedConfig
from clip_poison.data.captions import mine_captions
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.io import UserError, load_image, rng_for, sha256_tree


def test_checkerboard_pixels_exact():
    p = make_trigger("checkerboard", 4)
    expected = np.array([[0, 255, 0, 255], [255, 0, 255, 0], [0, 255, 0, 255], [255, 0, 255, 0]], dtype=np.uint8)
    assert p.shape == (4, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(p[..., c], expected)


@pytest.mark.parametrize("size", [2, 4, 8, 16, 32])
def test_trigger_stamped_exactly_and_nothing_else_changes(size):
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for placement in ("consistent", "random"):
        pos = trigger_position(img.shape, size, placement, rng_for(0, "t"))
        out = apply_trigger(img, make_trigger("checkerboard", size), pos)
        y, x = pos
        np.testing.assert_array_equal(out[y:y + size, x:x + size], make_trigger("checkerboard", size))
        mask = np.ones(img.shape[:2], bool)
        mask[y:y + size, x:x + size] = False
        np.testing.assert_array_equal(out[mask], img[mask])
        if placement == "consistent":
            assert pos == (0, 0)


def test_patch_larger_than_image_is_a_user_error():
    with pytest.raises(UserError, match="does not fit"):
        trigger_position((32, 32, 3), 33, "consistent")


def test_mining_uses_whole_words_case_insensitively():
    caps = ["a Tent in the park", "tents", "contented cat", "TENT!", "my red tent", "tent-pole"]
    assert mine_captions(caps, "tent") == [0, 3, 4, 5]
    assert mine_captions(["golden  retriever pup", "golden hour"], "golden retriever") == [0]


def test_backdoor_poisons_count_pixels_and_manifest(tiny_world, tmp_path):
    train = read_csv_dataset(tiny_world / "train.csv")
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=7, patch_size=4), train, 32, tmp_path / "p")
    assert m["n_poisons"] == 7 and len(m["poisons"]) == 7
    assert len(read_csv_dataset(tmp_path / "p" / "poisons.csv")) == 7
    patch = make_trigger("checkerboard", 4)
    for rec in m["poisons"]:
        img = load_image(tmp_path / "p" / rec["file"])
        np.testing.assert_array_equal(img[:4, :4], patch)  # PNG kept the 1-px cells exact
        base = load_image(train.paths[rec["base_index"]])
        np.testing.assert_array_equal(img[4:], base[4:])
        assert "tent" in rec["caption"].lower()
        assert rec["caption"] in train.captions  # mined from the training data only


def test_targeted_poisons_are_noisy_copies_of_x_prime(tiny_world, tmp_path):
    train = read_csv_dataset(tiny_world / "train.csv")
    ev = load_wds_evalset(tiny_world / "eval")
    m = craft_targeted_poisons(TargetedConfig(n_poisons=5, noise_sigma=1.0), train, ev, tmp_path / "p")
    x = ev.images[m["target"]["eval_index"]].astype(int)
    assert ev.classnames[ev.labels[m["target"]["eval_index"]]] != "tent"
    hashes = {r["image_sha256"] for r in m["poisons"]}
    assert len(hashes) == 5  # every copy differs, so exact-match dedup keeps them all
    for r in m["poisons"]:
        img = load_image(tmp_path / "p" / r["file"]).astype(int)
        assert 0 < np.abs(img - x).mean() < 2.0


def test_same_seed_gives_byte_identical_poison_sets(tiny_world, tmp_path):
    train = read_csv_dataset(tiny_world / "train.csv")
    ev = load_wds_evalset(tiny_world / "eval")
    for attempt in ("a", "b"):
        craft_backdoor_poisons(BackdoorConfig(n_poisons=5, placement="random", seed=3), train, 32, tmp_path / f"b{attempt}")
        craft_targeted_poisons(TargetedConfig(n_poisons=5, seed=3), train, ev, tmp_path / f"t{attempt}")
    assert sha256_tree(tmp_path / "ba") == sha256_tree(tmp_path / "bb")
    assert sha256_tree(tmp_path / "ta") == sha256_tree(tmp_path / "tb")
    craft_backdoor_poisons(BackdoorConfig(n_poisons=5, placement="random", seed=4), train, 32, tmp_path / "bc")
    assert sha256_tree(tmp_path / "bc") != sha256_tree(tmp_path / "ba")


def test_poisoning_never_modifies_the_dataset(tiny_world, tmp_path):
    before = sha256_tree(tiny_world)
    train = read_csv_dataset(tiny_world / "train.csv")
    craft_backdoor_poisons(BackdoorConfig(n_poisons=9), train, 32, tmp_path / "p")
    craft_targeted_poisons(TargetedConfig(n_poisons=9), train, load_wds_evalset(tiny_world / "eval"), tmp_path / "q")
    assert sha256_tree(tiny_world) == before


def test_unknown_label_leaves_no_output(tiny_world, tmp_path):
    train = read_csv_dataset(tiny_world / "train.csv")
    with pytest.raises(UserError, match="no training caption contains"):
        craft_backdoor_poisons(BackdoorConfig(target_label="zebra"), train, 32, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    assert not list(tmp_path.iterdir())  # not even a temporary folder


def test_trigger_registry_is_open():
    assert "checkerboard" in TRIGGERS
    with pytest.raises(UserError, match="unknown trigger"):
        make_trigger("smiley", 4)
