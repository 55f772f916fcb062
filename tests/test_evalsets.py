"""Eval sets in either layout (CLIP_benchmark webdataset or ImageFolder), detected by load_evalset."""
import numpy as np
import pytest
from PIL import Image

from clip_poison.data.evalsets import default_templates, evalset_identity, evalset_layout, load_evalset, load_imagefolder_evalset, load_wds_evalset
from clip_poison.data.worldfolder import synthetic_probe_split
from clip_poison.io import UserError


def _tree(root, classes=("golden_retriever", "tabby_cat"), per_class=(3, 2), split=None, ext="png"):
    base = root / split if split else root
    rng = np.random.default_rng(0)
    pixels = {}
    for c, n in zip(classes, per_class):
        (base / c).mkdir(parents=True)
        for i in range(n):
            px = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(px).save(base / c / f"img{i}.{ext}")
            pixels[f"{c}/img{i}.{ext}"] = px
    return pixels


def test_imagefolder_with_split_names_classes_from_folders_and_interleaves(tmp_path):
    pixels = _tree(tmp_path, split="val")
    ev = load_evalset(tmp_path, "val")
    assert ev.classnames == ["golden retriever", "tabby cat"]
    # Round-robin over classes: the first max_n are balanced and image i never depends on max_n.
    assert ev.keys == ["golden_retriever/img0.png", "tabby_cat/img0.png", "golden_retriever/img1.png",
                       "tabby_cat/img1.png", "golden_retriever/img2.png"]
    assert ev.labels.tolist() == [0, 1, 0, 1, 0]
    for k, im in zip(ev.keys, ev.images):
        assert np.array_equal(im, pixels[k])  # lossless PNG round trip
    assert ev.templates == default_templates() and len(ev.templates) == 80
    assert ev.templates[0] == "a bad photo of a {c}."
    small = load_evalset(tmp_path, "val", max_n=3)
    assert small.keys == ev.keys[:3] and small.labels.tolist() == [0, 1, 0]


def test_imagefolder_without_split_classnames_txt_and_templates_file(tmp_path):
    _tree(tmp_path, classes=("n01", "n02"), per_class=(1, 1))
    (tmp_path / "classnames.txt").write_text("tench\ngoldfish\n")
    tpl = tmp_path / "prompts.txt"
    tpl.write_text("a photo of a {c}.\nitap of a {c}.\n")
    ev = load_imagefolder_evalset(tmp_path, "test", templates=tpl)
    assert ev.classnames == ["tench", "goldfish"] and ev.templates == ["a photo of a {c}.", "itap of a {c}."]
    assert evalset_layout(tmp_path, "test") == "imagefolder"


def test_load_evalset_detects_wds(tiny_world):
    a, b = load_evalset(tiny_world / "eval"), load_wds_evalset(tiny_world / "eval")
    assert a.keys == b.keys and a.split == "test" and evalset_layout(tiny_world / "eval") == "wds"


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "no split 'test'"),
    (lambda p: (p / "test" / "empty_class").mkdir(parents=True), "no split 'test'"),
])
def test_bad_roots_raise_teaching_errors(tmp_path, setup, match):
    root = tmp_path / "ev"
    setup(root)
    with pytest.raises(UserError, match=match) as e:
        load_evalset(root, "test")
    assert "--split" in str(e.value) or "pass" in str(e.value)


def test_classnames_txt_must_match_folders_and_templates_need_placeholder(tmp_path):
    _tree(tmp_path, per_class=(1, 1))
    (tmp_path / "classnames.txt").write_text("only one\n")
    with pytest.raises(UserError, match="one name per folder"):
        load_evalset(tmp_path)
    (tmp_path / "classnames.txt").write_text("dog\ncat\n")
    with pytest.raises(UserError, match="placeholder"):
        load_evalset(tmp_path, templates=["a photo"])


def test_identity_changes_with_keys_split_and_size(tiny_world):
    a = load_evalset(tiny_world / "eval")
    assert evalset_identity(a) == evalset_identity(load_evalset(tiny_world / "eval"))
    b = load_evalset(tiny_world / "eval", max_n=30)
    assert evalset_identity(a) != evalset_identity(b)
    a.keys = list(reversed(a.keys))
    assert evalset_identity(a)["keys_sha256"] != evalset_identity(load_evalset(tiny_world / "eval"))["keys_sha256"]


def test_synthetic_probe_split_is_labelled_balanced_and_disjoint(tiny_world):
    p = synthetic_probe_split(tiny_world, 40)
    ev = load_evalset(tiny_world / "eval")
    assert len(p) == 40 and p.classnames == ev.classnames and np.bincount(p.labels).tolist() == [4] * 10
    ev_hashes = {im.tobytes() for im in ev.images}
    assert not any(im.tobytes() in ev_hashes for im in p.images)
    assert np.array_equal(synthetic_probe_split(tiny_world, 40).images[0], p.images[0])  # seeded
    with pytest.raises(UserError, match="world.json"):
        synthetic_probe_split(tiny_world / "eval", 10)
