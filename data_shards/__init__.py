"""Binarized MNIST: acquisition, WebDataset shards, and streaming into (distributed) training.

The names below are imported on first use (PEP 562): `bihm --help` registers the `data`
sub-commands without importing numpy, webdataset or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_shards.datamodule import BinarizedMNISTDataModule
    from data_shards.shards import load_manifest, prepare, verify_shards, write_shards
    from data_shards.sources import DataError
    from data_shards.stream import eval_loader, train_loader

# What `prepare` can write (and `data.dataset` in a config can name).
DATASETS = (
    "binarized_mnist",
    "mnist_static",
    "mnist_dynamic",
    "mnist_continuous",
    # The grey sources of binarized_mnist's training images, in its order (data_shards.grey).
    "binarized_mnist_grey",
)

_HOMES = {
    "BinarizedMNISTDataModule": "data_shards.datamodule",
    "DataError": "data_shards.sources",
    "eval_loader": "data_shards.stream",
    "load_manifest": "data_shards.shards",
    "prepare": "data_shards.shards",
    "train_loader": "data_shards.stream",
    "verify_shards": "data_shards.shards",
    "write_shards": "data_shards.shards",
}
__all__ = [
    "DATASETS",
    "BinarizedMNISTDataModule",
    "DataError",
    "eval_loader",
    "load_manifest",
    "prepare",
    "train_loader",
    "verify_shards",
    "write_shards",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'data_shards' has no attribute {name!r}")
