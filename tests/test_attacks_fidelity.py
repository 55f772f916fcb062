"""Attack fidelity (§3.1, §3.3, §5.1): caption sets, dedup evasion, multi-target sets, replace
mode, held-out base pools, the caption index, and teaching errors for bad input."""

import numpy as np
import pytest

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.attacks.evasion import exact_dedup, psnr
from clip_poison.io import read_manifest
from clip_poison.data.sources import CsvTrainingData, caption_index
from clip_poison.data.sources import caption_set
from clip_poison.attacks.targeted import craft_multi_targeted_poisons, craft_targeted_poisons
from clip_poison.attacks.triggers import scaled_patch_size
from clip_poison.cli import main
from clip_poison.config import BackdoorConfig, CraftOptions, TargetedConfig
from clip_poison.data.captions import CaptionIndex, mine_captions, normalise_caption
from clip_poison.data.csvdata import read_csv_dataset, write_csv_dataset
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.io import UserError, load_image, sha256_pixels
from clip_poison.victims.openclip_train import training_rows


@pytest.fixture(scope="module")
def train(tiny_world):
    return read_csv_dataset(tiny_world / "train.csv")


@pytest.fixture(scope="module")
def ev(tiny_world):
    return load_wds_evalset(tiny_world / "eval")


def test_caption_index_answers_exactly_like_the_regex_scan():
    caps = ["a Tent in the park", "tents", "contented cat", "TENT!", "my red tent", "tent-pole", "golden  retriever",
            "Golden\tRetriever pup", "goldenretriever", "café tent", "une tenté", "a teepee", ""]
    idx = CaptionIndex.build([caps[:5], caps[5:]])
    for label, syn in [("tent", ()), ("golden retriever", ()), ("tent", ("teepee",)), ("café", ()), ("t", ())]:
        assert idx.rows(label, syn).tolist() == mine_captions(caps, label, syn)


def test_caption_index_is_saved_outside_the_dataset_and_reused(train, tmp_path):
    data = CsvTrainingData(train.csv_path)
    idx = caption_index(data, tmp_path / "idx.parquet")
    again = CsvTrainingData(train.csv_path)
    reused = caption_index(again, tmp_path / "idx.parquet")
    assert reused.fingerprint == idx.fingerprint and len(reused) == len(train)
    assert reused.rows("tent").tolist() == mine_captions(train.captions, "tent")


def test_mined_caption_set_includes_synonyms(train):
    plain = caption_set("mined", "tent", train)
    more = caption_set("mined", "tent", train, synonyms=("teepee", "shelter"))
    assert set(plain) < set(more)
    assert any("teepee" in c.lower() for c in more) and not any("teepee" in c.lower() for c in plain)


def test_template_caption_set_is_clips_80_prompts(train):
    caps = caption_set("templates", "tent", train)
    assert len(caps) == 80 and len(set(caps)) == 80 and all("tent" in c for c in caps)


@pytest.mark.parametrize("n", [1, 512])
def test_targeted_poison_counts_1_to_512(train, ev, tmp_path, n):
    m = craft_targeted_poisons(TargetedConfig(n_poisons=n, caption_source="templates"), train, ev, tmp_path / "p")
    assert m["n_poisons"] == n and len(read_csv_dataset(tmp_path / "p" / "poisons.csv")) == n
    assert m["target"]["label"] == "tent" and m["targets"][0]["caption_set"]["repeated"] == (n > 80)


