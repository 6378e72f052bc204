"""Writing shards and preparing data sets: round trip, manifest, atomicity, idempotence, sources."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from data_shards import (
    DataError,
    eval_loader,
    load_manifest,
    prepare,
    sources,
    train_loader,
    verify_shards,
    write_shards,
)
from data_shards.cli import main as cli_main
from tests.conftest import random_splits


def read_split(shard_dir, split, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """All (pixels, idx) of a split through eval_loader, in index order."""
    xs, idxs = [], []
    for x, idx in eval_loader(shard_dir, split, **kwargs):
        xs.append(x.numpy())
        idxs.append(idx.numpy())
    x, idx = np.concatenate(xs), np.concatenate(idxs)
    order = np.argsort(idx)
    return x[order], idx[order]


def write_amat_mirror(directory: Path, splits: dict[str, np.ndarray], gz=("train",)) -> None:
    """A fake binarized MNIST mirror: .amat.gz for splits in `gz`, plain .amat otherwise."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, images in splits.items():
        chars = np.full((len(images), 2 * 784), ord(" "), dtype=np.uint8)
        chars[:, 0::2] = images + ord("0")
        chars[:, -1] = ord("\n")
        text = chars.tobytes()
        name = f"binarized_mnist_{split}.amat"
        if split in gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(text, compresslevel=1))
        else:
            (directory / name).write_bytes(text)


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> tuple[Path, dict[str, np.ndarray]]:
    """A small mirror whose content hashes are made the 'known' ones."""
    splits = random_splits()
    write_amat_mirror(tmp_path / "mirror", splits)
    for split, images in splits.items():
        monkeypatch.setitem(sources.BINARIZED_MNIST_SHA256, split, sources.array_sha256(images))
    monkeypatch.delenv(sources.SOURCE_ENV, raising=False)
    return tmp_path / "mirror", splits


def test_write_read_round_trip(tmp_path):
    splits = random_splits()
    manifest = write_shards(splits, tmp_path, shard_size=100, source_hash="abc", progress=False)
    assert manifest == load_manifest(tmp_path)
    assert manifest["source_hash"] == "abc"
    assert {s: info["count"] for s, info in manifest["splits"].items()} == {
        "train": 250,
        "valid": 70,
        "test": 31,
    }
    train_shards = manifest["splits"]["train"]["shards"]
    assert [s["file"] for s in train_shards] == [f"train-00000{i}.tar" for i in range(3)]
    assert [s["count"] for s in train_shards] == [100, 100, 50]
    for shard in train_shards:
        digest = hashlib.sha256((tmp_path / shard["file"]).read_bytes()).hexdigest()
        assert shard["sha256"] == digest
    for split, images in splits.items():
        x, idx = read_split(tmp_path, split, batch_size=40)
        assert x.dtype == np.float32 and x.shape == images.shape
        np.testing.assert_array_equal(idx, np.arange(len(images)))
        np.testing.assert_array_equal(x, images)
    # Compact: a packed image is 98 bytes; a tar member costs 512 header + 512 data bytes.
    assert (tmp_path / "train-000000.tar").stat().st_size <= 100 * 1024 + 20 * 512
    # Same data, same bytes (fixed mtime): the sha256 identifies the content.
    again = write_shards(
        splits, tmp_path / "again", shard_size=100, source_hash="abc", progress=False
    )
    assert again["splits"] == manifest["splits"]


def test_labels_round_trip(tmp_path):
    splits = random_splits({"train": 120})
    labels = {"train": np.arange(120) % 10}
    write_shards(splits, tmp_path, shard_size=50, source_hash="x", labels=labels, progress=False)
    seen = {}
    for _, idx, y in eval_loader(tmp_path, "train", with_labels=True, batch_size=32):
        seen.update(zip(idx.tolist(), y.tolist(), strict=True))
    assert seen == {i: i % 10 for i in range(120)}


