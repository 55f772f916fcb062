"""§2.3 text-side poisoning: t' paired with images of y', and its metrics (retrieval rank and
nearest class centroid), plus evaluation of multi-target manifests."""
import numpy as np
import pytest

from clip_poison.attacks.targeted import craft_multi_targeted_poisons
from clip_poison.attacks.text import craft_text_poisons
from clip_poison.cli import main
from clip_poison.config import CraftOptions, TargetedConfig, TextConfig
from clip_poison.data.captions import label_pattern
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.io import UserError, load_image
from clip_poison.metrics import text_attack


@pytest.fixture(scope="module")
def train(tiny_world):
    return read_csv_dataset(tiny_world / "train.csv")


def test_text_poisons_pair_t_prime_with_mined_images_of_y(train, tmp_path):
    m = craft_text_poisons(TextConfig(caption="a photo of my backyard", target_label="tent", n_poisons=8), train,
                           tmp_path / "x")
    assert m["attack"] == "text" and m["target"] == {"label": "tent", "caption": "a photo of my backyard"}
    pat = label_pattern("tent")
    rows = [r["base_index"] for r in m["poisons"]]
    assert len(set(rows)) == 8
    for r in m["poisons"]:
        assert r["caption"] == "a photo of my backyard"
        assert pat.search(train.captions[r["base_index"]])  # an image whose own caption names y'
        np.testing.assert_array_equal(load_image(tmp_path / "x" / r["file"]), train.load(r["base_index"]))


def test_text_poison_count_above_mined_images_fails_cleanly(capsys, tiny_world, tmp_path):
    rc = main(["poison", "text", "--data", str(tiny_world / "train.csv"), "--caption", "my backyard",
               "--label", "tent", "--n-poisons", "5000", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "5000" in err and "--n-poisons" in err
    assert not list(tmp_path.iterdir())


def test_text_caption_that_already_names_y_is_refused(train, tmp_path):
    with pytest.raises(UserError, match="already names"):
        craft_text_poisons(TextConfig(caption="my tent", target_label="tent"), train, tmp_path / "x")


def test_text_metrics_on_constructed_embeddings():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    centres = np.linalg.qr(rng.normal(size=(16, 4)))[0].T  # 4 orthonormal class directions
    img = centres[labels] + 0.1 * rng.normal(size=(100, 16))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    on_target = centres[2]
    r = text_attack.evaluate(on_target, img, labels, target=2)
    assert r["centroid"]["success"] and r["centroid"]["predicted"] == 2 and r["r_precision"] == 1.0
    assert r["precision_at"]["10"] == 1.0 and r["best_rank"] == 1 and r["median_rank"] == 13
    off = text_attack.evaluate(centres[0], img, labels, target=2)
    assert not off["centroid"]["success"] and off["r_precision"] == 0.0 and off["median_rank"] > 50


def _random_checkpoint(path):
    import open_clip

    from clip_poison.victims.export import export_local_dir
    from clip_poison.victims.models import model_config, register_victims

    register_victims()
    model = open_clip.create_model("rn-tiny-32")
    export_local_dir(model_config("rn-tiny-32"), model.state_dict(), path)
    return path


def test_evaluate_scores_text_attacks_and_every_target(train, tiny_world, tmp_path):
    from clip_poison.metrics.evaluate import evaluate_checkpoint

    ev = load_wds_evalset(tiny_world / "eval")
    mt = craft_multi_targeted_poisons([TargetedConfig(target_label="tent", n_poisons=2),
                                       TargetedConfig(target_label="pizza", n_poisons=2)], train, ev, tmp_path / "t")
    mx = craft_text_poisons(TextConfig(n_poisons=3), train, tmp_path / "x", options=CraftOptions())
    r = evaluate_checkpoint(_random_checkpoint(tmp_path / "ckpt"), ev, [mt, mx], cache_dir=False)
    assert [(t["target_id"], t["label"], t["eval_index"]) for t in r["targeted"]] == \
        [(t["target_id"], t["label"], t["eval_index"]) for t in mt["targets"]]
    (x,) = r["text"]
    assert x["caption"] == mx["target"]["caption"] and x["n_images"] == len(ev)
    assert x["n_target_images"] == int((ev.labels == ev.classnames.index("tent")).sum())
    assert 1 <= x["centroid"]["target_rank"] <= len(ev.classnames)
