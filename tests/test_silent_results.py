"""Silent wrong results (issue 13, item 6): each test here failed before its fix, and the named
checks of stamping (resize-then-stamp, evaluation stamping = the stored PNG) and cache invalidation."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.io import read_manifest, resize_to_input
from clip_poison.attacks.triggers import TRIGGERS, apply_trigger, load_trigger, make_trigger, trigger_names
from clip_poison.config import BackdoorConfig, DemoConfig, TrainConfig, WorldConfig
from clip_poison.data.csvdata import write_csv_dataset
from clip_poison.data.evalsets import load_evalset, write_wds_evalset
from clip_poison.config import RealWorldConfig
from clip_poison.data.realworld import write_real_world
from clip_poison.io import UserError, atomic_dir, decode_image, png_bytes, sha256_file
from clip_poison.metrics.embed import embed_images
from clip_poison.metrics.evaluate import evaluate_checkpoint
from clip_poison.victims.export import CONFIG, export_local_dir
from clip_poison.victims.fast import train_crop
from clip_poison.victims.train import train_victim
from clip_poison.victims.models import model_config, register_victims
from clip_poison.victims.openclip_train import open_clip_train_argv, openclip_crop_ratio, recorded_path, training_rows
from clip_poison.data.world import write_world

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OPENCLIP_RATIO = [3 / 4, 4 / 3]  # torchvision's default: what open_clip's train crop really uses


def _ckpt(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    export_local_dir(model_config("rn-tiny-32"), open_clip.create_model("rn-tiny-32").state_dict(), path)
    return path


def _copy_evalset(ev, root: Path, images=None, shard_size: int = 5000) -> Path:
    write_wds_evalset(root, np.stack(images if images is not None else ev.images), ev.labels, ev.classnames,
                      ev.templates, shard_size=shard_size)
    return root


def _small_evalset(tiny_world):
    ev = load_evalset(tiny_world / "eval", max_n=20)
    ev.templates = ev.templates[:1]  # one prompt: these tests are about the cache, not accuracy
    return ev


# ---------------------------------------------------------------------------------------------
# The embedding cache: keyed on pixels, preprocessing, weights and the trigger's pixels

def test_cache_misses_when_eval_pixels_change(tiny_world, tmp_path):
    ev = _small_evalset(tiny_world)
    ckpt, cache = _ckpt(tmp_path / "ckpt"), tmp_path / "cache"
    a = load_evalset(_copy_evalset(ev, tmp_path / "a"))
    evaluate_checkpoint(ckpt, a, [], metrics="zeroshot", cache_dir=cache)
    old = {p: np.load(p) for p in cache.glob("*.npy")}
    changed = [im.copy() for im in ev.images]
    changed[7] = 255 - changed[7]  # same keys, labels, size and folder: only the pixels of one image differ
    b = load_evalset(_copy_evalset(ev, tmp_path / "a", changed))
    r = evaluate_checkpoint(ckpt, b, [], metrics="zeroshot", cache_dir=cache)
    assert r["embedding_cache"]["misses"] == 1  # names-based keys served the stale embeddings here
    (new,) = [np.load(p) for p in cache.glob("*.npy") if p not in old]
    (stale,) = old.values()
    assert not np.array_equal(new[7], stale[7]) and np.array_equal(np.delete(new, 7, 0), np.delete(stale, 7, 0))
    assert r["zeroshot"] == evaluate_checkpoint(ckpt, b, [], metrics="zeroshot", cache_dir=False)["zeroshot"]


def test_cache_misses_when_weights_or_preprocessing_change(tiny_world, tmp_path):
    ev = _small_evalset(tiny_world)
    ckpt = _ckpt(tmp_path / "ckpt")  # default cache: CKPT/embeddings, which outlives a re-export
    evaluate_checkpoint(ckpt, ev, [], metrics="zeroshot")
    assert evaluate_checkpoint(ckpt, ev, [], metrics="zeroshot")["embedding_cache"]["hits"] == 1
    _ckpt(ckpt, seed=1)  # new weights in the same folder
    r = evaluate_checkpoint(ckpt, ev, [], metrics="zeroshot")
    assert r["embedding_cache"]["misses"] == 1
    assert r["zeroshot"] == evaluate_checkpoint(ckpt, ev, [], metrics="zeroshot", cache_dir=False)["zeroshot"]
    cfg = json.loads((ckpt / CONFIG).read_text())
    cfg["preprocess_cfg"]["mean"] = [0.5, 0.5, 0.5]  # same weights, other normalisation
    (ckpt / CONFIG).write_text(json.dumps(cfg))
    assert evaluate_checkpoint(ckpt, ev, [], metrics="zeroshot")["embedding_cache"]["misses"] == 1


def test_cache_misses_when_the_triggers_pixels_change(tiny_world, tmp_path, monkeypatch):
    ev = _small_evalset(tiny_world)
    ckpt, cache = _ckpt(tmp_path / "ckpt"), tmp_path / "cache"
    mb = craft_backdoor_poisons(BackdoorConfig(n_poisons=2), tiny_world / "train.csv", 32, tmp_path / "b")
    r = evaluate_checkpoint(ckpt, ev, [mb], metrics="backdoor", cache_dir=cache)
    assert r["embedding_cache"]["misses"] == 3
    checker = TRIGGERS["checkerboard"]
    monkeypatch.setitem(TRIGGERS, "checkerboard", lambda s: 255 - checker(s))  # same name and size, other cells
    r2 = evaluate_checkpoint(ckpt, ev, [mb], metrics="backdoor", cache_dir=cache)
    assert (r2["embedding_cache"]["hits"], r2["embedding_cache"]["misses"]) == (1, 2)  # clean still hits


# ---------------------------------------------------------------------------------------------
# Stamping: resize first, then the trigger; evaluation stamps exactly what a poison PNG stores

@pytest.fixture(scope="module")
def big_bases(tmp_path_factory):
    """A training CSV of 48x64 photos (larger than the 32 px input, not square) and a backdoor set
    stamped from them at random positions."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(12)]
    write_csv_dataset(root / "train.csv", images, [f"my tent number {i}" for i in range(12)], "images")
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=6, patch_size=4, placement="random"), root / "train.csv",
                               32, root / "p")
    return root, images, m


