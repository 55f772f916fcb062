"""evaluate_checkpoint: embeddings cached once per (weights, eval set, trigger, placement, seed),
metric selection, the §4.2 linear probe and Figure 3's data. A randomly initialised exported
victim is enough here (no training): these tests are about bookkeeping, not accuracy."""
import json

import numpy as np
import open_clip
import pytest
import torch

import clip_poison.metrics.evaluate as evaluate_mod
from clip_poison.attacks.backdoor import craft_backdoor_poisons
from clip_poison.attacks.targeted import craft_targeted_poisons
from clip_poison.cli import main
from clip_poison.config import BackdoorConfig, TargetedConfig
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.data.evalsets import load_evalset
from clip_poison.data.worldfolder import synthetic_probe_split
from clip_poison.io import UserError
from clip_poison.metrics.evaluate import evaluate_checkpoint
from clip_poison.metrics.zscore import backdoor_z_score
from clip_poison.victims.export import export_local_dir
from clip_poison.victims.models import model_config


@pytest.fixture(scope="module")
def setup(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    cfg = model_config("rn-tiny-32")
    export_local_dir(cfg, open_clip.create_model("rn-tiny-32").state_dict(), root / "ckpt")
    train = read_csv_dataset(tiny_world / "train.csv")
    ev = load_evalset(tiny_world / "eval")
    mt = craft_targeted_poisons(TargetedConfig(n_poisons=2), train, ev, root / "t")
    mb = craft_backdoor_poisons(BackdoorConfig(n_poisons=3, patch_size=4), train, 32, root / "b4")
    mb8 = craft_backdoor_poisons(BackdoorConfig(n_poisons=3, patch_size=8), train, 32, root / "b8")
    return root, ev, mt, mb, mb8


@pytest.fixture()
def counting(monkeypatch):
    """Count images passed through encode_image during evaluate_checkpoint."""
    seen = []
    real = evaluate_mod.load_victim

    def load(d, device="cpu"):
        model, pre, tok = real(d, device=device)
        enc = model.encode_image

        def counted(x, normalize=False):
            seen.append(len(x))
            return enc(x, normalize=normalize)

        model.encode_image = counted
        return model, pre, tok

    monkeypatch.setattr(evaluate_mod, "load_victim", load)
    return seen


def _strip(r):
    return {k: v for k, v in r.items() if k not in ("seconds", "embedding_cache")}


def test_second_evaluation_loads_embeddings_from_cache(setup, counting, tmp_path):
    root, ev, mt, mb, mb8 = setup
    cache = tmp_path / "cache"
    first = evaluate_checkpoint(root / "ckpt", ev, [mt, mb], cache_dir=cache)
    assert sum(counting) == 3 * len(ev)  # clean + upper-left + random placement
    assert first["embedding_cache"]["misses"] == 3 and len(list(cache.glob("*.npy"))) == 3
    counting.clear()
    second = evaluate_checkpoint(root / "ckpt", ev, [mt, mb], cache_dir=cache)
    assert counting == [] and second["embedding_cache"] == {"dir": str(cache), "hits": 3, "misses": 0}
    assert json.dumps(_strip(first), sort_keys=True) == json.dumps(_strip(second), sort_keys=True)

    # Another patch size misses for both placements; the clean embeddings still hit.
    third = evaluate_checkpoint(root / "ckpt", ev, [mb8], cache_dir=cache)
    assert third["embedding_cache"]["hits"] == 1 and third["embedding_cache"]["misses"] == 2
    assert sum(counting) == 2 * len(ev)
    # Another seed moves only the random placement's positions.
    fourth = evaluate_checkpoint(root / "ckpt", ev, [mb], cache_dir=cache, seed=1)
    assert fourth["embedding_cache"]["hits"] == 2 and fourth["embedding_cache"]["misses"] == 1
    # Another eval set (first 30 images) misses everything.
    fifth = evaluate_checkpoint(root / "ckpt", load_evalset(ev.source, max_n=30),
                                [mb], cache_dir=cache)
    assert fifth["embedding_cache"]["hits"] == 0


def test_evaluation_runs_on_the_training_device_and_keys_its_cache_by_it(setup, monkeypatch, tmp_path):
    """The victim is evaluated where victims train (victims.device.train_device: the GPU when torch
    sees one), and embeddings computed on another device are another cache entry (its kernels round
    differently); CPU keys carry no device field, so caches written before devices were keyed hit."""
    from clip_poison.metrics.embed import cache_key

    root, ev, mt, mb, _ = setup
    asked, real = [], evaluate_mod.load_victim

    def load(d, device="cpu"):
        asked.append(device)
        return real(d, device="cpu")  # no GPU here: the model stays on the CPU whatever was asked

    monkeypatch.setattr(evaluate_mod, "load_victim", load)
    monkeypatch.setattr(evaluate_mod, "device_fingerprint", lambda d: d if d == "cpu" else f"{d}:some GPU:tf32")
    cache = tmp_path / "cache"
    monkeypatch.setattr(evaluate_mod, "train_device", lambda: "cpu")
    cpu = evaluate_checkpoint(root / "ckpt", ev, [], metrics="zeroshot", cache_dir=cache)
    monkeypatch.setattr(evaluate_mod, "train_device", lambda: "cuda")
    gpu = evaluate_checkpoint(root / "ckpt", ev, [], metrics="zeroshot", cache_dir=cache)
    assert asked == ["cpu", "cuda"] and (cpu["device"], gpu["device"]) == ("cpu", "cuda:some GPU:tf32")
    assert cpu["embedding_cache"]["misses"] == 1 and gpu["embedding_cache"]["misses"] == 1
    assert "device" not in cache_key("w", {"e": 1}) and cache_key("w", {"e": 1}, device="cuda")["device"] == "cuda"


def test_default_cache_lives_in_the_checkpoint_and_can_be_turned_off(setup, counting):
    root, ev, mt, mb, _ = setup
    evaluate_checkpoint(root / "ckpt", ev, [], metrics="zeroshot")
    assert list((root / "ckpt" / "embeddings").glob("*.npy"))
    counting.clear()
    r = evaluate_checkpoint(root / "ckpt", ev, [], metrics="zeroshot", cache_dir=False)
    assert sum(counting) == len(ev) and r["embedding_cache"]["dir"] is None


def test_metric_selection(setup):
    root, ev, mt, mb, _ = setup
    r = evaluate_checkpoint(root / "ckpt", ev, [mt, mb], metrics="zeroshot", cache_dir=False)
    assert r["metrics"] == ["zeroshot"] and r["targeted"] == [] and r["backdoor"] == []
    r = evaluate_checkpoint(root / "ckpt", ev, [mt, mb], metrics=["backdoor"], cache_dir=False)
    assert "zeroshot" not in r and "asr" in r["backdoor"][0]["consistent"] and "z" not in r["backdoor"][0]["consistent"]
    with pytest.raises(UserError, match="unknown metric"):
        evaluate_checkpoint(root / "ckpt", ev, [], metrics="zeroshot,accuracy")
    with pytest.raises(UserError, match="probe-train"):
        evaluate_checkpoint(root / "ckpt", ev, [], metrics="probe")


def test_linear_probe_metrics_beside_zero_shot(setup, tiny_world):
    root, ev, mt, mb, _ = setup
    pt = synthetic_probe_split(tiny_world, 100)
    r = evaluate_checkpoint(root / "ckpt", ev, [mt, mb], probe_train=pt, cache_dir=False)
    assert r["metrics"] == ["zeroshot", "probe", "targeted", "backdoor", "zscore"]
    assert 0.0 <= r["probe"]["accuracy"] <= 1.0 and r["probe"]["n"] == len(ev) and r["probe"]["n_train"] == 100
    t = r["targeted"][0]
    assert set(t["probe"]) == {"success", "predicted", "target"} and t["probe"]["target"] == t["target"]
    for placement in ("consistent", "random"):
        b = r["backdoor"][0][placement]
        assert b["probe"]["n"] == b["n"] == len(ev) - int(np.sum(ev.labels == ev.classnames.index("tent")))
    with pytest.raises(UserError, match="disjoint"):
        evaluate_checkpoint(root / "ckpt", ev, [], probe_train=ev, cache_dir=False)


def test_fig3_data(setup):
    root, ev, mt, mb, _ = setup
    r = evaluate_checkpoint(root / "ckpt", ev, [mb], metrics="backdoor,zscore,fig3", cache_dir=False)
    left = r["fig3"]["similarity_vs_same_prediction"]
    assert left["n_pairs"] == len(ev) * (len(ev) - 1) // 2 and left["exact"]
    right = r["backdoor"][0]["fig3_histograms"]
    assert right["z"] == pytest.approx(r["backdoor"][0]["consistent"]["z"]["z"])
    assert sum(right["clean_count"]) == sum(right["triggered_count"]) == left["n_pairs"]


def test_cli_evaluate_subset_writes_json(setup, tiny_world, tmp_path, capsys):
    root, ev, mt, mb, _ = setup
    out = tmp_path / "r.json"
    rc = main(["evaluate", "--checkpoint", str(root / "ckpt"), "--eval-root", str(tiny_world / "eval"),
               "--poisons", str(root / "t"), str(root / "b4"), "--metrics", "zeroshot,probe,backdoor",
               "--probe-train", str(tiny_world), "--probe-n", "50", "--no-cache", "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["metrics"] == ["zeroshot", "probe", "backdoor"] and r["probe"]["n_train"] == 50
    assert "probe ASR" in capsys.readouterr().out
    rc = main(["evaluate", "--checkpoint", str(root / "ckpt"), "--eval-root", str(tmp_path / "nope"),
               "--out", str(tmp_path / "bad.json")])
    assert rc == 2 and not (tmp_path / "bad.json").exists()
    assert "not found" in capsys.readouterr().err
