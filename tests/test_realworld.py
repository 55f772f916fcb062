"""The real-photo world (data/realworld.py): web-like captions on a labelled photo set."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clip_poison.cli import main
from clip_poison.data.captions import label_pattern
from clip_poison.data.evalsets import write_wds_evalset
from clip_poison.data.realworld import count_eval_prompt_matches, load_lexicon, make_real_captions, PHOTO_TEMPLATES, write_real_world
from clip_poison.config import RealWorldConfig
from clip_poison.data.worldfolder import load_world_evalset, read_train_labels
from clip_poison.io import decode_image, sha256_bytes, sha256_pixels, sha256_tree

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-wds"
# The 18 CLIP prompts of CLIP_benchmark's CIFAR-10 (zeroshot_classification_templates.txt).
CIFAR_PROMPTS = [f"a {adj}photo of {art} {{c}}." for art in ("a", "the") for adj in
                 ("", "blurry ", "black and white ", "low contrast ", "high contrast ", "bad ", "good ")] + \
                ["a photo of a small {c}.", "a photo of a big {c}.", "a photo of the small {c}.", "a photo of the big {c}."]


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny CIFAR-named source in CLIP_benchmark's layout: 120 train and 40 test photos."""
    root = tmp_path_factory.mktemp("src") / "wds"
    labels = np.arange(120) % 10
    write_wds_evalset(root, _images(120, 0), labels, CIFAR, CIFAR_PROMPTS, split="train", shard_size=50)
    write_wds_evalset(root, _images(40, 1), np.arange(40) % 10, CIFAR, CIFAR_PROMPTS, split="test")
    return root


