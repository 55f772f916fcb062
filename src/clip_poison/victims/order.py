"""The clean-order sampler both backends share: rows [0, n_clean) are clean, the rest poisons; the
clean rows keep the same seeded order whether or not poisons are present and poison rows go to
seeded positions, so a clean and a poisoned victim see the same data order apart from P."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DistributedSampler


class CleanOrderSampler(DistributedSampler):
    """Rows [0, n_clean) are clean, the rest poisons. Subclasses DistributedSampler only so that
    open_clip_train's ``DataInfo.set_epoch`` forwards the epoch to it."""

    def __init__(self, dataset, n_clean: int, seed: int):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)
        self.n_total, self.n_clean, self.order_seed = len(dataset), n_clean, seed

    def __iter__(self):
        clean = np.random.default_rng([self.order_seed, self.epoch, 0]).permutation(self.n_clean)
        n_p = self.n_total - self.n_clean
        if n_p == 0:
            return iter(clean.tolist())
        prng = np.random.default_rng([self.order_seed, self.epoch, 1])
        slots = np.zeros(self.n_total, dtype=bool)
        slots[prng.choice(self.n_total, size=n_p, replace=False)] = True
        order = np.empty(self.n_total, dtype=np.int64)
        order[slots] = self.n_clean + prng.permutation(n_p)
        order[~slots] = clean
        return iter(order.tolist())

    def __len__(self):
        return self.n_total


def epoch_order(n: int, n_clean: int, seed: int, epoch: int) -> torch.Tensor:
    """Row indices of one epoch, exactly as open_clip_train's sampler (``CleanOrderSampler``) yields them."""
    sampler = CleanOrderSampler(range(n), n_clean, seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(iter(sampler)), dtype=torch.long)
