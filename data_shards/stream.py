"""Streaming the shards into PyTorch: training and evaluation pipelines.

Training (`TrainStream`): every rank gets floor(n / (batch_size * world_size)) batches per epoch
(DDP hangs if ranks differ). Two orders:
- "permutation" (default, as the authors' code): every epoch is a fresh permutation of the whole
  training set, drawn from (seed, epoch) and the same on every rank; global batch j goes to rank
  j mod world_size, and a rank's batches to its DataLoader workers round-robin. Each slot holds
  the split in memory (bit-packed: 5 MB for binarized MNIST).
- "buffer", for splits too large to hold: each (rank, worker) "slot" reads its share of the
  shards in an endless loop, through a seeded shuffle buffer, and yields exactly its quota of
  full batches. Shares:
shards are dealt to the slots whole (a fresh deal per pass, from (seed, epoch)) as far as they go
round; the few left over are read by every slot, which keeps the samples with
idx % slots == slot. So shares are equal (an epoch is close to one permutation of the data) and
small subsets (e.g. `limit=2000` inside one shard) still feed every rank.

Evaluation (`EvalStream`): slot s of S gets the contiguous index range [s*n/S, (s+1)*n/S), so
over all ranks and workers each sample is seen exactly once with no padding, whatever the shard
count, and each slot opens only the shards that overlap its range. webdataset's
split_by_node/split_by_worker split by shard, which cannot give that guarantee.

Every sample is checked (key order, field, size) and any error names the shard file and key.
"""

from __future__ import annotations

import random
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bihm.subsets import in_spread_subset
from data_shards.shards import PACKED_BYTES, PIXELS, load_manifest, sample_key, verify_shards
from data_shards.sources import DataError

# Dynamic binarization and dequantization of evaluation splits: one fixed draw, same every time.
EVAL_EPOCH = -1


@dataclass(frozen=True)
class Shard:
    path: str
    count: int
    first_idx: int


@dataclass(frozen=True)
class SplitSpec:
    """What a reader needs to know about one split (picklable, for DataLoader workers).

    With a limit, the split is the `n` images at `bihm.subsets.spread_indices(count, n)`;
    position j of the subset is image `index(j)`.
    """

    name: str
    shards: tuple[Shard, ...]
    field: str  # "bits" (packed 0/1) or "u8" (intensities, binarized on the fly)
    labels: bool
    per_record: int  # images per record (WebDataset sample)
    count: int  # images in the split
    n: int  # images used: min(count, limit), spread over the split
    continuous: bool = False  # "u8" read as dequantized intensities instead of binarized

    @classmethod
    def from_manifest(cls, shard_dir, manifest: dict, split: str, limit: int | None = None):
        if split not in manifest["splits"]:
            raise DataError(f"{Path(shard_dir) / 'manifest.json'}: no split {split!r}")
        info = manifest["splits"][split]
        n = info["count"] if limit is None else min(info["count"], limit)
        if n < 1:
            raise DataError(f"split {split!r}: limit={limit} leaves no samples")
        shards = tuple(
            Shard(str(Path(shard_dir) / s["file"]), s["count"], s["first_idx"])
            for s in info["shards"]
        )
        labels = bool(manifest.get("labels"))
        return cls(
            split,
            shards,
            manifest["field"],
            labels,
            manifest["images_per_record"],
            info["count"],
            n,
            manifest.get("binarization") == "continuous",
        )

    def index(self, position: int) -> int:
        """The image index of position j of the (spread) subset."""
        return position * self.count // self.n

    def selected(self, sample: Sample) -> bool:
        return self.n == self.count or bool(in_spread_subset(sample.idx, self.count, self.n))

    def read(self, shard: Shard, lo: int = 0, hi: int | None = None) -> Iterator[Sample]:
        """The subset's samples of `shard` with index in [lo, hi), in order."""
        hi = self.count if hi is None else hi
        if shard.first_idx >= hi or shard.first_idx + shard.count <= lo:
            return
        for sample in read_shard(shard, self, stop=hi):
            if sample.idx >= lo and self.selected(sample):
                yield sample


class Sample(NamedTuple):
    idx: int
    payload: bytes
    label: int


