"""Deterministic seeding and RNG snapshots, so that a resumed run replays an uninterrupted one.

Data order depends only on ``(seed, epoch)`` (:class:`EpochSampler` and ``DistributedSampler``
reseed per epoch, and :func:`reseed_loader` resets the loader's generator that seeds its
workers), while the global python / numpy / torch generators that dropout or augmentation in
the main process draw from are saved with every checkpoint and restored on resume.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive python/numpy seeds from the torch worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator for a DataLoader (it draws the per-epoch worker base seed)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, epoch, stream) from numpy's SeedSequence.

    Distinct pairs give unrelated seeds: ``seed + epoch`` made seed 1's epoch 1 replay seed 0's
    epoch 2, so "three seeds" shared most of their data orders.
    """
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def reseed_loader(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make one epoch of ``loader`` a function of ``(seed, epoch)`` only (sampler, workers, view draws)."""
    for part in (getattr(loader, "sampler", None), loader.dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch, stream=2))


class EpochSampler(Sampler[int]):
    """A permutation drawn from ``epoch_seed(seed, epoch)``, optionally this rank's shard of it.

    Unlike ``RandomSampler`` its order does not depend on how many epochs ran before, which is
    what makes ``resume`` reproduce an uninterrupted run. With ``world_size`` > 1 the order is
    padded (repeating its start) to a multiple of the world size and rank r takes every
    world_size-th index from r, as ``DistributedSampler`` does; evaluation drops the repeats.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def _order(self) -> list:
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator()
        gen.manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.world_size > 1:
            total = len(self) * self.world_size
            order = (order * (total // max(1, len(order)) + 1))[:total]
            order = order[self.rank::self.world_size]
        return iter(order)

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)


# ------------------------------------------------------------------ snapshots

def rng_state() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Global RNG states split into tensors (torch) and JSON-able values (python, numpy)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    py_version, py_state, py_gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only if the devices exist)."""
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8).cpu())
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in cuda])
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
