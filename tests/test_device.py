"""Precision and devices: the precision each device gets, the trainer's command line for one or N
GPUs, the clean-order sampler sharded per rank, and the refusals. Runs without a GPU: the CUDA
choices are checked as what is passed on (argv, resolved names), never by training on one."""
import argparse
import hashlib
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from clip_poison.config import TrainConfig
from clip_poison.data.csvdata import write_csv_rows
from clip_poison.io import UserError
from clip_poison.run import train_record
from clip_poison.victims import device as dev
from clip_poison.victims.export import WEIGHTS
from clip_poison.victims.fast import PAIR_LOSS, Objective, train_fast
from clip_poison.victims.openclip_train import open_clip_train_argv, train_open_clip_train, trainer_argv, training_rows
from clip_poison.victims.order import CleanOrderSampler, epoch_order
from clip_poison.victims.train import train_victim


@pytest.mark.parametrize("precision, device, used", [
    ("auto", "cpu", "fp32"), ("auto", "cuda", "amp_bf16"),
    ("fp32", "cpu", "fp32"), ("fp32", "cuda", "fp32"),
    ("bf16", "cpu", "amp_bf16"), ("bf16", "cuda", "amp_bf16"),
    ("amp", "cuda", "amp"),
])
def test_precision_follows_the_device(precision, device, used):
    from open_clip_train.params import parse_args

    assert dev.resolve_precision(precision, device) == used
    assert parse_args(["--precision", used]).precision == used  # a name open_clip_train takes


@pytest.mark.parametrize("precision, device, expect", [
    ("amp", "cpu", "CUDA mode"), ("fp16", "cpu", "'auto', 'fp32', 'bf16', 'amp'"),
    ("amp_bf16", "cuda", "one of"),  # open_clip_train's own names are not TrainConfig's
])
def test_precision_refusals(precision, device, expect):
    with pytest.raises(UserError, match=expect):
        dev.resolve_precision(precision, device)


def _oc_args(cfg, device="cpu"):
    return open_clip_train_argv(cfg, Path("x.csv"), Path("logs"), 100, device=device)


@pytest.mark.parametrize("precision, device, used", [("auto", "cpu", "fp32"), ("auto", "cuda", "amp_bf16"),
                                                    ("bf16", "cpu", "amp_bf16"), ("amp", "cuda", "amp")])
def test_open_clip_train_gets_the_resolved_precision(precision, device, used):
    argv = _oc_args(TrainConfig(precision=precision), device)
    assert argv[argv.index("--precision") + 1] == used


def test_trainer_argv_one_gpu_is_python_m_and_n_gpus_is_torchrun():
    from open_clip_train.params import parse_args
    from torch.distributed.run import parse_args as torchrun_args

    one = TrainConfig(batch_size=128, backend="open_clip_train")
    four = replace(one, gpus=4)
    entry = ["-m", "clip_poison.victims._otrain_entry", "--n-clean", "300", "--order-seed", "0", "--"]
    a1 = trainer_argv(one, 300, _oc_args(one, "cuda"))
    assert a1 == [sys.executable, *entry, *_oc_args(one, "cuda")]  # unchanged: python -m, one process

    a4 = trainer_argv(four, 300, _oc_args(four, "cuda"))
    assert a4[:3] == [sys.executable, "-m", "torch.distributed.run"]  # torchrun's module, this interpreter
    t = torchrun_args(a4[3:])  # read the way torchrun reads it
    assert (t.nproc_per_node, t.module, t.standalone) == ("4", True, True)
    assert [t.training_script, *t.training_script_args] == [*entry[1:], *_oc_args(four, "cuda")]

    # the same open_clip_train arguments, except that each of the 4 ranks takes a quarter of the
    # batch and the loss is the global one (local loss + gather with grad)
    p1, p4 = vars(parse_args(_oc_args(one, "cuda"))), vars(parse_args(_oc_args(four, "cuda")))
    assert (p1["batch_size"], p4["batch_size"]) == (128, 32)
    assert (p1["local_loss"], p1["gather_with_grad"], p4["local_loss"], p4["gather_with_grad"]) == (False, False, True, True)
    assert {k for k in p1 if p1[k] != p4[k]} == {"batch_size", "local_loss", "gather_with_grad"}


# sha256 (first 16 hex) of epoch_order's int64 bytes as committed before the sampler was sharded (9f7ecbb)
BEFORE_SHARDING = {(310, 0): "c681040085da24a1", (310, 1): "6768997b90a52be8",
                   (300, 0): "f8ca23d3f564963b", (300, 1): "2191e728b77df0b1"}


