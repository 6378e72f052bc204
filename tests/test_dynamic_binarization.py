"""data.binarization: dynamic — the grey sources of the fixed training images, matched one
to one; a fresh draw every epoch, the same after a resume; validation stays fixed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from pytorch_lightning.callbacks import Callback

from data_shards import BinarizedMNISTDataModule, write_shards
from data_shards.grey import match_grey_sources
from data_shards.sources import DataError
from pipeline.config import config_from_dict
from pipeline.train import run_training
from tests.conftest import tiny_config


def _grey_digits(n: int, seed: int) -> np.ndarray:
    """Grey 'digits': a random stroke mask per image with intensities in 1..255, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n, 784)) < 0.2
    return np.where(mask, rng.integers(1, 256, (n, 784)), 0).astype(np.uint8)


def _draw(grey: np.ndarray, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(grey.shape) * 255 < grey).astype(np.uint8)


def test_matching_recovers_a_shuffled_subset_of_sources_one_to_one():
    grey = _grey_digits(400, 0)
    order = np.random.default_rng(1).permutation(400)[:250]
    # Two near-identical sources: a digit and a copy with one pixel changed, both drawn.
    grey[order[1]] = grey[order[0]]
    grey[order[1], np.flatnonzero(grey[order[0]] == 0)[0]] = 255
    binary = _draw(grey[order], 2)
    match, stats = match_grey_sources(binary, grey, chunk=64)
    assert len(set(match.tolist())) == len(match)  # one to one
    assert (match == order).mean() >= 0.99  # at most the near-tie pair swapped
    assert stats["images"] == 250 and stats["clear"] + stats["near_ties"] == 250
    assert stats["near_ties"] >= 1  # the copy is a near-tie, reported as such


def test_matching_refuses_images_from_another_source():
    grey = _grey_digits(200, 0)
    with pytest.raises(DataError, match="match no grey image"):
        match_grey_sources(_draw(_grey_digits(50, 9), 3), grey)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """Fixed shards (one static draw of the grey digits) and the grey training sources."""
    tmp = tmp_path_factory.mktemp("dyn")
    grey = _grey_digits(1000, 5)
    fixed = {
        "train": _draw(grey[:800], 6),
        "valid": _draw(grey[800:], 7),
        "test": _draw(grey[800:], 8),
    }
    write_shards(fixed, tmp / "fixed", shard_size=500, source_hash="test", progress=False)
    write_shards(
        {"train": grey[:800]},
        tmp / "grey",
        shard_size=500,
        source_hash="test",
        progress=False,
        binarization="dynamic",
    )
    return tmp / "fixed", tmp / "grey", fixed["train"]


def _epoch_draws(dm: BinarizedMNISTDataModule, epoch: int) -> dict[int, bytes]:
    loader = dm.train_dataloader()
    loader.set_epoch(epoch)
    draws = {}
    for x, idx in loader:
        for row, i in zip(x.numpy(), idx.tolist(), strict=True):
            draws[i] = row.astype(np.uint8).tobytes()
    return draws


def test_dynamic_draws_change_every_epoch_and_repeat_from_the_seed(data):
    fixed, grey, _ = data
    dm = BinarizedMNISTDataModule(fixed, batch_size=100, seed=3, train_shard_dir=grey)
    e0, e1 = _epoch_draws(dm, 0), _epoch_draws(dm, 1)
    assert e0.keys() == e1.keys() and len(e0) == 800
    assert sum(e0[i] != e1[i] for i in e0) > 790  # a fresh draw for (nearly) every image
    again = BinarizedMNISTDataModule(fixed, batch_size=100, seed=3, train_shard_dir=grey)
    assert _epoch_draws(again, 1) == e1  # a function of (seed, epoch, image)
    other = BinarizedMNISTDataModule(fixed, batch_size=100, seed=4, train_shard_dir=grey)
    assert _epoch_draws(other, 1) != e1


def test_validation_and_the_training_subset_stay_the_fixed_images(data):
    fixed, grey, fixed_train = data
    dm = BinarizedMNISTDataModule(fixed, eval_batch_size=64, train_shard_dir=grey, train_eval=None)
    assert dm.val_splits == ("valid", "train")
    _, train_subset = dm.val_dataloader()
    for x, idx in train_subset:
        assert np.array_equal(x.numpy().astype(np.uint8), fixed_train[idx.numpy()])


def test_training_shards_of_another_size_are_refused(data, tmp_path):
    fixed, _, _ = data
    write_shards(
        {"train": _grey_digits(300, 1)},
        tmp_path / "g",
        shard_size=500,
        source_hash="test",
        progress=False,
        binarization="dynamic",
    )
    with pytest.raises(DataError, match="same images in the same order"):
        BinarizedMNISTDataModule(fixed, train_shard_dir=tmp_path / "g").setup("fit")


class FirstBatchPerEpoch(Callback):
    def __init__(self) -> None:
        self.seen: dict[int, str] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            x, idx = batch[0], batch[1]
            order = idx.argsort()
            digest = hashlib.sha256(x[order].cpu().numpy().tobytes() + idx[order].numpy().tobytes())
            self.seen[trainer.current_epoch] = digest.hexdigest()


def test_a_resumed_run_draws_what_an_uninterrupted_one_does(data, tmp_path):
    fixed, grey, _ = data

    def config(run_dir, epochs):
        raw = tiny_config(fixed, run_dir, train={"max_epochs": epochs})
        raw["data"].update(binarization="dynamic", grey_shard_dir=str(grey))
        raw["validation"]["gibbs"]["every_n_epochs"] = 0
        raw["samples"]["every_n_epochs"] = 0
        return config_from_dict(raw)

    whole = FirstBatchPerEpoch()
    run_training(config(tmp_path / "whole", 3), extra_callbacks=[whole])
    run_training(config(tmp_path / "split", 2))
    resumed = FirstBatchPerEpoch()
    run_training(config(tmp_path / "split", 3), resume=True, extra_callbacks=[resumed])
    assert list(resumed.seen) == [2]
    assert resumed.seen[2] == whole.seen[2]
    assert len(set(whole.seen.values())) == 3
