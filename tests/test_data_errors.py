"""Bad input: every case raises a clear error naming the file (and the sample key), never drops."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_shards import (
    BinarizedMNISTDataModule,
    DataError,
    eval_loader,
    load_manifest,
    train_loader,
    verify_shards,
    write_shards,
)
from data_shards.shards import file_sha256
from tests.conftest import random_splits

SHARD = "train-000001.tar"  # images 100..199: records with keys 00000100 and 00000150


@pytest.fixture
def shards(tmp_path) -> Path:
    write_shards(
        random_splits({"train": 250, "test": 40}),
        tmp_path,
        shard_size=100,
        source_hash="x",
        progress=False,
        images_per_record=50,
    )
    return tmp_path


def read_all(shard_dir, split="train", **kwargs) -> list[int]:
    loader = eval_loader(shard_dir, split, verify_sha256=False, batch_size=32, **kwargs)
    return [i for _, idx in loader for i in idx.tolist()]


def records(path: Path) -> list[dict]:
    return list(wds.tarfile_samples([{"url": str(path)}]))


def rewrite(shard_dir: Path, name: str, edited: list[dict]) -> None:
    """Replace a shard by `edited` records and update its sha256, so only the reader's checks
    (not the manifest's hash) can catch the problem."""
    with wds.TarWriter(str(shard_dir / name), encoder=False, mtime=0) as sink:
        for record in edited:
            sink.write({k: v for k, v in record.items() if k == "__key__" or k[0] != "_"})
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        if shard["file"] == name:
            shard["sha256"] = file_sha256(shard_dir / name)
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))


def test_sha256_mismatch_names_the_shard(shards):
    path = shards / SHARD
    data = bytearray(path.read_bytes())
    data[600] ^= 0x01  # one pixel bit inside the first record's data
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{SHARD}: sha256 .* does not match the manifest"):
        verify_shards(shards, load_manifest(shards))
    with pytest.raises(DataError, match=SHARD):
        train_loader(shards)
    with pytest.raises(DataError, match=SHARD):
        BinarizedMNISTDataModule(shards).setup("fit")
    eval_loader(shards, "test")  # other splits are still usable


def test_missing_shard_file(shards):
    (shards / SHARD).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{SHARD}: shard listed in the manifest"):
        eval_loader(shards, "train")


def test_truncated_inside_a_record(shards):
    path = shards / SHARD
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(
        DataError, match=rf"{SHARD}: corrupted or truncated tar before the first sample"
    ):
        read_all(shards)


@pytest.mark.parametrize("cut", ["boundary", "end-blocks"])
def test_truncated_between_records(shards, cut):
    """tarfile treats a clean cut between members as the end of the archive: only the count
    check against the manifest notices the missing images."""
    path = shards / SHARD
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keep = members[0].offset_data + 50 * 98  # after the first record (key 00000100)
    data = path.read_bytes()[: -(-keep // 512) * 512]
    if cut == "end-blocks":
        data += b"\0" * 1024  # a well-formed but short archive
    path.write_bytes(data)
    with pytest.raises(
        DataError,
        match=rf"{SHARD}: 50 images, the manifest says 100 \(truncated after sample key 00000100\)",
    ):
        read_all(shards)
    with pytest.raises(DataError, match=SHARD):
        list(train_loader(shards, verify_sha256=False, batch_size=50))


def test_corrupted_header(shards):
    path = shards / SHARD
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1].offset
    data[second + 100 : second + 108] = b"garbage!"  # the mode field: checksum now wrong
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{SHARD}: .*after sample key 00000100"):
        read_all(shards)


def test_wrong_size_sample(shards):
    edited = records(shards / SHARD)
    edited[1]["bits"] = edited[1]["bits"][:-1]
    rewrite(shards, SHARD, edited)
    with pytest.raises(
        DataError,
        match=rf"{SHARD}: sample key 00000150: 'bits' has 4899 bytes, expected 50 images of 98",
    ):
        read_all(shards)


def test_missing_field(shards):
    edited = records(shards / SHARD)
    edited[0]["pixels"] = edited[0].pop("bits")
    rewrite(shards, SHARD, edited)
    with pytest.raises(DataError, match=rf"{SHARD}: sample key 00000100: no 'bits' field"):
        read_all(shards)


@pytest.mark.parametrize("change", ["missing", "duplicated", "extra"])
def test_missing_duplicated_or_extra_record(shards, change):
    edited = records(shards / SHARD)
    if change == "missing":
        del edited[0]
        message = r"sample key '00000150' where '00000100' was expected"
    elif change == "duplicated":
        edited.insert(1, dict(edited[0]))
        message = r"corrupted or truncated tar before the first sample: 00000100\.bits: duplicate"
    else:
        edited.append({**edited[1], "__key__": "00000200"})
        message = r"unexpected sample key '00000200' after the 100 images"
    rewrite(shards, SHARD, edited)
    with pytest.raises(DataError, match=rf"{SHARD}: {message}"):
        read_all(shards)


def test_missing_manifest(tmp_path):
    message = rf"{tmp_path / 'manifest.json'}: no manifest"
    with pytest.raises(FileNotFoundError, match=message):
        load_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match=message):
        eval_loader(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match=message):
        BinarizedMNISTDataModule(tmp_path).setup("fit")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("source_hash"), "field source_hash missing"),
        (lambda m: m["splits"]["train"].update(count=9), r"field splits\.train\.count is 9"),
        (lambda m: m["splits"]["train"]["shards"][1].pop("sha256"), r"field .*shards\[1\]\.sha256"),
    ],
)
def test_bad_manifest_names_the_field(shards, edit, message):
    manifest = json.loads((shards / "manifest.json").read_text())
    edit(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"manifest\.json: {message}"):
        load_manifest(shards)


def test_manifest_not_json(shards):
    (shards / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json: not valid JSON"):
        load_manifest(shards)


def test_no_labels_requested_from_unlabelled_shards(shards):
    with pytest.raises(ValueError, match="no labels"):
        eval_loader(shards, "test", with_labels=True)


def test_dataset_too_small_for_the_world(shards):
    with pytest.raises(ValueError, match=r"250 samples cannot give every one of 3 ranks"):
        train_loader(shards, world_size=3, rank=0, batch_size=100)


def test_non_binary_shard_data_is_impossible_but_source_checked(tmp_path):
    """Bit-packed shards cannot hold other values; non-binary input is refused at writing."""
    images = np.zeros((3, 784), dtype=np.int64)
    images[2, 5] = -1
    with pytest.raises(DataError, match=r"sample 00000002 pixel 5 has value -1"):
        write_shards({"test": images}, tmp_path, source_hash="x", progress=False)