def test_exact_dedup_removes_no_poison_and_noise_is_imperceptible(train, ev, tmp_path):
    # 200 poisons from an 80-caption set: captions repeat unless evasion makes them unique.
    opts = CraftOptions(caption_substitution=0.3, filler_words=1)
    m = craft_targeted_poisons(TargetedConfig(n_poisons=200, caption_source="templates", noise_sigma=1.0), train, ev,
                               tmp_path / "p", options=opts)
    imgs = [load_image(tmp_path / "p" / r["file"]) for r in m["poisons"]]
    caps = [r["caption"] for r in m["poisons"]]
    assert [sha256_pixels(i) for i in imgs] == [r["image_sha256"] for r in m["poisons"]]
    # X ∪ P through an exact-match filter: every poison survives.
    clean_hashes = [sha256_pixels(load_image(p)) for p in train.paths]
    keep = exact_dedup(clean_hashes + [sha256_pixels(i) for i in imgs], train.captions + caps)
    assert set(range(len(train), len(train) + 200)) <= set(keep)
    assert all("tent" in c.lower() for c in caps) and all(r["caption_edits"] for r in m["poisons"])
    x = ev.images[m["target"]["eval_index"]]
    assert min(psnr(x, i) for i in imgs) > 40.0  # σ = 1 is invisible
    # Without evasion the same set loses poisons to the caption filter, so the check above can fail.
    m0 = craft_targeted_poisons(TargetedConfig(n_poisons=200, caption_source="templates", noise_sigma=0.0), train, ev,
                                tmp_path / "q")
    kept0 = exact_dedup([r["image_sha256"] for r in m0["poisons"]], [r["caption"] for r in m0["poisons"]])
    assert len(kept0) == 1


def test_backdoor_captions_evade_dedup_against_the_mined_training_captions(train, tmp_path):
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=20), train, 32, tmp_path / "b",
                               options=CraftOptions(filler_words=1))
    clean = {normalise_caption(c) for c in train.captions}
    assert not any(normalise_caption(r["caption"]) in clean for r in m["poisons"])
    m0 = craft_backdoor_poisons(BackdoorConfig(n_poisons=20), train, 32, tmp_path / "b0")
    assert all(normalise_caption(r["caption"]) in clean for r in m0["poisons"])


def test_multi_target_set_keeps_targets_isolated(train, ev, tmp_path):
    cfgs = [TargetedConfig(target_label="tent", n_poisons=6), TargetedConfig(target_label="pizza", n_poisons=4)]
    m = craft_multi_targeted_poisons(cfgs, train, ev, tmp_path / "p")
    assert [t["label"] for t in m["targets"]] == ["tent", "pizza"] and "target" not in m
    assert m["targets"][0]["eval_index"] != m["targets"][1]["eval_index"]
    for r in m["poisons"]:
        t = m["targets"][r["target_id"]]
        img = load_image(tmp_path / "p" / r["file"]).astype(int)
        own = ev.images[t["eval_index"]].astype(int)
        other = ev.images[m["targets"][1 - r["target_id"]]["eval_index"]].astype(int)
        assert np.abs(img - own).mean() < 2 < np.abs(img - other).mean()
        assert t["label"] in r["caption"].lower() and r["target_label"] == t["label"]
    assert sum(r["target_id"] == 0 for r in m["poisons"]) == 6


def test_targets_may_not_share_a_label_or_an_image(train, ev, tmp_path):
    with pytest.raises(UserError, match="share a label"):
        craft_multi_targeted_poisons([TargetedConfig(target_label="tent"), TargetedConfig(target_label="tent")],
                                     train, ev, tmp_path / "p")
    i = int(np.flatnonzero((ev.labels != ev.classnames.index("tent")) & (ev.labels != ev.classnames.index("pizza")))[0])
    with pytest.raises(UserError, match="share an image"):
        craft_multi_targeted_poisons([TargetedConfig(target_label="tent", target_index=i),
                                      TargetedConfig(target_label="pizza", target_index=i)], train, ev, tmp_path / "p")
    assert not list(tmp_path.iterdir())


def test_replace_mode_records_rows_and_training_drops_them(train, tiny_world, tmp_path):
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=10), train, 32, tmp_path / "r", options=CraftOptions(mode="replace"))
    assert m["mode"] == "replace" and len(m["replaces"]) == 10 == len(set(m["replaces"]))
    paths, caps, n_clean, _ = training_rows(tiny_world / "train.csv", [tmp_path / "r"])
    assert n_clean == len(train) - 10 and len(paths) == len(train)
    dropped = {train.paths[i] for i in m["replaces"]}
    assert not dropped & set(paths[:n_clean])
    add = craft_backdoor_poisons(BackdoorConfig(n_poisons=10), train, 32, tmp_path / "a")
    assert add["mode"] == "add" and add["replaces"] == []
    assert len(training_rows(tiny_world / "train.csv", [tmp_path / "a"])[0]) == len(train) + 10


