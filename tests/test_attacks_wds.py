"""Both dataset formats (OpenCLIP CSV, img2dataset webdataset): streaming reader, deterministic
writer, poisons in new shards only, every trigger of the registry, and training on `clean::poison`."""
import io
import tarfile

import numpy as np
import pytest

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.io import read_manifest
from clip_poison.data.sources import WdsTrainingData, open_training_data
from clip_poison.attacks.targeted import craft_targeted_poisons
from clip_poison.attacks.text import craft_text_poisons
from clip_poison.attacks.triggers import get_trigger, trigger_names
from clip_poison.cli import main
from clip_poison.config import BackdoorConfig, CraftOptions, TargetedConfig, TextConfig, TrainConfig
from clip_poison.data.captions import mine_captions
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.data.wds import csv_to_shards, expand_shards, iter_samples
from clip_poison.io import UserError, sha256_tree

FORMATS = ("csv", "wds")


@pytest.fixture(scope="module")
def shards(tiny_world, tmp_path_factory):
    """The tiny world's 300 pairs as three img2dataset-style shards."""
    root = tmp_path_factory.mktemp("shards")
    csv_to_shards(tiny_world / "train.csv", root, shard_size=100)
    return root


def data_for(fmt, tiny_world, shards):
    return str(tiny_world / "train.csv") if fmt == "csv" else str(shards / "{00000..00002}.tar")


def poison_images(folder, m):
    """Decoded poison images, read back from whichever format the set was written in."""
    if m["format"] == "csv":
        ds = read_csv_dataset(folder / "poisons.csv")
        return [ds.load(i) for i in range(len(ds))], ds.captions
    samples = list(iter_samples([folder / s for s in m["shards"]]))
    return [s.image() for s in samples], [s.caption for s in samples]


def test_reader_streams_the_same_rows_as_the_csv(tiny_world, shards):
    csv = read_csv_dataset(tiny_world / "train.csv")
    w = WdsTrainingData(str(shards / "{00000..00002}.tar"))
    assert len(w) == len(csv)
    caps = [c for b in w.caption_batches() for c in b.to_pylist()]
    assert caps == csv.captions
    got = w.load_rows([0, 150, 299])
    for r in (0, 150, 299):
        np.testing.assert_array_equal(got[r], csv.load(r))
    assert w.ref(150) == "00001.tar:000010050"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("trigger", trigger_names())
def test_backdoor_poisons_in_both_formats_for_every_trigger(fmt, trigger, tiny_world, shards, tmp_path):
    before = sha256_tree(shards), sha256_tree(tiny_world)
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=6, trigger=trigger, patch_size=4, placement="random"),
                               data_for(fmt, tiny_world, shards), 32, tmp_path / "p")
    assert m["format"] == fmt
    assert (tmp_path / "p" / ("poisons.csv" if fmt == "csv" else "poisons-000000.tar")).is_file()
    imgs, caps = poison_images(tmp_path / "p", m)
    stamp = get_trigger(trigger, 4, 32).stamp
    bases = open_training_data(data_for(fmt, tiny_world, shards)).load_rows([r["base_index"] for r in m["poisons"]])
    for img, cap, rec in zip(imgs, caps, m["poisons"]):
        np.testing.assert_array_equal(img, stamp(bases[rec["base_index"]], rec["position"]))  # lossless in both formats
        assert cap == rec["caption"] and "tent" in cap.lower()
    assert (sha256_tree(shards), sha256_tree(tiny_world)) == before  # X is never rewritten


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_seed_same_bytes_in_both_formats(fmt, tiny_world, shards, tmp_path):
    ev = load_wds_evalset(tiny_world / "eval")
    data = data_for(fmt, tiny_world, shards)
    opts = CraftOptions(filler_words=1, caption_substitution=0.5)
    for k in ("a", "b"):
        craft_backdoor_poisons(BackdoorConfig(n_poisons=5, placement="random", seed=7), data, 32, tmp_path / f"b{k}",
                               options=opts)
        craft_targeted_poisons(TargetedConfig(n_poisons=5, seed=7), data, ev, tmp_path / f"t{k}", options=opts)
        craft_text_poisons(TextConfig(n_poisons=5, seed=7), data, tmp_path / f"x{k}", options=opts)
    for name in ("b", "t", "x"):
        assert sha256_tree(tmp_path / f"{name}a") == sha256_tree(tmp_path / f"{name}b")
    craft_backdoor_poisons(BackdoorConfig(n_poisons=5, placement="random", seed=8), data, 32, tmp_path / "bc", options=opts)
    assert sha256_tree(tmp_path / "bc") != sha256_tree(tmp_path / "ba")


