"""Binarized MNIST: acquisition, WebDataset shards, and streaming into (distributed) training."""

from data_shards.datamodule import BinarizedMNISTDataModule
from data_shards.shards import load_manifest, prepare, verify_shards, write_shards
from data_shards.sources import DataError
from data_shards.stream import eval_loader, train_loader

__all__ = [
    "BinarizedMNISTDataModule",
    "DataError",
    "eval_loader",
    "load_manifest",
    "prepare",
    "train_loader",
    "verify_shards",
    "write_shards",
]