def read_shard(shard: Shard, spec: SplitSpec, stop: int | None = None) -> Iterator[Sample]:
    """The images of one shard in order, validated; stops early at image index `stop`."""
    size = PACKED_BYTES if spec.field == "bits" else PIXELS
    end = shard.first_idx + shard.count
    records = wds.tarfile_samples([{"url": shard.path}])
    expected, key = shard.first_idx, None
    while expected < end and (stop is None or expected < stop):
        try:
            record = next(records)
        except StopIteration:
            raise DataError(
                f"{shard.path}: {expected - shard.first_idx} images, the manifest says "
                f"{shard.count} (truncated after sample key {key})"
            ) from None
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exn:
            where = f"after sample key {key}" if key is not None else "before the first sample"
            detail = exn.args[0] if exn.args else exn  # webdataset appends stream/url to args
            raise DataError(f"{shard.path}: corrupted or truncated tar {where}: {detail}") from exn
        key = record["__key__"]
        if key != sample_key(expected):
            raise DataError(
                f"{shard.path}: sample key {key!r} where {sample_key(expected)!r} was expected "
                "(samples missing, duplicated or out of order)"
            )
        rows = min(spec.per_record, end - expected)
        payload = record.get(spec.field)
        if payload is None:
            raise DataError(f"{shard.path}: sample key {key}: no {spec.field!r} field")
        if len(payload) != rows * size:
            raise DataError(
                f"{shard.path}: sample key {key}: {spec.field!r} has {len(payload)} bytes, "
                f"expected {rows} images of {size} bytes"
            )
        labels = record.get("labels") if spec.labels else None
        if spec.labels and (labels is None or len(labels) != rows):
            raise DataError(f"{shard.path}: sample key {key}: missing or bad 'labels' field")
        for row in range(rows if stop is None else min(rows, stop - expected)):
            label = -1 if labels is None else labels[row]
            yield Sample(expected + row, payload[row * size : (row + 1) * size], label)
        expected += rows
    # Nothing may follow the last image of the shard.
    if expected == end and (stop is None or stop >= end):
        try:
            extra = next(records, None)
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exn:
            detail = exn.args[0] if exn.args else exn
            raise DataError(
                f"{shard.path}: corrupted tar after sample key {key}: {detail}"
            ) from exn
        if extra is not None:
            raise DataError(
                f"{shard.path}: unexpected sample key {extra['__key__']!r} after the "
                f"{shard.count} images the manifest lists"
            )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def pixel_uniforms(idx: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """U[0, 1) float32 per (example, pixel), a pure function of (seed, epoch, idx, pixel).

    Counter-based hashing instead of a seeded generator per sample: the draw does not depend
    on batching, worker or rank, and costs a few vectorized integer ops per pixel.
    """
    with np.errstate(over="ignore"):
        stream = _splitmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))
        stream = _splitmix64(stream ^ np.uint64(epoch & (2**64 - 1)))
        counter = idx.astype(np.uint64)[:, None] * np.uint64(PIXELS) + np.arange(
            PIXELS, dtype=np.uint64
        )
        bits = _splitmix64(counter ^ stream)
    return (bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)  # [0, 1)