def _shard_members(split_dir: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                out[m.name] = tf.extractfile(m).read()
    return out


def test_same_seed_same_bytes(source, tmp_path):
    cfg = RealWorldConfig(root=str(source), seed=3, n_train=60)
    write_real_world(cfg, tmp_path / "a")
    write_real_world(cfg, tmp_path / "b")
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    write_real_world(RealWorldConfig(root=str(source), seed=4, n_train=60), tmp_path / "c")
    assert (tmp_path / "a" / "train.csv").read_bytes() != (tmp_path / "c" / "train.csv").read_bytes()


def test_caption_generator_is_deterministic_per_seed():
    lex = load_lexicon(None, CIFAR)
    labels = np.arange(500) % 10
    a = make_real_captions(labels, CIFAR, lex, RealWorldConfig(seed=7))
    assert a == make_real_captions(labels, CIFAR, lex, RealWorldConfig(seed=7))
    assert a != make_real_captions(labels, CIFAR, lex, RealWorldConfig(seed=8))


def test_photos_are_the_source_bytes_unchanged_and_labels_match(source, tmp_path):
    info = write_real_world(RealWorldConfig(root=str(source), seed=0, n_train=50), tmp_path / "w")
    members = _shard_members(source / "train")
    meta = read_train_labels(tmp_path / "w")
    assert len(meta) == 50 == info["n_train"]
    for row in meta.itertuples():
        data = (tmp_path / "w" / row.filepath).read_bytes()
        assert data == members[f"{row.source_key}.png"]
        assert int(members[f"{row.source_key}.cls"].decode()) == row.label
    assert "unchanged" in info["images"]
    assert info["source"]["sha256"] and info["eval_root"] == str(source.resolve()) and info["eval_split"] == "test"


@pytest.mark.parametrize("p_class_word", [0.6, 0.2])
def test_class_word_fraction_within_tolerance(p_class_word):
    lex = load_lexicon(None, CIFAR)
    labels = np.arange(4000) % 10
    cfg = RealWorldConfig(seed=0, p_class_word=p_class_word, p_synonym=0.3, p_noisy_pair=0.1)
    caps, kinds = make_real_captions(labels, CIFAR, lex, cfg)
    own = np.mean([bool(label_pattern(CIFAR[y]).search(c)) for c, y in zip(caps, labels)])
    expected = (1 - cfg.p_noisy_pair) * p_class_word  # noisy pairs name another class or none
    assert abs(own - expected) < 0.03, (own, expected)
    # Synonym captions never leak their own class word.
    assert not any(label_pattern(CIFAR[y]).search(c) for c, y, k in zip(caps, labels, kinds) if k == "synonym")
    noisy = np.mean([k.startswith("noisy") for k in kinds])
    assert abs(noisy - 0.1) < 0.02


def test_training_captions_disjoint_from_eval_prompts():
    if (SHARED / "zeroshot_classification_templates.txt").is_file():
        shipped = [t.strip() for t in (SHARED / "zeroshot_classification_templates.txt").read_text().splitlines() if t.strip()]
        assert sorted(shipped) == sorted(CIFAR_PROMPTS)
    stems = {t.replace("{c}", "").replace(".", "").strip() for t in CIFAR_PROMPTS}
    assert not any(t.replace("{o}", "").strip() in stems for t in PHOTO_TEMPLATES)
    caps, _ = make_real_captions(np.arange(5000) % 10, CIFAR, load_lexicon(None, CIFAR), RealWorldConfig(seed=1))
    assert count_eval_prompt_matches(caps, CIFAR_PROMPTS) == 0
    assert not any("photo of" in c for c in caps)
    # The check itself can fail: a prompt-shaped caption is caught.
    assert count_eval_prompt_matches(["a photo of a big ship.", "my ship"], CIFAR_PROMPTS) == 1


def test_train_pairs_never_come_from_the_test_split(source, tmp_path):
    write_real_world(RealWorldConfig(root=str(source), seed=0), tmp_path / "w")  # the whole train split
    train = {sha256_bytes(p.read_bytes()) for p in (tmp_path / "w" / "train").iterdir()}
    test = {sha256_bytes(v) for k, v in _shard_members(source / "test").items() if k.endswith(".png")}
    assert len(train) == 120 and train.isdisjoint(test)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/cifar10-wds")
def test_cifar10_train_and_test_disjoint_by_image_hash(tmp_path):
    """On the real CIFAR-10: 500 captioned train photos vs the first 1,000 test photos (by pixels)."""
    info = write_real_world(RealWorldConfig(root=str(SHARED), seed=0, n_train=500), tmp_path / "w")
    assert info["eval_prompt_matches"] == 0 and info["source"]["n_available"] == 50_000
    train = {sha256_pixels(decode_image((tmp_path / "w" / p).read_bytes()))
             for p in pd.read_csv(tmp_path / "w" / "train.csv")["filepath"]}
    ev = load_world_evalset(tmp_path / "w", max_n=1000)
    assert len(train) == 500 and train.isdisjoint({sha256_pixels(im) for im in ev.images})


def test_imagefolder_source(tmp_path):
    root = tmp_path / "folder"
    for ci, c in enumerate(["cat", "dog"]):
        (root / c).mkdir(parents=True)
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(_images(1, 10 * ci + i)[0]).save(buf, format="JPEG")
            (root / c / f"{i}.jpg").write_bytes(buf.getvalue())
    lex = tmp_path / "lex.yaml"
    lex.write_text("classes:\n  cat: {synonyms: [kitten]}\n  dog: {synonyms: [puppy], contexts: [at the park]}\n")
    assert main(["world", "real", "--root", str(root), "--lexicon", str(lex), "--out", str(tmp_path / "w")]) == 0
    info = json.loads((tmp_path / "w" / "world.json").read_text())
    meta = read_train_labels(tmp_path / "w")
    assert info["classnames"] == ["cat", "dog"] and info["eval_root"] is None and len(meta) == 12
    assert sorted(meta["label"].tolist()) == [0] * 6 + [1] * 6


def _no_output(out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def test_root_without_classnames_fails_with_a_fix(source, tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "train").mkdir(parents=True)
    (bad / "train" / "0.tar").write_bytes((source / "train" / "0.tar").read_bytes())
    out = tmp_path / "out"
    assert main(["world", "cifar10", "--root", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "classnames.txt" in err and "one class name per line" in err
    assert _no_output(out)


def test_empty_split_fails_with_a_fix(tmp_path, capsys):
    root = tmp_path / "empty"
    (root / "train").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(CIFAR) + "\n")
    out = tmp_path / "out"
    assert main(["world", "cifar10", "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and "train" in err and _no_output(out)


def test_unknown_class_in_lexicon_fails_with_a_fix(source, tmp_path, capsys):
    lex = json.loads((Path(load_lexicon(None, CIFAR).source)).read_text())
    lex["classes"]["zebra"] = {"synonyms": ["quagga"]}
    f = tmp_path / "lex.json"
    f.write_text(json.dumps(lex))
    out = tmp_path / "out"
    assert main(["world", "cifar10", "--root", str(source), "--lexicon", str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "zebra" in err and "rename or remove" in err and _no_output(out)


def test_lexicon_word_containing_a_class_name_is_refused(tmp_path):
    f = tmp_path / "lex.json"
    f.write_text(json.dumps({"classes": {c: {"synonyms": ["x"]} for c in CIFAR} | {"ship": {"synonyms": ["cargo ship"]}}}))
    with pytest.raises(Exception, match="cargo ship"):
        load_lexicon(f, CIFAR)


def test_n_train_beyond_the_split_fails(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["world", "cifar10", "--root", str(source), "--n-train", "500", "--out", str(out)]) == 2
    assert "exceeds the 120 photos" in capsys.readouterr().err and _no_output(out)


@pytest.mark.slow
def test_demo_runs_on_a_real_world(source, tmp_path):
    """The whole loop (world → poisons → clean + poisoned victims → evaluation) on real-world files."""
    from clip_poison.config import DemoConfig
    from clip_poison.run import run_demo

    cfg = DemoConfig(seed=0)
    cfg.targeted.n_poisons, cfg.targeted.target_label = 4, "cat"
    cfg.backdoor.n_poisons, cfg.backdoor.target_label = 10, "cat"
    cfg.train.epochs, cfg.train.batch_size = 1, 32
    s = run_demo(cfg, tmp_path / "demo", real_world=RealWorldConfig(root=str(source), n_train=100), eval_max_n=30)
    assert s["world"]["kind"] == "real" and s["n_train_clean"] == 100 and s["n_eval"] == 30
    assert 0.0 <= s["clean"]["zeroshot_accuracy"] <= 1.0 and (tmp_path / "demo" / "summary.json").is_file()


def test_webdataset_shards_hold_the_same_pairs(source, tmp_path):
    info = write_real_world(RealWorldConfig(root=str(source), seed=0, n_train=30, wds_shard_size=16), tmp_path / "w")
    assert info["train_wds"]["n_shards"] == 2
    members = {}
    for s in range(2):
        with tarfile.open(tmp_path / "w" / "train_wds" / f"{s}.tar") as tf:
            members.update({m.name: tf.extractfile(m).read() for m in tf})
    df = pd.read_csv(tmp_path / "w" / "train.csv", keep_default_na=False)
    for fp, title in zip(df["filepath"], df["title"]):
        stem = Path(fp).stem
        assert members[f"{stem}.txt"].decode() == title
        assert members[Path(fp).name] == (tmp_path / "w" / fp).read_bytes()
