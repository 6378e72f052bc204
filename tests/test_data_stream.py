"""Streaming: exactly-once evaluation, equal training batches per rank, per-epoch shuffles."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from bihm.subsets import spread_indices
from data_shards import BinarizedMNISTDataModule, eval_loader, train_loader, write_shards
from tests.conftest import random_splits

SIZES = {"train": 1000, "valid": 230, "test": 97}  # shard size 100: 10, 3 and 1 shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    splits = random_splits(SIZES)
    write_shards(splits, directory, shard_size=100, source_hash="test", progress=False)
    return directory, splits


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_every_sample_exactly_once(shards, world_size, num_workers):
    directory, splits = shards
    for split, limit in (("valid", None), ("test", None), ("valid", 150)):
        expected = (
            list(range(SIZES[split])) if limit is None else spread_indices(SIZES[split], limit)
        )
        seen = []
        for rank in range(world_size):
            loader = eval_loader(
                directory,
                split,
                rank=rank,
                world_size=world_size,
                batch_size=16,
                num_workers=num_workers,
                limit=limit,
            )
            batches = list(loader)
            assert len(batches) == len(loader)  # Lightning trusts len(): it must be exact
            assert batches, f"rank {rank} got no work"
            for x, idx in batches:
                assert x.dtype == torch.float32 and x.shape == (len(idx), 784)
                assert idx.dtype == torch.int64
                np.testing.assert_array_equal(x.numpy(), splits[split][idx.numpy()])
                seen.extend(idx.tolist())
        assert sorted(seen) == list(expected), (split, limit)


@pytest.mark.parametrize("shuffle", ["permutation", "buffer"])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_equal_batches_per_rank(shards, world_size, num_workers, shuffle):
    directory, splits = shards
    expected_batches = SIZES["train"] // (50 * world_size)
    seen = []
    for rank in range(world_size):
        loader = train_loader(
            directory,
            rank=rank,
            world_size=world_size,
            batch_size=50,
            num_workers=num_workers,
            shuffle=shuffle,
        )
        batches = list(loader)
        assert len(batches) == len(loader) == expected_batches
        for x, idx in batches:
            assert x.shape == (50, 784) and x.dtype == torch.float32
            np.testing.assert_array_equal(x.numpy(), splits["train"][idx.numpy()])
            seen.extend(idx.tolist())
    # Ranks read disjoint shares: no sample twice within an epoch.
    assert len(seen) == len(set(seen)) == expected_batches * 50 * world_size


@pytest.mark.parametrize("shuffle", ["permutation", "buffer"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_train_limit_feeds_every_rank(shards, world_size, shuffle):
    """A subset inside one shard (fewer shards than ranks): split by sample instead."""
    directory, _ = shards
    seen = []
    for rank in range(world_size):
        loader = train_loader(
            directory, rank=rank, world_size=world_size, batch_size=10, limit=60, shuffle=shuffle
        )
        batches = [idx for _, idx in loader]
        assert len(batches) == 60 // (10 * world_size)
        seen.extend(torch.cat(batches).tolist())
    assert sorted(seen) == spread_indices(SIZES["train"], 60).tolist()


@pytest.mark.parametrize("shuffle", ["permutation", "buffer"])
def test_train_shuffle_differs_per_epoch_and_is_seeded(shards, shuffle):
    directory, _ = shards

    def epochs(seed, n=2):
        loader = train_loader(
            directory, batch_size=50, shuffle=shuffle, shuffle_buffer=300, seed=seed
        )
        return [torch.cat([idx for _, idx in loader]).tolist() for _ in range(n)]

    first, second = epochs(seed=0)
    assert first != second
    assert sorted(first) == sorted(second) == list(range(SIZES["train"]))  # one full pass each
    assert epochs(seed=0) == [first, second]  # reproducible
    assert epochs(seed=1, n=1)[0] != first
    # The epoch can also be set explicitly (e.g. when resuming).
    loader = train_loader(directory, batch_size=50, shuffle=shuffle, shuffle_buffer=300, seed=0)
    loader.set_epoch(1)
    assert torch.cat([idx for _, idx in loader]).tolist() == second


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_permutation_is_one_global_permutation_dealt_by_batch(shards, num_workers):
    """As the authors' data order: every epoch a fresh permutation of the whole training set;
    global batch j is rank j mod world's; its first batch mixes images from every shard."""
    directory, _ = shards
    world, B = 2, 50
    per_rank = [
        [
            idx.tolist()
            for _, idx in train_loader(
                directory, rank=r, world_size=world, batch_size=B, num_workers=num_workers
            )
        ]
        for r in range(world)
    ]
    order = np.random.default_rng([0, 0]).permutation(SIZES["train"]).tolist()
    interleaved = [i for batches in zip(*per_rank, strict=True) for b in batches for i in b]
    assert interleaved == order[: len(interleaved)]
    assert len({i // 100 for i in per_rank[0][0]}) >= 5  # of 10 shards of 100 (the fixture)


def test_datamodule_rank_epoch_from_trainer(shards):
    directory, _ = shards
    dm = BinarizedMNISTDataModule(directory, batch_size=50, eval_batch_size=40, seed=3)
    assert dm.rank_and_world_size() == (0, 1)
    # The epoch comes from the fit loop's count of processed epochs (right after a resume).
    progress = SimpleNamespace(processed=4)
    fit_loop = SimpleNamespace(epoch_progress=SimpleNamespace(current=progress))
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, fit_loop=fit_loop)
    train = dm.train_dataloader()
    assert len(train) == SIZES["train"] // 100
    epoch4 = [idx.tolist() for _, idx in train]
    assert epoch4 == [idx.tolist() for _, idx in train]  # epoch comes from the trainer
    progress.processed = 5
    assert epoch4 != [idx.tolist() for _, idx in train]
    reference = train_loader(directory, rank=1, world_size=2, batch_size=50, seed=3)
    reference.set_epoch(4)
    assert epoch4 == [idx.tolist() for _, idx in reference]
    seen = [i for _, idx in dm.val_dataloader() for i in idx.tolist()]
    dm.trainer.global_rank = 0
    seen += [i for _, idx in dm.val_dataloader() for i in idx.tolist()]
    assert sorted(seen) == list(range(SIZES["valid"]))


def _quiet_trainer(**kwargs) -> pl.Trainer:
    """Two epochs on CPU, without logs, checkpoints or sanity validation."""
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


class _Recorder(pl.LightningModule):
    """Records which samples each epoch's training and validation batches hold."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(784, 1)
        self.train_idx: dict[int, list[int]] = {}
        self.val_idx: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, idx = batch
        self.train_idx.setdefault(self.current_epoch, []).extend(idx.tolist())
        return self.layer(x).mean()

    def validation_step(self, batch, batch_idx):
        x, idx = batch
        self.val_idx.setdefault(self.current_epoch, []).extend(idx.tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_reshuffles_and_validates_once(shards):
    directory, _ = shards
    dm = BinarizedMNISTDataModule(directory, batch_size=50, train_limit=400, valid_limit=120)
    model = _Recorder()
    _quiet_trainer(devices=1).fit(model, datamodule=dm)
    assert sorted(model.train_idx) == [0, 1]
    for epoch in (0, 1):
        assert sorted(model.train_idx[epoch]) == spread_indices(SIZES["train"], 400).tolist()
        assert sorted(model.val_idx[epoch]) == spread_indices(SIZES["valid"], 120).tolist()
    assert model.train_idx[0] != model.train_idx[1]


class _FileRecorder(_Recorder):
    """Writes what each rank saw per epoch to out_dir (spawned processes share no memory)."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    def on_train_epoch_end(self):
        path = f"{self.out_dir}/rank{self.global_rank}-epoch{self.current_epoch}.json"
        with open(path, "w") as f:
            json.dump({"train": self.train_idx, "val": self.val_idx}, f)


@pytest.mark.slow
def test_lightning_ddp_two_ranks(shards, tmp_path):
    """Real DDP (gloo, 2 CPU processes): equal train batches, disjoint shares, exact validation."""
    directory, _ = shards
    dm = BinarizedMNISTDataModule(directory, batch_size=50, valid_limit=150, num_workers=1)
    trainer = _quiet_trainer(devices=2, strategy="ddp_spawn")
    trainer.fit(_FileRecorder(str(tmp_path)), datamodule=dm)
    for epoch in (0, 1):
        ranks = [json.loads((tmp_path / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
        train = [r["train"][str(epoch)] for r in ranks]
        assert len(train[0]) == len(train[1]) == SIZES["train"] // 2
        assert sorted(train[0] + train[1]) == list(range(SIZES["train"]))
        val = [i for r in ranks for i in r["val"].get(str(epoch), [])]
        assert sorted(val) == spread_indices(SIZES["valid"], 150).tolist()