def dynamic_binarize(intensities: np.ndarray, idx: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Bernoulli(intensity / 255) per pixel, a pure function of (seed, epoch, idx, pixel)."""
    return (pixel_uniforms(idx, seed, epoch) * 255.0 < intensities).astype(np.uint8)


def dequantize(intensities: np.ndarray, idx: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """(k + u) / 256 with u ~ U[0, 1) per pixel: values in [0, 1), float32, a pure function
    of (seed, epoch, idx, pixel). A density on these values relates to the 0..255 scale by
    p_255(k + u) = p(x) / 256 per pixel (bits per dimension, see bihm.evaluation)."""
    return (intensities.astype(np.float32) + pixel_uniforms(idx, seed, epoch)) / np.float32(256.0)


class PackedBatch(NamedTuple):
    """What a worker sends to the main process: ~100x smaller than the float batch.

    Numpy arrays are pickled through the worker's pipe, while every torch tensor would get its
    own shared-memory segment; per batch that costs more than reading the samples. The float
    tensors are made in the main process by `to_tensors`.
    """

    bits: np.ndarray  # (B, 98) uint8, np.packbits of the binary pixels; continuous data:
    # (B, 784) float32 values in [0, 1), 4x more than the intensities but no pass in torch
    idx: np.ndarray  # (B,) int64
    labels: np.ndarray | None  # (B,) int64


def pack(
    samples: list[Sample],
    field: str,
    seed: int,
    epoch: int,
    with_labels: bool,
    continuous: bool = False,
) -> PackedBatch:
    idx = np.fromiter((s.idx for s in samples), dtype=np.int64, count=len(samples))
    payload = np.frombuffer(b"".join(s.payload for s in samples), dtype=np.uint8)
    payload = payload.reshape(len(samples), -1)
    if continuous:
        payload = dequantize(payload, idx, seed, epoch)
    elif field != "bits":
        payload = np.packbits(dynamic_binarize(payload, idx, seed, epoch), axis=1)
    labels = None
    if with_labels:
        labels = np.fromiter((s.label for s in samples), dtype=np.int64, count=len(samples))
    return PackedBatch(payload, idx, labels)


def to_tensors(batch: PackedBatch):
    """(x float32 (B, 784) in {0,1} (or [0, 1) for continuous data), idx int64 (B,)
    [, labels int64 (B,)])."""
    if batch.bits.dtype == np.float32:
        x = torch.from_numpy(batch.bits)
    else:
        x = torch.from_numpy(np.unpackbits(batch.bits, axis=1).astype(np.float32))
    tensors = (x, torch.from_numpy(batch.idx))
    return tensors if batch.labels is None else (*tensors, torch.from_numpy(batch.labels))


def _keep(batch: PackedBatch) -> PackedBatch:
    return batch  # instead of DataLoader's default_convert, which would make tensors in workers


class BatchLoader(DataLoader):
    """DataLoader over a stream of PackedBatch that delivers float tensors (see PackedBatch)."""

    def __init__(self, dataset: IterableDataset, **kwargs):
        kwargs.setdefault("batch_size", None)  # the dataset yields whole batches
        kwargs.setdefault("collate_fn", _keep)
        super().__init__(dataset, **kwargs)

    def __iter__(self):
        return map(to_tensors, super().__iter__())


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _SplitStream(IterableDataset):
    """Common part of the training and evaluation streams: one rank's view of one split."""

    epoch: int  # of the dynamic binarization draw

    def __init__(
        self,
        spec: SplitSpec,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int = 0,
        with_labels: bool = False,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.batch_size, self.seed, self.with_labels = batch_size, seed, with_labels

    def _collate(self, samples: list[Sample]) -> PackedBatch:
        return pack(
            samples,
            self.spec.field,
            self.seed,
            self.epoch,
            self.with_labels,
            self.spec.continuous,
        )


class TrainStream(_SplitStream):
    """Endless, reshuffled training stream of one rank; yields its per-epoch quota of batches.

    Set `epoch` before each iteration (EpochDataLoader does); the shuffle is a function of
    (seed, epoch, slot), and so is the dynamic binarization (of (seed, epoch, idx)).
    """

    def __init__(
        self,
        spec: SplitSpec,
        *,
        shuffle: str = "permutation",
        shuffle_buffer: int = 5000,
        **kwargs,
    ):
        super().__init__(spec, **kwargs)
        if shuffle not in ("permutation", "buffer"):
            raise ValueError(f"shuffle must be 'permutation' or 'buffer', got {shuffle!r}")
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.epoch = 0
        self.batches_per_epoch = spec.n // (self.batch_size * self.world_size)
        if self.batches_per_epoch < 1:
            raise DataError(
                f"split {spec.name!r}: {spec.n} samples cannot give every one of "
                f"{self.world_size} ranks a batch of {self.batch_size}"
            )
        self._samples: list[Sample] | None = None  # the split, loaded once per process

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _pass(self, slot: int, slots: int, npass: int) -> Iterator[Sample]:
        """One pass over this slot's share: dealt shards whole, plus its part of the leftovers."""
        spec = self.spec
        used = {
            shard: int(
                in_spread_subset(
                    np.arange(shard.first_idx, shard.first_idx + shard.count), spec.count, spec.n
                ).sum()
            )
            for shard in spec.shards
        }
        order = list(spec.shards)
        # The same permutation on every slot, so that dealing it out is a partition; redrawn
        # every pass and epoch so that no slot keeps the same shards.
        random.Random(f"deal:{self.seed}:{self.epoch}:{npass}").shuffle(order)
        # Full shards are dealt first, so a partial one (the split's last, or one cut by
        # `limit`) lands among the leftovers, which are shared by sample: equal shares.
        order.sort(key=lambda shard: used[shard] < max(used.values()))
        dealt = len(order) // slots * slots
        for shard in order[slot:dealt:slots]:
            yield from spec.read(shard)
        for shard in order[dealt:]:
            for sample in spec.read(shard):
                if sample.idx % slots == slot:
                    yield sample

    def _shuffled(self, slot: int, slots: int) -> Iterator[Sample]:
        """Endless: pass after pass, each shuffled on its own so that passes do not mix and a
        sample comes at most once per epoch unless the slot's share is smaller than its quota."""
        rng = random.Random(f"shuffle:{self.seed}:{self.epoch}:{slot}:{slots}")
        shuffle = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        for npass in range(1 << 62):
            found = 0
            for sample in shuffle(self._pass(slot, slots, npass)):
                found += 1
                yield sample
            if not found:  # guard against spinning forever on an empty share
                raise DataError(
                    f"split {self.spec.name!r}: no training samples for slot {slot} of {slots}"
                )

    def _permuted_batches(self, worker: int, workers: int) -> Iterator[PackedBatch]:
        """This (rank, worker)'s batches of the epoch's permutation of the whole split."""
        if self._samples is None:
            self._samples = [s for shard in self.spec.shards for s in self.spec.read(shard)]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self._samples))
        B, world = self.batch_size, self.world_size
        for j in range(worker, self.batches_per_epoch, workers):
            start = (j * world + self.rank) * B
            yield self._collate([self._samples[i] for i in order[start : start + B]])

    def __iter__(self):
        worker, workers = _worker()
        if self.shuffle == "permutation":
            return self._permuted_batches(worker, workers)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        quota = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        pipeline = wds.DataPipeline(
            lambda: self._shuffled(slot, slots),
            wds.batched(self.batch_size, collation_fn=self._collate, partial=False),
            wds.slice(quota),
        )
        return iter(pipeline)