@pytest.mark.parametrize("n, epoch", sorted(BEFORE_SHARDING))
def test_one_replica_yields_the_order_of_before(n, epoch):
    s = CleanOrderSampler(range(n), 300, seed=0, num_replicas=1, rank=0)
    s.set_epoch(epoch)
    order = torch.tensor(list(s), dtype=torch.long)
    assert torch.equal(order, epoch_order(n, 300, 0, epoch)) and len(s) == n
    assert hashlib.sha256(order.numpy().tobytes()).hexdigest()[:16] == BEFORE_SHARDING[(n, epoch)]


def _shards(n, n_clean, w, epoch=0):
    out = []
    for r in range(w):
        s = CleanOrderSampler(range(n), n_clean, seed=7, num_replicas=w, rank=r)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(out[-1]) == len(s)
    return out


@pytest.mark.parametrize("n", [310, 311, 312])
def test_rank_shards_are_disjoint_equal_and_interleave_to_the_global_order(n):
    w = 3
    shards = _shards(n, 300, w)
    assert all(len(s) == n // w for s in shards)
    assert len(set().union(*shards)) == (n // w) * w  # disjoint
    woven = [shards[i % w][i // w] for i in range((n // w) * w)]
    assert woven == epoch_order(n, 300, 7, 0)[: (n // w) * w].tolist()
    assert _shards(n, 300, w, epoch=1) != shards  # every epoch a new order, the same on every rank


def test_rank_batches_together_are_the_one_gpu_batch():
    """With batch B / W per rank (what --gpus W passes), global step i trains on the pairs of the
    one-GPU run's step i, and the number of steps is the same (drop_last on each rank)."""
    n, b_global, w = 310, 30, 3
    one = epoch_order(n, 300, 7, 0)
    steps = n // b_global
    shards = _shards(n, 300, w)
    b = b_global // w
    assert all(len(s) // b == steps for s in shards)
    for i in range(steps):
        assert sorted(x for s in shards for x in s[i * b:(i + 1) * b]) == sorted(one[i * b_global:(i + 1) * b_global].tolist())


def test_open_clip_train_loader_is_sharded_by_args_rank(tiny_world, tmp_path):
    """``_otrain_entry`` shards by the rank and world size open_clip_train sets before building data."""
    from open_clip_train import data as oc_data

    from clip_poison.victims._otrain_entry import with_clean_order
    from clip_poison.victims.models import register_victims

    register_victims()
    tok = open_clip.get_tokenizer("rn-tiny-32")
    paths, caps, _, _ = training_rows(tiny_world / "train.csv", [])  # absolute paths, as train writes them
    write_csv_rows(tmp_path / "x.csv", paths, caps)
    args = argparse.Namespace(train_data=str(tmp_path / "x.csv"), csv_img_key="filepath", csv_caption_key="title",
                              csv_separator=",", batch_size=10, workers=0, distributed=False, world_size=3, rank=1)
    info = with_clean_order(oc_data.get_csv_dataset(args, lambda im: 0, True, tokenizer=tok), args, 300, 7)
    info.set_epoch(1)
    theirs = torch.cat([texts for _, texts in info.dataloader])
    tokens = tok(caps)
    assert torch.equal(theirs, tokens[_shards(300, 300, 3, epoch=1)[1]])


def test_gpu_refusals_come_before_any_work(tiny_world, tmp_path, monkeypatch):
    data = tiny_world / "train.csv"
    with pytest.raises(UserError, match="needs --backend open_clip_train"):
        train_victim(data, [], TrainConfig(gpus=2), tmp_path / "fast")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="torch sees 1"):
        train_victim(data, [], TrainConfig(gpus=2, backend="open_clip_train"), tmp_path / "oc")
    with pytest.raises(UserError, match="divisible"):
        train_open_clip_train(data, [], TrainConfig(gpus=3, batch_size=64, backend="open_clip_train"), tmp_path / "oc")
    with pytest.raises(UserError, match="at least one"):
        train_fast(data, [], TrainConfig(gpus=0), tmp_path / "fast")
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_amp_on_cpu_is_refused_by_both_backends(tiny_world, tmp_path):
    for backend in ("fast", "open_clip_train"):
        with pytest.raises(UserError, match="CUDA mode"):
            train_victim(tiny_world / "train.csv", [], TrainConfig(precision="amp", backend=backend), tmp_path / backend)
    assert not any(tmp_path.iterdir())


def test_cli_gpus_on_the_fast_backend_is_refused(bad_input, tiny_world, tmp_path):
    bad_input(["train", "--data", tiny_world / "train.csv", "--gpus", "2", "--out", tmp_path / "v"],
              what="`--gpus 2` with the fast backend", kind="unsupported", expect=["--backend open_clip_train"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="trains on CPU")
@pytest.mark.slow
def test_bf16_on_cpu_trains_another_victim_and_says_so(tiny_world, tmp_path):
    cfg = TrainConfig(model="rn-tiny-32", epochs=1, batch_size=64, warmup=2)
    fp32 = train_fast(tiny_world / "train.csv", [], cfg, tmp_path / "fp32")
    bf16 = train_fast(tiny_world / "train.csv", [], replace(cfg, precision="bf16", record_pair_loss=True),
                      tmp_path / "bf16")
    assert fp32["precision"] == {"asked": "auto", "used": "fp32", "device": "cpu", "gpus": 1}
    recorded = json.loads((tmp_path / "bf16" / "train.json").read_text())
    assert recorded["precision"] == {"asked": "bf16", "used": "amp_bf16", "device": "cpu", "gpus": 1}
    assert math.isfinite(bf16["final_loss"]) and all(map(math.isfinite, bf16["loss_per_step"]))
    w32, w16 = (torch.load(tmp_path / k / WEIGHTS, weights_only=True) for k in ("fp32", "bf16"))
    assert all(v.dtype == w32[k].dtype for k, v in w16.items())  # autocast leaves the weights fp32
    assert all(torch.isfinite(v).all() for v in w16.values() if v.is_floating_point())
    assert any(not torch.equal(w32[k], w16[k]) for k in w32 if w32[k].is_floating_point())
    # the first step's loss agrees to bfloat16's precision (8 mantissa bits), then the runs drift apart
    assert abs(bf16["loss_per_step"][0] - fp32["loss_per_step"][0]) < 0.05 * fp32["loss_per_step"][0]
    seen = np.load(tmp_path / "bf16" / PAIR_LOSS)[:, 0]
    assert np.isfinite(seen[~np.isnan(seen)]).all() and (~np.isnan(seen)).sum() == 256  # 4 batches of 64


@pytest.mark.slow
def test_an_objective_runs_under_the_steps_autocast(tiny_world, tmp_path):
    class Probe(Objective):
        name = "probe"
        seen: list = []

        def loss(self, imgs, tokens, idx, epoch):
            self.seen.append(torch.is_autocast_enabled(imgs.device.type))
            out = self.ctx.forward(imgs, tokens)
            return open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])

    cfg = TrainConfig(model="rn-tiny-32", epochs=1, batch_size=100, warmup=1)
    for precision, expect in (("fp32", False), ("bf16", True)):
        probe = Probe()
        probe.seen = []
        train_fast(tiny_world / "train.csv", [], replace(cfg, precision=precision), tmp_path / precision, objective=probe)
        assert probe.seen == [expect] * 3


def test_result_keeps_the_precision_record_unless_it_is_the_old_cpu_fp32():
    info = {"backend": "fast", "recipe": {}, "final_loss": 1.0}
    cpu_fp32 = {"asked": "auto", "used": "fp32", "device": "cpu", "gpus": 1}
    assert train_record({**info, "precision": cpu_fp32}) == {"backend": "fast", "final_loss": 1.0}
    for other in ({**cpu_fp32, "asked": "fp32"}, {**cpu_fp32, "used": "amp_bf16", "asked": "bf16"},
                  {**cpu_fp32, "used": "amp_bf16", "device": "cuda"}):
        assert train_record({**info, "precision": other})["precision"] == other


def test_webdataset_workers_are_counted_against_the_real_shards(tiny_world, tmp_path):
    """open_clip_train asserts shards >= workers x GPUs; a brace pattern counts as its shards."""
    from clip_poison.data.wds import csv_to_shards

    csv_to_shards(tiny_world / "train.csv", tmp_path / "clean", shard_size=100)  # 300 pairs: 3 shards
    cfg = TrainConfig(backend="open_clip_train", workers=4)
    with pytest.raises(UserError, match="exceeds the 3 shards"):
        train_victim(str(tmp_path / "clean" / "{00000..00002}.tar"), [], cfg, tmp_path / "v")
    assert not (tmp_path / "v").exists()
