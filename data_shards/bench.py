"""Loader throughput: samples/s of the training loader, as the training loop consumes it."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence

import torch

from data_shards.shards import load_manifest
from data_shards.stream import train_loader


def bench_loader(
    shard_dir: str | os.PathLike,
    *,
    workers: Sequence[int] = (0, 1, 2),
    batch_size: int = 100,
    epochs: int = 2,
    limit: int | None = None,
) -> dict:
    """Iterate `epochs` training epochs for each DataLoader worker count and time them.

    Reports `samples_per_s` end to end (worker start-up and shuffle-buffer fill, paid every
    epoch, included) and `steady_samples_per_s` (from the first batch of each epoch on).
    """
    manifest = load_manifest(shard_dir)
    rows = []
    for num_workers in workers:
        loader = train_loader(
            shard_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            limit=limit,
            verify_sha256=False,
            manifest=manifest,
        )
        samples = steady_samples = 0
        seconds = steady_seconds = 0.0
        for _ in range(epochs):
            start = first = time.perf_counter()
            for i, (x, idx) in enumerate(loader):
                x[0, 0].item()  # touch the batch (no multi-threaded torch op: ~ms each here)
                samples += len(idx)
                if i == 0:
                    first = time.perf_counter()
                else:
                    steady_samples += len(idx)
            end = time.perf_counter()
            seconds += end - start
            steady_seconds += end - first
        rows.append(
            {
                "num_workers": num_workers,
                "batch_size": batch_size,
                "epochs": epochs,
                "samples": samples,
                "seconds": round(seconds, 3),
                "samples_per_s": round(samples / seconds),
                "steady_samples_per_s": round(steady_samples / steady_seconds),
            }
        )
    return {
        "shard_dir": str(shard_dir),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "loader": rows,
    }


def format_rows(results: dict) -> list[str]:
    return [
        f"train loader, {row['num_workers']} worker(s): "
        f"{row['samples_per_s']:,} samples/s end to end, "
        f"{row['steady_samples_per_s']:,} samples/s steady ({row['samples']} samples, "
        f"{row['epochs']} epochs, {row['seconds']:.2f} s, batch {row['batch_size']})"
        for row in results["loader"]
    ]
