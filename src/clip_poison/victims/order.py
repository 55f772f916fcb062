"""The clean-order sampler both backends share: rows [0, n_clean) are clean, the rest poisons; the
clean rows keep the same seeded order whether or not poisons are present and poison rows go to
seeded positions, so a clean and a poisoned victim see the same data order apart from P."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DistributedSampler


class CleanOrderSampler(DistributedSampler):
    """Rows [0, n_clean) are clean, the rest poisons. Subclasses DistributedSampler so that
    open_clip_train's ``DataInfo.set_epoch`` forwards the epoch to it. Under DDP (``num_replicas``
    W > 1) every rank draws the same global order, drops its tail to a multiple of W (as
    DistributedSampler with drop_last does) and takes rows ``rank, rank + W, ...`` of it: with a
    per-rank batch of B / W, global step i then trains on the pairs of the one-GPU run's batch i."""

    def __init__(self, dataset, n_clean: int, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)
        self.n_total, self.n_clean, self.order_seed = len(dataset), n_clean, seed

    def _global_order(self) -> np.ndarray:
        clean = np.random.default_rng([self.order_seed, self.epoch, 0]).permutation(self.n_clean)
        n_p = self.n_total - self.n_clean
        if n_p == 0:
            return clean
        prng = np.random.default_rng([self.order_seed, self.epoch, 1])
        slots = np.zeros(self.n_total, dtype=bool)
        slots[prng.choice(self.n_total, size=n_p, replace=False)] = True
        order = np.empty(self.n_total, dtype=np.int64)
        order[slots] = self.n_clean + prng.permutation(n_p)
        order[~slots] = clean
        return order

    def __iter__(self):
        order = self._global_order()
        w = self.num_replicas
        return iter(order[:len(order) // w * w][self.rank::w].tolist())

    def __len__(self):
        return self.n_total // self.num_replicas


def epoch_order(n: int, n_clean: int, seed: int, epoch: int) -> torch.Tensor:
    """Row indices of one epoch, exactly as open_clip_train's sampler (``CleanOrderSampler``) yields them."""
    sampler = CleanOrderSampler(range(n), n_clean, seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(iter(sampler)), dtype=torch.long)