def test_rewrite_is_atomic_and_removes_stale_shards(tmp_path, monkeypatch):
    write_shards(
        random_splits({"train": 300}), tmp_path, shard_size=100, source_hash="a", progress=False
    )
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    # A failure half-way leaves the previous shards and manifest untouched, and no temp files.
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("data_shards.shards.file_sha256", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_shards(
            random_splits({"train": 300}, seed=1), tmp_path, shard_size=100, source_hash="b"
        )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()

    # A smaller re-write leaves no stale shard of the larger one behind.
    write_shards(
        random_splits({"train": 150}), tmp_path, shard_size=100, source_hash="c", progress=False
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "train-000000.tar",
        "train-000001.tar",
    ]


def test_write_shards_rejects_bad_arrays(tmp_path):
    images = random_splits({"train": 10})["train"]
    images[7, 123] = 2
    with pytest.raises(DataError, match=r"'train'.*00000007.*pixel 123.*value 2"):
        write_shards({"train": images}, tmp_path, source_hash="x", progress=False)
    with pytest.raises(DataError, match=r"shape \(10, 783\)"):
        write_shards({"train": images[:, :783]}, tmp_path, source_hash="x", progress=False)
    assert not any(tmp_path.iterdir())


def test_prepare_from_mirror_is_verified_and_idempotent(mirror, tmp_path, capsys):
    source, splits = mirror
    out = tmp_path / "shards"
    manifest = prepare(out, source, shard_size=100, progress=False)
    assert {s: info["count"] for s, info in manifest["splits"].items()} == {
        s: len(a) for s, a in splits.items()
    }
    assert manifest["source_hash"] == sources.binarized_mnist_source_hash()
    assert manifest["content_sha256"] == sources.BINARIZED_MNIST_SHA256
    np.testing.assert_array_equal(read_split(out, "valid")[0], splits["valid"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()

    assert prepare(out, source, shard_size=100, progress=False) == manifest
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # A different shard size is a different output: redone.
    assert (
        len(prepare(out, source, shard_size=50, progress=False)["splits"]["train"]["shards"]) == 5
    )


def test_prepare_uses_env_source(mirror, tmp_path, monkeypatch):
    source, splits = mirror
    monkeypatch.setenv(sources.SOURCE_ENV, str(source))
    manifest = prepare(tmp_path / "out", progress=False)
    assert manifest["splits"]["test"]["count"] == len(splits["test"])


def test_prepare_rejects_content_mismatch(mirror, tmp_path):
    source, _ = mirror
    path = source / "binarized_mnist_valid.amat"
    lines = path.read_text().splitlines(keepends=True)
    lines[5] = lines[5].replace("0", "1", 1)
    path.write_text("".join(lines))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"binarized_mnist_valid\.amat: content sha256"):
        prepare(out, source, progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_prepare_rejects_non_binary_source(mirror, tmp_path):
    source, _ = mirror
    path = source / "binarized_mnist_test.amat"
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = "0.5" + lines[3][1:]
    path.write_text("".join(lines))
    with pytest.raises(
        DataError, match=r"binarized_mnist_test\.amat: line 4: non-binary value '0\.5'"
    ):
        prepare(tmp_path / "out", source, progress=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_mirror(mirror):
    """Serve a plain-.amat copy of the mirror (the canonical layout) on 127.0.0.1."""
    source, splits = mirror
    served = source.parent / "served"
    write_amat_mirror(served, splits, gz=())

    def handler(*args, **kwargs):
        return _QuietHandler(*args, directory=str(served), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", served, splits
    server.shutdown()
    server.server_close()


def test_download_over_http(http_mirror, tmp_path):
    url, _, splits = http_mirror
    out = tmp_path / "out"
    manifest = prepare(out, url, shard_size=100, progress=False)
    assert manifest["splits"]["train"]["count"] == len(splits["train"])
    assert sorted(p.name for p in (out / "download").iterdir()) == [
        f"binarized_mnist_{s}.amat" for s in ("test", "train", "valid")
    ]
    np.testing.assert_array_equal(read_split(out, "train")[0], splits["train"])


def test_download_hash_mismatch_leaves_no_file(http_mirror, tmp_path):
    url, served, _ = http_mirror
    path = served / "binarized_mnist_train.amat"
    path.write_bytes(path.read_bytes().replace(b"0", b"1", 1))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"binarized_mnist_train\.amat: content sha256"):
        prepare(out, url, progress=False)
    assert not (out / "download" / "binarized_mnist_train.amat").exists()
    assert [p.name for p in (out / "download").iterdir() if "train" in p.name] == []
    assert not (out / "manifest.json").exists()


def test_download_from_file_url(mirror, tmp_path):
    source, splits = mirror
    write_amat_mirror(source, splits, gz=())  # the canonical files are plain .amat
    manifest = prepare(tmp_path / "out", source.as_uri() + "/", progress=False)
    assert manifest["splits"]["valid"]["count"] == len(splits["valid"])


def _write_idx(path: Path, array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw))
    return raw


@pytest.fixture
def idx_mirror(tmp_path, monkeypatch):
    """Tiny raw MNIST: 60 training and 20 test images; train/valid split at 40."""
    rng = np.random.default_rng(3)
    directory = tmp_path / "mnist"
    directory.mkdir()
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (60, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 60),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 20),
    }
    for stem, array in arrays.items():
        raw = _write_idx(directory / f"{stem}.gz", array)
        monkeypatch.setitem(sources.MNIST_MD5, stem, hashlib.md5(raw).hexdigest())
    monkeypatch.setattr(sources, "MNIST_TRAIN_SIZE", 40)
    monkeypatch.delenv(sources.MNIST_SOURCE_ENV, raising=False)
    return directory, arrays


def test_mnist_static_binarization_keeps_labels(idx_mirror, tmp_path):
    directory, arrays = idx_mirror
    manifest = prepare(tmp_path / "a", directory, dataset="mnist_static", seed=5, progress=False)
    assert manifest["labels"] and manifest["binarization"] == "static"
    assert {s: i["count"] for s, i in manifest["splits"].items()} == {
        "train": 40,
        "valid": 20,
        "test": 20,
    }
    labels = {}
    for x, idx, y in eval_loader(tmp_path / "a", "valid", with_labels=True):
        assert set(np.unique(x.numpy())) <= {0.0, 1.0}
        labels.update(zip(idx.tolist(), y.tolist(), strict=True))
    assert labels == dict(enumerate(arrays["train-labels-idx1-ubyte"][40:].tolist()))
    # Seeded: the same seed gives the same shards, another seed other pixels.
    same = prepare(tmp_path / "b", directory, dataset="mnist_static", seed=5, progress=False)
    other = prepare(tmp_path / "c", directory, dataset="mnist_static", seed=6, progress=False)
    assert same["splits"] == manifest["splits"] and other["splits"] != manifest["splits"]


def test_mnist_idx_md5_mismatch(idx_mirror, tmp_path, monkeypatch):
    directory, _ = idx_mirror
    monkeypatch.setitem(sources.MNIST_MD5, "t10k-images-idx3-ubyte", "0" * 32)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: md5"):
        prepare(tmp_path / "out", directory, dataset="mnist_static", progress=False)


def test_cli_prepare_and_bench(mirror, tmp_path, capsys):
    source, _ = mirror
    out = tmp_path / "shards"
    args = ["data", "prepare", "--source", str(source), "--out", str(out), "--no-progress"]
    assert cli_main([*args, "--shard-size", "100"]) == 0
    assert load_manifest(out)["shard_size"] == 100
    assert cli_main([*args, "--shard-size", "100"]) == 0
    assert "up to date" in capsys.readouterr().out
    report = tmp_path / "bench.json"
    bench = ["data", "bench", "--shards", str(out), "--workers", "0", "--batch-size", "50"]
    assert cli_main([*bench, "--epochs", "1", "--json", str(report)]) == 0
    (row,) = json.loads(report.read_text())["loader"]
    assert row["num_workers"] == 0 and row["samples"] == 250 and row["samples_per_s"] > 0
    assert "samples/s" in capsys.readouterr().out


def _pixels_by_idx(batches) -> dict[int, np.ndarray]:
    return {
        i: row for x, idx, *_ in batches for i, row in zip(idx.tolist(), x.numpy(), strict=True)
    }


def test_mnist_dynamic_binarization(idx_mirror, tmp_path):
    directory, arrays = idx_mirror
    out = tmp_path / "dyn"
    manifest = prepare(out, directory, dataset="mnist_dynamic", progress=False)
    assert manifest["binarization"] == "dynamic" and manifest["field"] == "u8"
    intensities = arrays["train-images-idx3-ubyte"].reshape(-1, 784)[:40]

    loader = train_loader(out, batch_size=10, seed=7)
    epoch0, epoch1 = _pixels_by_idx(loader), _pixels_by_idx(loader)
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    draws = np.stack([epoch0[i] for i in range(40)])
    assert set(np.unique(draws)) <= {0.0, 1.0}
    assert not np.array_equal(draws, np.stack([epoch1[i] for i in range(40)]))  # resampled
    assert np.all(draws[intensities == 0] == 0) and np.all(draws[intensities == 255] == 1)
    assert abs(draws.mean() - intensities.mean() / 255) < 0.02  # Bernoulli(intensity / 255)
    # A function of (seed, epoch, idx) only: not of batching, workers or shuffling.
    again = _pixels_by_idx(train_loader(out, batch_size=20, seed=7, shuffle_buffer=1))
    assert all(np.array_equal(again[i], epoch0[i]) for i in range(40))

    # Evaluation: one fixed draw, the same every time and whatever the batching.
    first = _pixels_by_idx(eval_loader(out, "valid", batch_size=7))
    second = _pixels_by_idx(eval_loader(out, "valid", batch_size=20, world_size=2, rank=1))
    assert all(np.array_equal(first[i], row) for i, row in second.items())


def test_mnist_continuous_dequantization(idx_mirror, tmp_path):
    """x = (k + u) / 256 with u ~ U[0, 1): in the intensity's bin, fresh every epoch, a
    function of (seed, epoch, idx) only, and one fixed draw for evaluation."""
    directory, arrays = idx_mirror
    out = tmp_path / "cont"
    manifest = prepare(out, directory, dataset="mnist_continuous", progress=False)
    assert manifest["binarization"] == "continuous" and manifest["field"] == "u8"
    intensities = arrays["train-images-idx3-ubyte"].reshape(-1, 784)[:40].astype(np.float64)

    loader = train_loader(out, batch_size=10, seed=7)
    epoch0, epoch1 = _pixels_by_idx(loader), _pixels_by_idx(loader)
    x = np.stack([epoch0[i] for i in range(40)]).astype(np.float64)
    assert epoch0[0].dtype == np.float32 and np.all(x >= 0) and np.all(x < 1)
    assert np.all(np.floor(x * 256) == intensities)  # the noise stays inside the bin
    noise = x * 256 - intensities
    assert abs(noise.mean() - 0.5) < 0.01 and abs(noise.var() - 1 / 12) < 0.005  # U[0, 1)
    assert not np.array_equal(x, np.stack([epoch1[i] for i in range(40)]))  # redrawn
    again = _pixels_by_idx(train_loader(out, batch_size=20, seed=7, shuffle_buffer=1))
    assert all(np.array_equal(again[i], epoch0[i]) for i in range(40))
    first = _pixels_by_idx(eval_loader(out, "valid", batch_size=7))
    second = _pixels_by_idx(eval_loader(out, "valid", batch_size=20, world_size=2, rank=1))
    assert all(np.array_equal(first[i], row) for i, row in second.items())


def test_source_may_be_the_parent_of_the_mirrors(idx_mirror, tmp_path, monkeypatch):
    """e.g. BIHM_DATA_SOURCE=shared/datasets, holding binarized_mnist/ and mnist/."""
    directory, _ = idx_mirror
    assert directory.name == "mnist"
    monkeypatch.setenv(sources.SOURCE_ENV, str(directory.parent))
    manifest = prepare(tmp_path / "out", dataset="mnist_dynamic", progress=False)
    assert manifest["splits"]["test"]["count"] == 20


def test_download_failure_names_the_url(http_mirror, tmp_path):
    url, served, _ = http_mirror
    (served / "binarized_mnist_valid.amat").unlink()
    out = tmp_path / "out"
    with pytest.raises(OSError, match=rf"{url}binarized_mnist_valid\.amat: download failed"):
        prepare(out, url, progress=False)
    assert [p.name for p in (out / "download").iterdir() if "valid" in p.name] == []


def test_prepare_rewrites_tampered_shards(mirror, tmp_path, capsys):
    source, _ = mirror
    out = tmp_path / "out"
    prepare(out, source, shard_size=100, progress=False)
    (out / "train-000001.tar").write_bytes(b"tampered")
    capsys.readouterr()
    prepare(out, source, shard_size=100, progress=False)
    assert "rewriting the shards: " in capsys.readouterr().out
    verify_shards(out, load_manifest(out))


def test_write_shards_rejects_bad_labels(tmp_path):
    splits = random_splits({"train": 5})
    with pytest.raises(DataError, match=r"'train': sample 00000003 has label 300"):
        write_shards(splits, tmp_path, source_hash="x", labels={"train": [1, 2, 3, 300, 4]})
    with pytest.raises(DataError, match=r"'train': no labels given"):
        write_shards(splits, tmp_path, source_hash="x", labels={"test": [1]})


def test_mnist_download_from_file_url(idx_mirror, tmp_path):
    directory, _ = idx_mirror
    out = tmp_path / "out"
    manifest = prepare(out, directory.as_uri(), dataset="mnist_static", progress=False)
    assert manifest["splits"]["train"]["count"] == 40
    assert len(list((out / "download").glob("*-ubyte.gz"))) == 4


def test_prepare_rejects_wrong_size_source_line(mirror, tmp_path):
    source, _ = mirror
    path = source / "binarized_mnist_valid.amat"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][2:]  # one value short
    path.write_text("".join(lines))
    with pytest.raises(
        DataError, match=r"valid\.amat: line 3: 783 values, expected 784 \(sample key 00000002\)"
    ):
        prepare(tmp_path / "out", source, progress=False)
