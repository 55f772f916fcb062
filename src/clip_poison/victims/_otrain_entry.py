"""Entry point that runs open_clip_train unchanged except for two things it cannot be told by flags.

1. Our victim configs are registered (``open_clip.add_model_config``) before it looks models up.
2. The CSV loader's shuffle is replaced by a sampler that keeps the clean rows in the same seeded
   order whether or not poisons are present, inserting poison rows at seeded positions: a clean and
   a poisoned victim then see the same data order apart from the poisons, so differences between
   them are caused by P, not by a reshuffle.

Usage: python -m clip_poison.victims._otrain_entry --n-clean N --order-seed S -- <open_clip_train args>
(or under ``torchrun --nproc_per_node G -m clip_poison.victims._otrain_entry ...``: one process per GPU).
"""
from __future__ import annotations

import argparse
import sys

from torch.utils.data import DataLoader

from .order import CleanOrderSampler


def with_clean_order(info, args, n_clean: int, order_seed: int):
    """open_clip_train's CSV ``DataInfo`` with its shuffle replaced by ``CleanOrderSampler``
    (same dataset, batch size, workers and drop_last), sharded per rank under torchrun:
    open_clip_train sets ``args.world_size`` and ``args.rank`` (``init_distributed_device``)
    before it builds its data (``get_data``)."""
    from open_clip_train import data as oc_data

    ds = info.dataloader.dataset
    sampler = CleanOrderSampler(ds, n_clean, order_seed, num_replicas=args.world_size, rank=args.rank)
    dl = DataLoader(ds, batch_size=args.batch_size, shuffle=False, sampler=sampler,
                    num_workers=args.workers, pin_memory=False, drop_last=True)
    dl.num_samples, dl.num_batches = len(ds), len(dl)
    return oc_data.DataInfo(dl, sampler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--")
    ours = argparse.ArgumentParser()
    ours.add_argument("--n-clean", type=int, required=True)
    ours.add_argument("--order-seed", type=int, required=True)
    a = ours.parse_args(argv[:split])

    from open_clip_train import data as oc_data
    from open_clip_train.main import main as oc_main

    from .models import register_victims

    register_victims()

    def get_csv_dataset(args, preprocess_fn, is_train, epoch=0, tokenizer=None):
        info = original(args, preprocess_fn, is_train, epoch=epoch, tokenizer=tokenizer)
        return with_clean_order(info, args, a.n_clean, a.order_seed) if is_train else info

    original = oc_data.get_csv_dataset
    oc_data.get_csv_dataset = get_csv_dataset
    rc = oc_main(argv[split + 1:])
    return 0 if rc is None else (1 if rc == -1 else int(rc))


if __name__ == "__main__":
    sys.exit(main())