def test_resize_then_stamp_keeps_trigger_cells_exact_for_large_bases(big_bases):
    root, images, m = big_bases
    patch = make_trigger("checkerboard", 4)
    assert m["trigger"]["image_size"] == 32
    for p in m["poisons"]:
        stored = decode_image((root / "p" / p["file"]).read_bytes())
        (y, x), base = p["position"], resize_to_input(images[p["base_index"]], 32)
        assert stored.shape == (32, 32, 3)
        assert np.array_equal(stored[y:y + 4, x:x + 4], patch)  # every checker cell exact
        assert np.array_equal(stored, apply_trigger(base, patch, (y, x)))  # and nothing else touched


class _Recorder(torch.nn.Module):
    """Stands in for a model: records the normalised tensors evaluation would embed."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def encode_image(self, x, normalize=True):
        self.seen.append(x.clone())
        return torch.ones(len(x), 2)


@pytest.mark.parametrize("trigger", trigger_names())
@pytest.mark.parametrize("which", ["larger than the input (PIL path)", "at the input size (vectorised path)"])
def test_evaluation_stamping_equals_the_stored_poison_png(big_bases, tiny_world, tmp_path, which, trigger):
    if which.startswith("larger"):
        root, images, _ = big_bases
    else:
        root = tiny_world
        images = [decode_image((tiny_world / f).read_bytes()) for f in pd.read_csv(tiny_world / "train.csv")["filepath"]]
    m = craft_backdoor_poisons(BackdoorConfig(n_poisons=6, trigger=trigger, patch_size=4, placement="random"),
                               root / "train.csv", 32, tmp_path / "p")
    register_victims()
    _, _, pre = open_clip.create_model_and_transforms("rn-tiny-32")
    rec = _Recorder()
    bases = [images[p["base_index"]] for p in m["poisons"]]
    embed_images(rec, pre, bases, load_trigger(m["trigger"], 32), [tuple(p["position"]) for p in m["poisons"]])
    evaluated = torch.cat(rec.seen)
    from_png = torch.stack([pre(Image.open(tmp_path / "p" / p["file"])) for p in m["poisons"]])
    assert torch.equal(evaluated, from_png)  # the same pixels, bit for bit


# ---------------------------------------------------------------------------------------------
# Eval shards cut short

@pytest.fixture
def sharded(tiny_world, tmp_path):
    return _copy_evalset(load_evalset(tiny_world / "eval"), tmp_path / "ev", shard_size=20)  # 3 shards of 20


def _members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tf:
        return tf.getmembers()


def test_eval_shard_cut_at_a_member_boundary_is_refused(sharded):
    assert len(load_evalset(sharded)) == 60
    shard = sharded / "test" / "1.tar"
    last = _members(shard)[-3]  # cut after the 19th sample's .cls: a valid tar of 19 samples, no end blocks
    shard.write_bytes(shard.read_bytes()[:last.offset_data + -(-last.size // 512) * 512])
    with pytest.raises(UserError, match=r"1\.tar.*(re-create|re-download)"):
        load_evalset(sharded)
    with pytest.raises(UserError, match=r"1\.tar"):
        load_evalset(sharded, max_n=30)


@pytest.mark.parametrize("metadata", ["count.txt", "manifest.tsv"])
def test_eval_split_shorter_than_its_recorded_count_is_refused(sharded, metadata):
    split = sharded / "test"
    (split / "count.txt").write_text("60\n")
    if metadata == "manifest.tsv":  # the shared CIFAR-10 copy's layout: a header and a line per sample
        (split / "count.txt").unlink()
        (split / "manifest.tsv").write_text("key\tlabel\n" + "".join(f"s{i:07d}\t0\n" for i in range(60)))
    with tarfile.open(split / "1.tar") as tf:  # re-written whole, with end blocks, two samples fewer
        kept = [(m, tf.extractfile(m).read()) for m in tf.getmembers()[:-4]]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m, data in kept:
            out.addfile(m, io.BytesIO(data))
    (split / "1.tar").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="holds 58 labelled images but its metadata says 60"):
        load_evalset(sharded)


def test_missing_eval_shard_is_refused(sharded):
    (sharded / "test" / "2.tar").unlink()
    with pytest.raises(UserError, match="nshards.txt says 3 shards but 2"):
        load_evalset(sharded)


def test_the_shared_cifar10_copy_passes_the_checks():
    root = Path("/work/shared/data/cifar10-wds")
    if not root.is_dir():
        pytest.skip("no shared CIFAR-10 copy on this machine")
    assert len(load_evalset(root, "test")) == 10_000  # nshards.txt and manifest.tsv agree with the shards


# ---------------------------------------------------------------------------------------------
# Decoding and real-photo worlds

def test_16_bit_png_is_scaled_not_clipped_to_white():
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    out = decode_image(buf.getvalue())
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert np.array_equal(out[..., 0], out[..., 2]) and out.min() == 0 and (out < 255).mean() > 0.9


def _source(root: Path, train_members: list[tuple[str, bytes]]) -> Path:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    write_wds_evalset(root, imgs, np.arange(10), CIFAR, ["a photo of a {c}."], split="test")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in train_members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (root / "train").mkdir()
    (root / "train" / "0.tar").write_bytes(buf.getvalue())
    return root


def test_world_refuses_to_caption_the_split_it_evaluates_on(tmp_path, bad_input):
    src = _source(tmp_path / "src", [("x.png", png_bytes(np.zeros((32, 32, 3), np.uint8))), ("x.cls", b"0")])
    bad_input(["world", "real", "--root", src, "--split", "test", "--out", tmp_path / "w"],
              what="--split naming the split evaluation reads", kind="invalid value",
              expect=["--split 'test'", "--split train"])
    assert not (tmp_path / "w").exists()


def test_colliding_cleaned_tar_keys_do_not_overwrite_photos(tmp_path):
    rng = np.random.default_rng(2)
    keys = ["a/b", "a_b", "a b", "c"]  # the first three clean to one file name
    data = {k: png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for k in keys}
    members = [m for i, k in enumerate(keys) for m in ((f"{k}.png", data[k]), (f"{k}.cls", str(i).encode()))]
    src = _source(tmp_path / "src", members)
    write_real_world(RealWorldConfig(root=str(src)), tmp_path / "w")
    rows = pd.read_csv(tmp_path / "w" / "train_labels.csv", dtype=str)
    assert sorted(rows["source_key"]) == sorted(keys) and rows["filepath"].nunique() == 4
    for fp, key in zip(rows["filepath"], rows["source_key"]):
        assert (tmp_path / "w" / fp).read_bytes() == data[key], key


def test_real_world_refuses_a_train_split_shorter_than_its_count(tmp_path):
    members = [(f"k{i}.png", png_bytes(np.full((32, 32, 3), i, np.uint8))) for i in range(3)]
    src = _source(tmp_path / "src", [m for i, m in enumerate(members) for m in (m, (f"k{i}.cls", b"1"))])
    (src / "train" / "count.txt").write_text("4\n")
    with pytest.raises(UserError, match="holds 3 labelled photos but its metadata says 4"):
        write_real_world(RealWorldConfig(root=str(src)), tmp_path / "w")


# ---------------------------------------------------------------------------------------------
# Training: crop ratio, input size, recorded paths

def test_open_clip_ignores_the_aug_cfg_ratio_so_both_backends_use_its_real_one():
    from open_clip.transform import image_transform

    with pytest.warns(UserWarning, match="Unused augmentation"):
        t = image_transform(32, is_train=True, aug_cfg={"scale": (0.9, 1.0), "ratio": (1.0, 1.0)})
    assert list(t.transforms[0].ratio) == OPENCLIP_RATIO  # ratio=(1.0,1.0) was silently dropped
    assert list(openclip_crop_ratio(32, (0.9, 1.0))) == OPENCLIP_RATIO
    assert list(train_crop(32, (0.9, 1.0)).ratio) == OPENCLIP_RATIO  # the fast backend crops the same way
    argv = open_clip_train_argv(TrainConfig(crop_scale=(0.9, 1.0)), Path("x.csv"), Path("logs"), 100)
    assert not any("ratio" in a for a in argv)


@pytest.mark.parametrize("size", [32, 224])
def test_scale_one_crop_is_no_crop_in_both_backends(size):
    """Default runs (scale 1.0, 1.0) are unaffected by the real ratio: the crop is the identity."""
    from open_clip.transform import image_transform

    img = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    oc = image_transform(size, is_train=True, aug_cfg={"scale": (1.0, 1.0)}).transforms[0]
    fast = train_crop(size, (1.0, 1.0))
    t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    for seed in range(50):
        torch.manual_seed(seed)
        assert np.array_equal(np.asarray(oc(Image.fromarray(img))), img)
        assert torch.equal(fast(t), t)


def test_poison_set_for_another_input_size_is_refused(tiny_world, tmp_path, bad_input):
    p64 = tmp_path / "p64"
    craft_backdoor_poisons(BackdoorConfig(n_poisons=3), tiny_world / "train.csv", 64, p64)
    ckpt = _ckpt(tmp_path / "ckpt")
    bad_input(["evaluate", "--checkpoint", ckpt, "--eval-root", tiny_world / "eval", "--poisons", p64, "--no-cache",
               "--out", tmp_path / "r.json"],
              what="backdoor poison set stamped for another input size", kind="mismatch",
              expect=["64x64", "32x32", "--model"])
    with pytest.raises(UserError, match="64x64 px but the model's input is 32x32"):
        training_rows(tiny_world / "train.csv", [p64], 32)
    bad_input(["train", "--data", tiny_world / "train.csv", "--poisons", p64, "--out", tmp_path / "v"],
              what="backdoor poison set stamped for another input size", kind="mismatch",
              expect=["64x64", "32x32", "--model"])
    assert not (tmp_path / "v").exists()


def _check_train_json(victim: Path) -> dict:
    info = json.loads((victim / "train.json").read_text())
    d = info["data"]
    assert ".partial" not in json.dumps(d)
    assert sha256_file(victim / d["train_csv"]) == d["train_csv_sha256"]
    for s in d["poison_sets"]:
        assert sha256_file(victim / s["dir"] / "manifest.json") == s["manifest_sha256"]
    assert info["augmentation"]["ratio"] == OPENCLIP_RATIO
    return info


def test_train_json_names_inputs_built_in_the_same_temporary_folder(tmp_path):
    # The demo's layout: world, poisons and victims built inside one `.partial` folder, renamed at the end.
    with atomic_dir(tmp_path / "demo") as t:
        write_world(WorldConfig(seed=1, n_train=48, n_eval=20), t / "world")
        craft_backdoor_poisons(BackdoorConfig(n_poisons=4), t / "world" / "train.csv", 32, t / "poisons" / "b")
        train_victim(t / "world" / "train.csv", [t / "poisons" / "b"], TrainConfig(epochs=1, batch_size=16, warmup=1),
                     t / "victims" / "v")
    info = _check_train_json(tmp_path / "demo" / "victims" / "v")
    assert info["data"]["train_csv"] == "../../world/train.csv"
    # Inputs outside such a folder are recorded absolute and resolved, as given.
    assert recorded_path(tmp_path / "a" / ".." / "x.csv", tmp_path / "v") == str((tmp_path / "x.csv").resolve())


@pytest.mark.slow
def test_demo_train_json_paths_exist_after_the_rename_open_clip_train(tmp_path):
    from clip_poison.run import run_demo

    cfg = DemoConfig()
    cfg.world.n_train, cfg.world.n_eval = 48, 20
    cfg.train.epochs, cfg.train.batch_size, cfg.train.warmup, cfg.train.workers = 1, 16, 1, 0
    cfg.train.backend = "open_clip_train"
    cfg.targeted.n_poisons, cfg.backdoor.n_poisons = 2, 4
    run_demo(cfg, tmp_path / "demo")
    victims = sorted((tmp_path / "demo" / "victims").glob("*/train.json"))
    assert len(victims) >= 2
    for tj in victims:
        _check_train_json(tj.parent)
