"""The clean-order sampler sharded per rank (open_clip_train under torchrun, one process per GPU):
one rank yields the order of before, W ranks split it DDP-like. Runs without a GPU."""
import argparse
import hashlib

import open_clip
import pytest
import torch

from clip_poison.data.csvdata import write_csv_rows
from clip_poison.victims.openclip_train import training_rows
from clip_poison.victims.order import CleanOrderSampler, epoch_order


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
