import numpy as np

from clip_poison.config import WorldConfig
from clip_poison.data.captions import mine_captions
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.io import sha256_tree
from clip_poison.data.world import CAPTION_TEMPLATES, CLASSES, EVAL_TEMPLATES, make_split, write_world


def test_world_layout_and_sizes(tiny_world):
    train = read_csv_dataset(tiny_world / "train.csv")
    ev = load_wds_evalset(tiny_world / "eval")
    assert len(train) == 300 and len(ev) == 60
    assert len(ev.classnames) >= 10 and ev.templates
    assert train.load(0).shape == (32, 32, 3)
    assert set(np.unique(ev.labels)) == set(range(10))


def test_same_seed_same_bytes(tmp_path):
    cfg = WorldConfig(seed=5, n_train=40, n_eval=20)
    write_world(cfg, tmp_path / "a")
    write_world(cfg, tmp_path / "b")
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    write_world(WorldConfig(seed=6, n_train=40, n_eval=20), tmp_path / "c")
    assert sha256_tree(tmp_path / "a") != sha256_tree(tmp_path / "c")


def test_captions_mention_the_class_word_only_in_part():
    cfg = WorldConfig(seed=0, n_train=2000)
    split = make_split(cfg, "train", 2000)
    names = list(CLASSES)
    own = np.mean([bool(mine_captions([c], names[y])) for c, y in zip(split.captions, split.labels)])
    # p_class_word = 0.6 of the 90 % non-noisy pairs, minus nothing: about 0.54
    assert 0.45 < own < 0.63
    assert any(not any(mine_captions([c], n) for n in names) for c in split.captions)  # synonyms / context only


def test_training_captions_never_use_eval_prompts():
    stems = {t.replace("{c}", "").replace(".", "").strip() for t in EVAL_TEMPLATES}
    for t in CAPTION_TEMPLATES:
        assert t.replace("{o}", "").strip() not in stems
    split = make_split(WorldConfig(seed=0), "train", 500)
    assert not any(c.startswith("a photo of") for c in split.captions)
