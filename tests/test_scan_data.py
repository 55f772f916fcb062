"""`clip-poison scan data`: the stage around the detectors (streaming, outputs, truth, bad inputs)."""
import json

import numpy as np
import pandas as pd
import pytest

from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.attacks.targeted import craft_targeted_poisons
from clip_poison.cli import main
from clip_poison.config import BackdoorConfig, TargetedConfig, TrainConfig
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.io import sha256_file, sha256_tree
from clip_poison.victims.export import CONFIG, WEIGHTS
from clip_poison.victims.train import train_victim


@pytest.fixture(scope="module")
def scanned(tiny_world, tmp_path_factory):
    """A tiny world, a targeted and a backdoor poison set, and a 1-epoch victim trained on all."""
    root = tmp_path_factory.mktemp("scan")
    train = read_csv_dataset(tiny_world / "train.csv")
    craft_targeted_poisons(TargetedConfig(n_poisons=8, target_label="apple"), train,
                           load_wds_evalset(tiny_world / "eval"), root / "t")
    craft_backdoor_poisons(BackdoorConfig(n_poisons=12), train, 32, root / "b")
    cfg = TrainConfig(model="rn-tiny-32", epochs=2, batch_size=64, warmup=2, record_pair_loss=True)
    train_victim(tiny_world / "train.csv", [root / "t", root / "b"], cfg, root / "v", allow_shared_label=True)
    return root


def _scan(tiny_world, root, out, *extra):
    return main(["scan", "data", "--data", str(tiny_world / "train.csv"), "--poisons", str(root / "t"),
                 str(root / "b"), "--checkpoint", str(root / "v"), "--out", str(out), *extra])


def test_scan_writes_scores_ranking_and_metrics_per_poison_set(tiny_world, scanned, tmp_path):
    before = {"world": sha256_tree(tiny_world), "t": sha256_tree(scanned / "t"), "b": sha256_tree(scanned / "b"),
              "w": sha256_file(scanned / "v" / WEIGHTS), "c": sha256_file(scanned / "v" / CONFIG)}
    assert _scan(tiny_world, scanned, tmp_path / "s", "--detectors", "k-dist,clip-score,near-duplicate",
                 "--reference", str(tiny_world / "eval"), "--k", "5") == 0
    scores = pd.read_parquet(tmp_path / "s" / "scores.parquet")
    pairs = pd.read_parquet(tmp_path / "s" / "pairs.parquet")
    n = 300 + 8 + 12
    assert list(scores.columns) == ["row", "detector", "score"] and len(pairs) == n
    assert set(scores["detector"]) == {"k-dist", "k-dist+ref", "clip-score", "near-duplicate"}
    assert (scores.groupby("detector")["row"].apply(sorted).apply(list) == [list(range(n))] * 4).all()
    # rows in `train`'s order: the clean CSV, then each poison set as named
    assert (pairs["source"].tolist() == ["data"] * 300 + ["t"] * 8 + ["b"] * 12)
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    for det in ("k-dist", "k-dist+ref", "clip-score"):
        for ps, n_p in (("t", 8), ("b", 12)):
            v = m["detection"][det][ps]
            assert v["n_poison"] == n_p and v["n"] == 300 + n_p  # the other set is left out
            assert 0 <= v["roc_auc"] <= 1 and 0 <= v["fpr_at_95tpr"] <= 1
    assert set(m["detection"]["clip-score"]["gmm_split"]) == {"n_flagged", "precision", "recall"}
    # the targeted set's 8 noisy copies of x' under other captions: found by their hashes alone
    assert m["detection"]["near-duplicate"]["t"]["roc_auc"] > 0.95
    # the ranking is each detector's scores sorted, most suspicious first
    ranked = pd.read_csv(tmp_path / "s" / "ranked.csv")
    kd = scores[scores["detector"] == "k-dist"].set_index("row")["score"]
    top = ranked[ranked["detector"] == "k-dist"]
    assert top["rank"].tolist()[:3] == [1, 2, 3] and top["score"].is_monotonic_decreasing
    assert np.allclose(kd.loc[top["row"]].to_numpy(), top["score"].to_numpy())
    # the inputs are only read
    assert before == {"world": sha256_tree(tiny_world), "t": sha256_tree(scanned / "t"),
                      "b": sha256_tree(scanned / "b"), "w": sha256_file(scanned / "v" / WEIGHTS),
                      "c": sha256_file(scanned / "v" / CONFIG)}


def test_scan_is_deterministic(tiny_world, scanned, tmp_path):
    for name in ("a", "b"):
        assert _scan(tiny_world, scanned, tmp_path / name, "--detectors", "slof,dao,clip-score", "--k", "5") == 0
    a, b = (pd.read_parquet(tmp_path / x / "scores.parquet") for x in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)


