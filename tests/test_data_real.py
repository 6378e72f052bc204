"""End to end on the real binarized MNIST mirror (run by `.ci/run` through `make test-slow`).

Reads the mirror from $BIHM_DATA_SOURCE, else from shared/datasets/binarized_mnist next to the
repository. Fails (does not skip) when the mirror is missing: CI must exercise the real data.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from data_shards import eval_loader, load_manifest, verify_shards
from data_shards.bench import bench_loader
from data_shards.cli import main as cli_main

# From ../shared/datasets/README.md: sha256 of the decoded (N, 784) uint8 arrays.
EXPECTED = {
    "train": (50_000, "43490d4d6ac9002727af4426d8748609fdb7e4094fa65ad8d681ea60082a7a5a"),
    "valid": (10_000, "069b4f0beb389b776478c3e872b4df71c95ac4be64d7cbe6d32e24ebac8e6d5e"),
    "test": (10_000, "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86"),
}
# The training step runs roughly 1,000-3,000 images/s on this CPU; data must be 10x faster.
MIN_SAMPLES_PER_S = 30_000


def mirror() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared/datasets/binarized_mnist"
    source = Path(os.environ.get("BIHM_DATA_SOURCE") or default)
    assert source.is_dir(), f"{source}: binarized MNIST mirror not found (set BIHM_DATA_SOURCE)"
    return source


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory) -> Path:
    """`bihm data prepare` on the mirror, once for this module."""
    out = tmp_path_factory.mktemp("real") / "shards"
    assert cli_main(["data", "prepare", "--source", str(mirror()), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_prepare_real_binarized_mnist(real_shards, capsys):
    out = real_shards
    manifest = load_manifest(out)
    assert {split: info["count"] for split, info in manifest["splits"].items()} == {
        split: count for split, (count, _) in EXPECTED.items()
    }
    assert manifest["content_sha256"] == {split: digest for split, (_, digest) in EXPECTED.items()}
    assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == [
        f"train-{i:06d}.tar" for i in range(5)
    ]
    verify_shards(out, manifest)

    # What the loader delivers is exactly the published data set, sample for sample.
    for split, (count, digest) in EXPECTED.items():
        x = np.zeros((count, 784), dtype=np.uint8)
        seen = np.zeros(count, dtype=np.int64)
        for batch, idx in eval_loader(out, split, batch_size=5000, verify_sha256=False):
            x[idx.numpy()] = batch.numpy()
            seen[idx.numpy()] += 1
        assert np.all(seen == 1), split
        assert hashlib.sha256(x.tobytes()).hexdigest() == digest, split

    capsys.readouterr()
    assert cli_main(["data", "prepare", "--source", str(mirror()), "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_loader_throughput_real_data(real_shards):
    results = bench_loader(real_shards, workers=(0, 2), epochs=1)
    for row in results["loader"]:
        assert row["samples"] == 50_000
        assert row["samples_per_s"] >= MIN_SAMPLES_PER_S, row


@pytest.mark.slow
def test_grey_sources_of_the_real_training_images(tmp_path):
    """data.binarization: dynamic on the mirrors: every fixed training image gets a grey
    MNIST source it could have been drawn from (no impossible pixel), one to one with the
    validation images' sources, in the fixed set's order."""
    from data_shards import prepare
    from data_shards.sources import load_binarized_mnist

    out = tmp_path / "grey"
    manifest = prepare(out, mirror(), dataset="binarized_mnist_grey", progress=False)
    assert manifest["binarization"] == "dynamic" and manifest["splits"]["train"]["count"] == 50_000
    stats = manifest["match_stats"]
    assert stats["images"] == 60_000 and stats["clear"] > 0.85 * 60_000, stats
    assert stats["shared"] < 100, stats  # near-ties whose candidates were all taken
    fixed = load_binarized_mnist(mirror()).splits["train"]
    from data_shards.stream import SplitSpec, read_shard

    spec = SplitSpec.from_manifest(out, manifest, "train")
    intensities = np.zeros((50_000, 784), dtype=np.uint8)
    seen = np.zeros(50_000, dtype=np.int64)
    for shard in spec.shards:
        for sample in read_shard(shard, spec):
            intensities[sample.idx] = np.frombuffer(sample.payload, dtype=np.uint8)
            seen[sample.idx] += 1
    assert np.all(seen == 1)
    assert not ((fixed == 1) & (intensities == 0)).any()  # x = 1 needs g > 0
    assert not ((fixed == 0) & (intensities == 255)).any()  # x = 0 needs g < 255
    # Not MNIST's order: the same-index grey image would make many pixels impossible.
    from data_shards.grey import _mnist_source
    from data_shards.sources import load_mnist

    same_index = load_mnist(_mnist_source(mirror())).splits["train"]
    assert ((fixed == 1) & (same_index == 0)).sum() > 1_000_000