class EvalStream(_SplitStream):
    """One rank's exactly-once share of an evaluation split, split further across workers."""

    def __init__(self, spec: SplitSpec, *, num_workers: int = 0, **kwargs):
        super().__init__(spec, **kwargs)
        self.workers = max(1, num_workers)
        self.epoch = EVAL_EPOCH

    def _range(self, worker: int) -> tuple[int, int]:
        slot, slots = self.rank * self.workers + worker, self.world_size * self.workers
        return slot * self.spec.n // slots, (slot + 1) * self.spec.n // slots

    def __len__(self) -> int:
        # Exact, because Lightning stops after len() batches: an underestimate would drop data.
        sizes = [hi - lo for lo, hi in map(self._range, range(self.workers))]
        return sum(-(-size // self.batch_size) for size in sizes)

    def _samples(self, lo: int, hi: int) -> Iterator[Sample]:
        """The subset's positions [lo, hi), i.e. images index(lo) .. index(hi - 1)."""
        if lo >= hi:
            return
        first, last = self.spec.index(lo), self.spec.index(hi - 1)
        for shard in self.spec.shards:
            yield from self.spec.read(shard, first, last + 1)

    def __iter__(self):
        worker, workers = _worker()
        if workers != self.workers:
            raise RuntimeError(f"EvalStream built for {self.workers} workers, run with {workers}")
        lo, hi = self._range(worker)
        pipeline = wds.DataPipeline(
            lambda: self._samples(lo, hi),
            wds.batched(self.batch_size, collation_fn=self._collate, partial=True),
        )
        return iter(pipeline)


class EpochDataLoader(BatchLoader):
    """DataLoader that sets its dataset's epoch each time an epoch's iteration starts.

    Lightning iterates the train loader once per epoch but calls set_epoch only on samplers,
    which an IterableDataset does not have; so the epoch is read here, from `epoch_fn` (e.g.
    the trainer's current_epoch, which also stays right after resuming from a checkpoint) or,
    without it, from a counter that `set_epoch` can reset. Workers must not be persistent:
    they copy the dataset, epoch included, when they start.
    """

    def __init__(
        self, dataset: TrainStream, *, epoch_fn: Callable[[], int] | None = None, **kwargs
    ):
        kwargs["persistent_workers"] = False
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn
        self.next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.next_epoch
        self.dataset.epoch = epoch
        self.next_epoch = epoch + 1
        return super().__iter__()


def _split_spec(
    shard_dir, split: str, limit, manifest: dict | None, verify: bool, with_labels: bool
) -> SplitSpec:
    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    if with_labels and not manifest.get("labels"):
        raise DataError(f"{Path(shard_dir) / 'manifest.json'}: these shards have no labels")
    if verify:
        verify_shards(shard_dir, manifest, [split])
    return SplitSpec.from_manifest(shard_dir, manifest, split, limit)


def train_loader(
    shard_dir,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 100,
    num_workers: int = 0,
    shuffle: str = "permutation",
    shuffle_buffer: int = 5000,
    seed: int = 0,
    limit: int | None = None,
    epoch_fn: Callable[[], int] | None = None,
    verify_sha256: bool = True,
    manifest: dict | None = None,
    with_labels: bool = False,
) -> EpochDataLoader:
    """Training batches (x, idx) for one rank; the same number of batches on every rank.

    Each iteration is one epoch, numbered by `epoch_fn()` if given, else 0, 1, 2, ...
    """
    stream = TrainStream(
        _split_spec(shard_dir, "train", limit, manifest, verify_sha256, with_labels),
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        with_labels=with_labels,
    )
    return EpochDataLoader(stream, epoch_fn=epoch_fn, num_workers=num_workers)


def eval_loader(
    shard_dir,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 500,
    num_workers: int = 0,
    limit: int | None = None,
    verify_sha256: bool = True,
    seed: int = 0,
    manifest: dict | None = None,
    with_labels: bool = False,
) -> DataLoader:
    """(x, idx) batches of `split` for one rank; over all ranks and workers each sample with
    the subset (`limit` images spread evenly over the split) comes exactly once, without
    padding. Ranks may get different batch counts."""
    stream = EvalStream(
        _split_spec(shard_dir, split, limit, manifest, verify_sha256, with_labels),
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        with_labels=with_labels,
    )
    return BatchLoader(stream, num_workers=num_workers)