def test_backdoor_base_images_from_a_held_out_pool(train, tmp_path):
    rng = np.random.default_rng(0)
    pool_imgs = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(12)]
    write_csv_dataset(tmp_path / "pool" / "pool.csv", pool_imgs, ["x"] * 12, image_dir="img")
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=5), train, 32, tmp_path / "p",
                               options=CraftOptions(base_pool=str(tmp_path / "pool" / "pool.csv")))
    assert m["base_pool"]["n_rows"] == 12
    for r in m["poisons"]:
        assert r["base_source"] == "pool" and r["caption"] in train.captions  # captions still from X


def test_scaled_patch_size_keeps_the_papers_fraction():
    assert scaled_patch_size(224) == 16 and scaled_patch_size(32) == 2 and scaled_patch_size(448) == 32
    assert scaled_patch_size(32, 32) == 5 and scaled_patch_size(8, 1) == 1


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_count_above_caption_set_without_repeat_fails_cleanly(capsys, tiny_world, tmp_path):
    rc, err = run(capsys, "poison", "targeted", "--data", tiny_world / "train.csv", "--eval-root", tiny_world / "eval",
                  "--caption-source", "templates", "--n-poisons", "81", "--no-repeat-captions", "--out", tmp_path / "p")
    assert rc == 2 and "only 80 captions" in err and "--n-poisons" in err
    assert not list(tmp_path.iterdir())


def test_backdoor_count_above_dataset_fails_cleanly(capsys, tiny_world, tmp_path):
    rc, err = run(capsys, "poison", "backdoor", "--data", tiny_world / "train.csv", "--n-poisons", "301",
                  "--out", tmp_path / "p")
    assert rc == 2 and "301" in err and "lower it" in err
    assert not list(tmp_path.iterdir())


def test_unknown_eval_label_fails_cleanly(capsys, tiny_world, tmp_path):
    rc, err = run(capsys, "poison", "targeted", "--data", tiny_world / "train.csv", "--eval-root", tiny_world / "eval",
                  "--label", "zebra", "--out", tmp_path / "p")
    assert rc == 2 and "zebra" in err and "choose one of" in err
    assert not list(tmp_path.iterdir())


def test_label_and_index_counts_must_agree(capsys, tiny_world, tmp_path):
    rc, err = run(capsys, "poison", "targeted", "--data", tiny_world / "train.csv", "--eval-root", tiny_world / "eval",
                  "--label", "tent", "pizza", "--target-index", "3", "--out", tmp_path / "p")
    assert rc == 2 and "one index per label" in err
    assert not list(tmp_path.iterdir())


def test_cli_multi_target_and_evasion_flags(capsys, tiny_world, tmp_path):
    rc = main(["poison", "targeted", "--data", str(tiny_world / "train.csv"), "--eval-root", str(tiny_world / "eval"),
               "--label", "tent", "pizza", "--n-poisons", "3", "--filler-words", "1", "--synonyms", "teepee",
               "--out", str(tmp_path / "p")])
    assert rc == 0
    m = read_manifest(tmp_path / "p")
    assert m["n_poisons"] == 6 and [t["label"] for t in m["targets"]] == ["tent", "pizza"]
    assert m["options"]["synonyms"] == ["teepee"] and m["options"]["filler_words"] == 1


def test_caption_index_inside_the_dataset_is_refused(capsys, tiny_world, tmp_path):
    rc, err = run(capsys, "poison", "backdoor", "--data", tiny_world / "train.csv", "--n-poisons", "2",
                  "--caption-index", tiny_world / "idx.parquet", "--out", tmp_path / "p")
    assert rc == 2 and "inside the dataset folder" in err
    assert not (tiny_world / "idx.parquet").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("attack", ["targeted", "backdoor", "text"])
def test_poison_subcommands_have_help_with_an_example(attack, capsys):
    with pytest.raises(SystemExit) as e:
        main(["poison", attack, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "example:" in out and f"clip-poison poison {attack}" in out
    flat = " ".join(out.split())
    assert "--mode" in flat and "--synonyms" in flat and "(default: add)" in flat


def test_fast_backend_explains_it_needs_csv(tmp_path):
    with pytest.raises(UserError, match="--backend open_clip_train"):
        training_rows(str(tmp_path / "{0..3}.tar"), [])
