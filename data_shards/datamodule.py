"""LightningDataModule over the shards written by `bihm data prepare`."""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader

from data_shards.shards import load_manifest, verify_shards
from data_shards.sources import DataError
from data_shards.stream import EpochDataLoader, eval_loader, train_loader


class BinarizedMNISTDataModule(pl.LightningDataModule):
    """Batches (x float32 (B, 784) in {0,1}, idx int64 (B,)) from WebDataset shards.

    Rank and world size come from the attached trainer (Lightning DDP, Ray's RayDDPStrategy),
    else from torch.distributed, else 0 / 1. Training gives every rank the same number of
    batches per epoch and reshuffles from (seed, epoch), by default as a fresh permutation of
    the whole split (`shuffle="permutation"`; "buffer" streams through a shuffle buffer). The
    train loader reads the epoch each time an epoch starts iterating it (see EpochDataLoader),
    so no `reload_dataloaders_every_n_epochs` is needed. Validation and test see each sample
    exactly once over all ranks and workers. `*_limit` keeps that many samples,
    spread evenly over the split (`bihm.subsets.spread_indices`).
    `train_eval` adds a second validation loader over a fixed, spread-out subset of the
    *training* images, scored like the validation images to show the generalization gap:
    0 (the default) none, None as many as the validation images in use, n that many.
    `val_splits` names the validation loaders in order ("valid", then "train" if any).
    `train_shard_dir` streams the training split from other shards with the same images in
    the same order, e.g. their grey sources for dynamic binarization (`data_shards.grey`);
    validation, test and the training subset still come from `shard_dir`.
    Shards of dynamically binarized MNIST are resampled per (seed, epoch, idx) in training and
    drawn once, with a fixed seed independent of `seed`, for validation and test; continuous
    MNIST (x in [0, 1), float32) is dequantized the same way.
    DataLoader workers are started afresh every epoch (they copy the epoch when they start).
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        batch_size: int = 100,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        shuffle: str = "permutation",
        shuffle_buffer: int = 5000,
        seed: int = 0,
        train_limit: int | None = None,
        valid_limit: int | None = None,
        test_limit: int | None = None,
        verify_sha256: bool = True,
        with_labels: bool = False,
        train_eval: int | None = 0,
        train_shard_dir: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.shard_dir = shard_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.limits = {"train": train_limit, "valid": valid_limit, "test": test_limit}
        self.verify_sha256 = verify_sha256
        self.with_labels = with_labels  # batches (x, idx, labels)
        if train_eval is not None and train_eval < 0:
            raise ValueError(f"train_eval must be >= 0 or None, got {train_eval}")
        self.train_eval = train_eval
        self.train_shard_dir = train_shard_dir
        self.train_manifest: dict | None = None
        self.manifest: dict | None = None
        self._verified = False
        # A tiny evaluation subset may leave some ranks without a sample (e.g. valid_limit=1
        # on 2 ranks); that is correct here, so Lightning must not refuse it.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is None:
            self.manifest = load_manifest(self.shard_dir)
            self.train_manifest = self.manifest
            if self.train_shard_dir is not None:
                self.train_manifest = load_manifest(self.train_shard_dir)
                self._check_train_shards()
        if self.verify_sha256 and not self._verified:
            verify_shards(self.shard_dir, self.manifest)
            if self.train_shard_dir is not None:
                verify_shards(self.train_shard_dir, self.train_manifest)
            self._verified = True

    def _check_train_shards(self) -> None:
        """The training shards must hold as many training images as `shard_dir`'s: index i
        is the same digit in both (the train-eval subset reads it from `shard_dir`)."""
        want = self.manifest["splits"]["train"]["count"]
        have = self.train_manifest["splits"].get("train", {}).get("count")
        if have != want:
            raise DataError(
                f"{self.train_shard_dir}: {have} training images, but {self.shard_dir} has "
                f"{want}; the two must hold the same images in the same order"
            )

    def split_size(self, split: str) -> tuple[int, int]:
        """(images in the split, images used): the used ones are spread over the split."""
        self.setup()
        count = self.manifest["splits"][split]["count"]
        limit = self.limits[split]
        return count, count if limit is None else min(count, limit)

    def rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _current_epoch(self) -> int:
        """The epoch whose shuffle the train loader uses: the number of epochs the fit loop
        has processed. After resuming from a checkpoint written at an epoch end, Lightning
        creates the epoch's iterator while `trainer.current_epoch` still lags by one, which
        would repeat the previous epoch's order (tests/test_train.py resumes mid-run)."""
        return self.trainer.fit_loop.epoch_progress.current.processed

    def train_dataloader(self) -> EpochDataLoader:
        self.setup()
        rank, world_size = self.rank_and_world_size()
        return train_loader(
            self.shard_dir if self.train_shard_dir is None else self.train_shard_dir,
            rank=rank,
            world_size=world_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            limit=self.limits["train"],
            epoch_fn=self._current_epoch if self.trainer is not None else None,
            verify_sha256=False,  # done once in setup()
            manifest=self.train_manifest,
            with_labels=self.with_labels,
        )

    def train_eval_count(self) -> int:
        """How many training images each validation also scores (0: none)."""
        if self.train_eval == 0:
            return 0
        n = self.split_size("valid")[1] if self.train_eval is None else self.train_eval
        return min(n, self.split_size("train")[0])

    @property
    def val_splits(self) -> tuple[str, ...]:
        """The split behind each validation loader, in the order of `val_dataloader`."""
        return ("valid", "train") if self.train_eval_count() else ("valid",)

    def _eval_dataloader(self, split: str, limit: int | None = None) -> DataLoader:
        self.setup()
        rank, world_size = self.rank_and_world_size()
        return eval_loader(
            self.shard_dir,
            split,
            rank=rank,
            world_size=world_size,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            limit=self.limits[split] if limit is None else limit,
            verify_sha256=False,
            seed=0,  # one fixed dynamic-binarization draw, whatever the training seed
            manifest=self.manifest,
            with_labels=self.with_labels,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if "train" not in self.val_splits:
            return self._eval_dataloader("valid")
        # The training subset is read as an evaluation split: each image once over all
        # ranks, in index order, the fixed images (never a dynamic training draw).
        return [
            self._eval_dataloader("valid"),
            self._eval_dataloader("train", limit=self.train_eval_count()),
        ]

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")
