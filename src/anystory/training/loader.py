"""Batches for the trainer: endless, bucketed, sharded across processes, resumable.

The data position of a run is one number, the count of batches this process has
consumed (identical on every process). Resuming at position k gives exactly the batches
an uninterrupted run would have seen next:
- map-style sources (manifests, sequences): each epoch is a seeded permutation grouped
  into single-bucket batches; process r takes batches r, r + W, ...; resuming jumps
  straight to the right epoch and batch;
- streamed sources (WebDataset shards, iterables): batches form in per-bucket buffers
  as records arrive; resuming replays the stream and discards the first k batches
  (exact, and costs one pass over the skipped data).
Per-sample augmentation is seeded by (seed, epoch, sample), never by worker state.
"""

from __future__ import annotations

import itertools
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from .data import Record, SampleError
from .transforms import SampleTransform, collate


def sample_rng(seed: int, epoch: int, sample: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, sample])


def _prepare(source_item, transform: SampleTransform, rng: np.random.Generator) -> dict | SampleError:
    """Record (or the SampleError raised while loading it) -> transformed sample or the error."""
    if isinstance(source_item, SampleError):
        return source_item
    try:
        return transform(source_item, rng)
    except SampleError as error:
        return error


class TransformedDataset(Dataset):
    """A map-style source with the transform applied; failures come back as SampleError."""

    def __init__(self, source: Sequence, transform: SampleTransform, seed: int):
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict | SampleError:
        try:
            record = self.source[index]
        except SampleError as error:
            return error
        return _prepare(record, self.transform, sample_rng(self.seed, self.epoch, index))


class BucketBatchSampler(Sampler[list[int]]):
    """Seeded per-epoch batches of indices that share a bucket; this process's share."""

    def __init__(self, bucket_ids: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.bucket_ids, self.batch_size, self.seed = bucket_ids, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.offset = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.bucket_ids))
        open_batches: dict[int, list[int]] = defaultdict(list)
        batches = []
        for index in order.tolist():
            batch = open_batches[self.bucket_ids[index]]
            batch.append(index)
            if len(batch) == self.batch_size:
                batches.append(open_batches.pop(self.bucket_ids[index]))
        usable = len(batches) // self.world * self.world  # every process gets as many
        return batches[self.rank:usable:self.world]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches(self.epoch)[self.offset:]

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch)) - self.offset


class StreamingBatches(IterableDataset):
    """Bucketed batches formed on the fly from an iterable of records."""

    def __init__(self, source: Iterable, transform: SampleTransform, batch_size: int, seed: int, rank: int, world: int):
        self.source, self.transform, self.batch_size, self.seed = source, transform, batch_size, seed
        self.rank, self.world, self.epoch = rank, world, 0

    def _records(self) -> Iterator:
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self.epoch)
        records = iter(self.source)
        if getattr(self.source, "splits_itself", False):
            return records
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        shards = self.world * workers
        return itertools.islice(records, self.rank * workers + worker_id, None, shards)

    def __iter__(self) -> Iterator[dict]:
        buffers: dict[int, list[dict]] = defaultdict(list)
        failures: list[SampleError] = []
        for position, item in enumerate(self._records()):
            key = item.key if isinstance(item, Record) else ""
            sample = _prepare(item, self.transform, sample_rng(self.seed, self.epoch, zlib.crc32(f"{position}:{key}".encode())))
            if isinstance(sample, SampleError):
                failures.append(sample)
                continue
            bucket = self.transform.bucket_of(*sample["pixel_values"].shape[-2:])
            buffers[bucket].append(sample)
            if len(buffers[bucket]) == self.batch_size:
                yield collate(buffers.pop(bucket) + failures)
                failures = []


class TrainingData:
    """Endless batches for one process; `batches(start)` resumes at data position `start`."""

    def __init__(
        self,
        source: Sequence | Iterable,
        transform: SampleTransform,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.transform, self.batch_size, self.seed, self.num_workers = transform, batch_size, seed, num_workers
        self.map_style = hasattr(source, "__getitem__") and hasattr(source, "__len__")
        if self.map_style:
            self.dataset = TransformedDataset(source, transform, seed)
            self.sampler = BucketBatchSampler(self._bucket_ids(source), batch_size, seed, rank, world)
            if not self.sampler.epoch_batches(0):
                raise ValueError(
                    f"{len(source)} samples make no full batch of {batch_size} per process for {world} process(es)"
                    + (" within one aspect-ratio bucket" if len(transform.buckets) > 1 else "")
                )
        else:
            self.dataset = StreamingBatches(source, transform, batch_size, seed, rank, world)

    def _bucket_ids(self, source: Sequence) -> list[int]:
        if len(self.transform.buckets) == 1:
            return [0] * len(source)
        sizes = [source.image_size(i) if hasattr(source, "image_size") else _record_size(source, i) for i in range(len(source))]
        return [0 if size is None else self.transform.bucket_of(*size) for size in sizes]

    def batches(self, start: int = 0) -> Iterator[dict]:
        if self.map_style:
            epoch, offset = self._locate(start)
            return self._epochs(epoch, offset)
        return itertools.islice(self._epochs(0, 0), start, None)

    def _locate(self, position: int) -> tuple[int, int]:
        epoch = 0
        while position >= (size := len(self.sampler.epoch_batches(epoch))):
            position -= size
            epoch += 1
        return epoch, position

    def _epochs(self, epoch: int, offset: int) -> Iterator[dict]:
        while True:
            self.dataset.epoch = epoch
            if self.map_style:
                self.sampler.epoch, self.sampler.offset = epoch, offset
            batching = dict(batch_sampler=self.sampler, collate_fn=collate) if self.map_style else dict(batch_size=None)
            loader = DataLoader(
                self.dataset,
                num_workers=self.num_workers,
                generator=torch.Generator(),  # leaves the global RNG alone (exact resume)
                **batching,
            )
            produced = 0
            for batch in loader:
                produced += 1
                yield batch
            if not produced and not offset:
                raise ValueError(f"epoch {epoch} produced no full batch of {self.batch_size}: too little data")
            epoch, offset = epoch + 1, 0


def _record_size(source: Sequence, index: int) -> tuple[int, int] | None:
    try:
        image = source[index].image
    except SampleError:
        return None
    return image.height, image.width
