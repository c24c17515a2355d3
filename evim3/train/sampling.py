"""Epoch order and per-item randomness that make a resumed run continue exactly where it stopped.

Two things usually make a resumed epoch differ from an uninterrupted one: the loader starts the epoch
from its first batch again, and augmentation draws from per-worker random streams whose position depends
on everything the worker loaded before. Here the sampler can start an epoch part-way through, and every
item is loaded under its own seed, a function of (run seed, epoch, position in the epoch's order) alone.
That order is the one shuffled order all ranks share, so the seed does not depend on the number of
processes either: N processes with batch b see the same items, augmented alike, as one process with N x b.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from evim3.runtime.errors import DatasetError


def item_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint32)[0])


class EpochSampler(DistributedSampler):
    """DistributedSampler (the same shuffled order on every rank, one shard each: rank r takes positions
    r, r + N, r + 2N, ...) that yields (index, seed) pairs and can skip the first samples of its shard in an
    epoch (`set_epoch(epoch, skip)`)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, *, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        for position in range(self.skip, len(indices)):
            global_position = position * self.num_replicas + self.rank
            yield indices[position], item_seed(self.seed, self.epoch, global_position)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


class SeededItems(Dataset):
    """Loads item `index` of `dataset` with torch's RNG seeded to `seed` (restored afterwards, so the
    caller's stream is untouched when loading in the main process); adds the item's `index`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            item = self.dataset[index]
        item["index"] = torch.tensor(index)
        return item


def make_loader(dataset: Dataset, *, batch: int, rank: int, world_size: int, shuffle: bool, seed: int,
                workers: int, drop_last: bool) -> DataLoader:
    """A loader over `dataset` whose sampler is an EpochSampler (reach it as `loader.sampler`).

    The loader gets its own generator, so creating an iterator does not draw from torch's global RNG
    (which a resumed run restores and the masking draws from)."""
    sampler = EpochSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed)
    return DataLoader(
        SeededItems(dataset), batch_size=batch, sampler=sampler, num_workers=workers, drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0,  # no re-fork per epoch
        pin_memory=torch.cuda.is_available(),
    )


class UnreadableVideos:
    """The videos this process could not decode during a run, learnt from the "unreadable" entries of the
    batches (``ClipDataset`` substitutes the next decodable video for such a video, in whichever process
    loads it). Each is warned about once on stderr and counted for the run summary; `strict` stops the run
    at the first instead."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.errors: set[str] = set()  # "path: problem" lines

    def note(self, error: str) -> None:
        if not error or error in self.errors:
            return
        if self.strict:
            raise DatasetError(None, f"{error} (stopped by --strict; without it, training skips videos that "
                                     "cannot be decoded)")
        self.errors.add(error)
        tqdm.write(f"warning: {error}: skipped, a video that cannot be decoded", file=sys.stderr)

    def note_batch(self, batch: dict) -> None:
        for error in batch["unreadable"]:
            self.note(error)

    def watch(self, batches: Iterable[dict]) -> Iterator[dict]:
        """`batches`, noting each one's unreadable videos as it passes."""
        for batch in batches:
            self.note_batch(batch)
            yield batch