def test_scan_scores_match_the_detectors_on_the_same_embeddings(tiny_world, scanned):
    """The stage adds nothing to a detector: its column is the registry's function on the
    embeddings the stage computed (streamed in chunks, checked against one pass)."""
    from clip_poison.defenses import scan_data as sd
    from clip_poison.defenses.detectors import score_pairs
    from clip_poison.metrics.embed import embed_images
    from clip_poison.io import load_image
    from clip_poison.victims.export import load_victim

    old = sd.CHUNK
    sd.CHUNK = 64  # several chunks, a short last one
    try:
        s = sd.embed_training_set(tiny_world / "train.csv", [scanned / "t", scanned / "b"], scanned / "v",
                                  cache_dir=False)
    finally:
        sd.CHUNK = old
    train = read_csv_dataset(tiny_world / "train.csv")
    imgs = [load_image(p) for p in train.paths[:100]]
    model, pre, _ = load_victim(scanned / "v")
    assert np.allclose(s.image_emb[:100], embed_images(model, pre, imgs), atol=1e-6)
    scores, _ = sd.run_detectors(s, ["k-dist"], k=5)
    assert np.array_equal(scores["k-dist"], score_pairs("k-dist", image_emb=s.image_emb, k=5))


def test_scan_bad_inputs(tiny_world, scanned, tmp_path, bad_input):
    ck = scanned / "v"
    base = ["scan", "data", "--data", tiny_world / "train.csv", "--checkpoint", ck]
    bad_input(base + ["--out", tmp_path / "o1", "--detectors", "k-dist", "--k", "5000"], what="k >= N",
              kind="invalid value", expect=["k=5000", "use k <"])
    bad_input(base + ["--out", tmp_path / "o2", "--detectors", "telepathy"], what="unknown detector",
              kind="invalid value", expect=["unknown detector", "k-dist"])
    empty = tmp_path / "empty.csv"
    empty.write_text("filepath,title\n")
    bad_input(["scan", "data", "--data", empty, "--checkpoint", ck, "--out", tmp_path / "o3"],
              what="empty training data", kind="malformed input", expect=["no rows"])
    bad_input(["scan", "data", "--data", tiny_world / "train.csv", "--checkpoint", tmp_path / "nock",
               "--out", tmp_path / "o4"], what="missing checkpoint", kind="missing input", expect=["checkpoint"])
    # a poison set stamped for another input size than the checkpoint's: refused before any work
    craft_backdoor_poisons(BackdoorConfig(n_poisons=3), read_csv_dataset(tiny_world / "train.csv"), 64,
                           tmp_path / "b64")
    bad_input(base + ["--poisons", tmp_path / "b64", "--out", tmp_path / "o5"],
              what="checkpoint/data mismatch (poisons stamped at 64 px, model 32 px)", kind="mismatch",
              expect=["64"])
    bad_input(["scan", "data", "--data", tiny_world / "train.csv", "--poisons", scanned / "b", "--checkpoint", ck,
               "--detectors", "loss-dynamics", "--out", tmp_path / "o6"],
              what="pair losses of another training set (loss-dynamics)", kind="mismatch",
              expect=["recorded on another training set"])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))  # nothing half-written


def test_loss_dynamics_scan_reads_the_victims_pair_losses(tiny_world, scanned, tmp_path):
    assert _scan(tiny_world, scanned, tmp_path / "s", "--detectors", "loss-dynamics") == 0
    scores = pd.read_parquet(tmp_path / "s" / "scores.parquet")
    from clip_poison.defenses.detectors import score_pairs
    want = score_pairs("loss-dynamics", pair_loss=np.load(scanned / "v" / "pair_loss.npy"))
    assert np.array_equal(scores["score"].to_numpy(), want)


def test_scan_streams_webdataset_shards_like_the_csv(tiny_world, scanned, tmp_path):
    """The same pairs as shards (img2dataset layout) give the same embeddings and scores as the CSV."""
    from clip_poison.data.wds import csv_to_shards
    from clip_poison.defenses import scan_data as sd

    csv_to_shards(tiny_world / "train.csv", tmp_path / "shards", shard_size=128)
    old = sd.CHUNK
    sd.CHUNK = 100  # chunks that straddle shard boundaries
    try:
        a = sd.embed_training_set(tiny_world / "train.csv", [scanned / "b"], scanned / "v", cache_dir=False)
        b = sd.embed_training_set(str(tmp_path / "shards"), [scanned / "b"], scanned / "v", cache_dir=False)
    finally:
        sd.CHUNK = old
    assert b.refs[0] == "00000.tar:000000000" and b.sources[-1] == "b" and len(b.refs) == 312
    np.testing.assert_array_equal(a.image_emb, b.image_emb)
    np.testing.assert_array_equal(a.text_emb, b.text_emb)
    assert a.pixel_sha == b.pixel_sha and np.array_equal(a.phash, b.phash)