def test_poison_shard_is_deterministic_tar(tiny_world, shards, tmp_path):
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=3), data_for("wds", tiny_world, shards), 32, tmp_path / "p")
    with tarfile.open(tmp_path / "p" / m["shards"][0]) as tf:
        members = tf.getmembers()
    assert [t.name for t in members] == [f"p{i:06d}.{e}" for i in range(3) for e in ("json", "png", "txt")]
    assert {(t.mtime, t.uid, t.gid, t.uname) for t in members} == {(0, 0, 0, "root")}


def test_cli_reads_brace_patterns_and_writes_shards(capsys, tiny_world, shards, tmp_path):
    rc = main(["poison", "backdoor", "--data", str(shards / "{00000..00002}.tar"), "--n-poisons", "4",
               "--patch-size", "4", "--out", str(tmp_path / "p")])
    assert rc == 0
    m = read_manifest(tmp_path / "p")
    assert m["format"] == "wds" and m["shards"] == ["poisons-000000.tar"] and m["source"]["n_rows"] == 300


def test_missing_shard_in_the_pattern_fails_cleanly(capsys, shards, tmp_path):
    rc = main(["poison", "backdoor", "--data", str(shards / "{00000..00007}.tar"), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "do not exist" in err and "brace range" in err
    assert not list(tmp_path.iterdir())


def test_corrupt_image_in_a_shard_fails_cleanly(capsys, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("000.jpg", b"not a jpeg"), ("000.txt", b"a tent at night")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "0.tar").write_bytes(buf.getvalue())
    rc = main(["poison", "backdoor", "--data", str(tmp_path / "d" / "{0..0}.tar"), "--n-poisons", "1",
               "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "000.jpg" in err and "could not be decoded" in err
    assert not (tmp_path / "p").exists()


def test_truncated_shard_fails_cleanly(shards, tmp_path):
    data = (shards / "00000.tar").read_bytes()
    (tmp_path / "0.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        len(open_training_data(str(tmp_path / "{0..0}.tar")))


def test_mining_on_shards_equals_mining_on_csv(tiny_world, shards):
    from clip_poison.data.sources import mined_rows

    csv = read_csv_dataset(tiny_world / "train.csv")
    assert mined_rows(data_for("wds", tiny_world, shards), "tent", ("teepee",)).tolist() == \
        mine_captions(csv.captions, "tent", ("teepee",))


def test_expand_shards_accepts_a_folder(shards):
    assert [p.name for p in expand_shards(shards)] == ["00000.tar", "00001.tar", "00002.tar"]


@pytest.mark.slow
def test_open_clip_train_trains_on_clean_and_poison_shards(tiny_world, shards, tmp_path):
    """The real open_clip_train, `--dataset-type webdataset --train-data 'clean::poison'`."""
    from clip_poison.victims.export import load_victim
    from clip_poison.victims.openclip_train import train_open_clip_train

    data = data_for("wds", tiny_world, shards)
    craft_backdoor_poisons(BackdoorConfig(n_poisons=20, patch_size=4), data, 32, tmp_path / "p")
    cfg = TrainConfig(model="rn-tiny-32", epochs=1, batch_size=64, warmup=1, backend="open_clip_train", workers=1)
    info = train_open_clip_train(data, [tmp_path / "p"], cfg, tmp_path / "v")
    assert info["data"]["format"] == "wds" and info["data"]["n_clean"] == 300 and info["data"]["n_poisons"] == 20
    assert info["data"]["train_data"].endswith("::" + str(tmp_path / "p" / "poisons-000000.tar"))
    model, _, _ = load_victim(tmp_path / "v")
    assert model.visual.image_size in (32, (32, 32))
