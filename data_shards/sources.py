"""Acquisition of the raw data: binarized MNIST (.amat) and raw MNIST (IDX), local or downloaded.

Every loader returns uint8 arrays of shape (N, 784) and checks them against known content hashes,
so a corrupted mirror or download is caught before any shard is written.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bihm.atomic import commit
from bihm.errors import UserError

PIXELS = 784
SPLITS = ("train", "valid", "test")

# Environment variables naming a local mirror folder (instead of downloading).
SOURCE_ENV = "BIHM_DATA_SOURCE"  # binarized MNIST (.amat / .amat.gz)
MNIST_SOURCE_ENV = "BIHM_MNIST_SOURCE"  # raw MNIST IDX files

BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
# sha256 of the decoded (N, 784) uint8 C-ordered array (../shared/datasets/README.md).
BINARIZED_MNIST_SHA256 = {
    "train": "43490d4d6ac9002727af4426d8748609fdb7e4094fa65ad8d681ea60082a7a5a",
    "valid": "069b4f0beb389b776478c3e872b4df71c95ac4be64d7cbe6d32e24ebac8e6d5e",
    "test": "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86",
}
BINARIZED_MNIST_COUNTS = {"train": 50_000, "valid": 10_000, "test": 10_000}

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # LeCun's files, byte-identical
# md5 of the decompressed IDX files (images from the datasets README; labels of the same files).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_TRAIN_SIZE = 50_000  # the usual 50k/10k train/valid split of MNIST's 60k training images


class DataError(UserError, ValueError):
    """Bad input data. The message names the file and, where it applies, the sample key or line."""


class MissingDataError(DataError, FileNotFoundError):
    """A file or folder that the data needs does not exist (the message names it)."""


class SourceError(DataError, OSError):
    """The raw data could not be had: a missing or unreadable mirror, a failed download.
    (Unlike an error writing the shards, advice about $BIHM_DATA_SOURCE fits it.)"""


@dataclass
class RawData:
    """Decoded splits plus what identifies them."""

    splits: dict[str, np.ndarray]  # (N, 784) uint8: 0/1 or intensities 0..255
    source_hash: str
    labels: dict[str, np.ndarray] | None = None
    content_sha256: dict[str, str] = field(default_factory=dict)


def array_sha256(array: np.ndarray) -> str:
    """The content hash used throughout: sha256 of the C-ordered uint8 bytes."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()


def combined_hash(parts: Mapping[str, str]) -> str:
    """One hash for a data set from its per-part hashes (order independent)."""
    text = "".join(f"{name}={value}\n" for name, value in sorted(parts.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def binarized_mnist_source_hash() -> str:
    return combined_hash(BINARIZED_MNIST_SHA256)


def mnist_source_hash() -> str:
    return combined_hash(MNIST_MD5)


RAW_FILES = tuple(f"binarized_mnist_{split}.amat" for split in SPLITS) + tuple(MNIST_MD5)


def raw_data_files(folder: str | os.PathLike) -> list[str]:
    """The raw data files (binarized MNIST .amat, MNIST IDX, gzipped or not) in `folder` or
    in its binarized_mnist/ and mnist/ sub-folders (a parent of the mirrors, as `prepare`
    accepts for a source), as paths relative to `folder`. Such a folder is a data source:
    shards are never written into it."""
    folder = Path(folder)
    found = []
    for sub in ("", "binarized_mnist", "mnist"):
        for stem in RAW_FILES:
            for name in (stem, f"{stem}.gz"):
                if (folder / sub / name).is_file():
                    found.append(str(Path(sub) / name))
    return found


def is_url(source: str | os.PathLike | None) -> bool:
    return isinstance(source, str) and source.split("://", 1)[0] in ("http", "https", "file")


# --------------------------------------------------------------------------- .amat parsing


def parse_amat(raw: bytes, name: str) -> np.ndarray:
    """Parse .amat text (one image per line, 784 whitespace-separated 0/1 values).

    Vectorized instead of np.loadtxt (which takes ~30 s for the training file). Each value
    must be the single character '0' or '1'; anything else is reported with its line number.
    """
    buf = np.frombuffer(raw, dtype=np.uint8)
    if not buf.size:
        raise DataError(f"{name}: no data")
    is_ws = (buf == ord(" ")) | (buf == ord("\n")) | (buf == ord("\r")) | (buf == ord("\t"))
    tokens = ~is_ws
    line_of = np.concatenate(([0], np.cumsum(buf == ord("\n"))[:-1]))
    # A token is bad if it has a character other than 0/1 or is longer than one character.
    bad = tokens & (buf != ord("0")) & (buf != ord("1"))
    bad[1:] |= tokens[1:] & tokens[:-1]
    if bad.any():
        pos = int(np.argmax(bad))
        start, end = pos, pos
        while start > 0 and tokens[start - 1]:
            start -= 1
        while end < buf.size and tokens[end]:
            end += 1
        value = raw[start:end].decode(errors="replace")
        line = int(line_of[pos])
        raise DataError(
            f"{name}: line {line + 1}: non-binary value {value!r} (sample key {line:08d})"
        )
    per_line = np.bincount(line_of[tokens], minlength=int(line_of[-1]) + 1)
    wrong = np.flatnonzero((per_line > 0) & (per_line != PIXELS))
    if wrong.size:
        line = int(wrong[0])
        raise DataError(
            f"{name}: line {line + 1}: {per_line[line]} values, expected {PIXELS} "
            f"(sample key {line:08d})"
        )
    if not per_line.any():
        raise DataError(f"{name}: no data")
    return (buf[tokens] - ord("0")).reshape(-1, PIXELS)


def read_amat(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exn:  # gzip raises these on truncated or corrupted files
        raise DataError(f"{path}: cannot read ({exn})") from exn
    return parse_amat(raw, str(path))


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise MissingDataError(f"{directory}: neither {stem} nor {stem}.gz found")


def _check(array: np.ndarray, expected: str, name: str) -> str:
    actual = array_sha256(array)
    if actual != expected:
        raise DataError(
            f"{name}: content sha256 {actual} does not match the known {expected}; "
            "the file is corrupted or not the standard data set"
        )
    return actual


def load_binarized_mnist(directory: str | os.PathLike) -> RawData:
    """Read binarized_mnist_{train,valid,test}.amat[.gz] from a folder and verify them."""
    directory = Path(directory)
    splits, hashes = {}, {}
    for split in SPLITS:
        path = _find(directory, f"binarized_mnist_{split}.amat")
        splits[split] = read_amat(path)
        hashes[split] = _check(splits[split], BINARIZED_MNIST_SHA256[split], str(path))
    return RawData(splits, binarized_mnist_source_hash(), content_sha256=hashes)


# --------------------------------------------------------------------------- downloads


def fetch(url: str, dest: Path, verify) -> Path:
    """Download `url` to `dest` through a temporary name.

    `verify(tmp_path)` must raise on bad content; the partial file is then removed, so a failed
    or interrupted download never leaves a file under the final name.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except OSError as exn:  # URLError and HTTPError are OSErrors; name the URL
            raise OSError(f"{url}: download failed ({exn})") from exn
        verify(tmp)
        commit(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download_binarized_mnist(cache_dir: str | os.PathLike, base_url: str = BINARIZED_MNIST_URL):
    """Download the three .amat files into `cache_dir` (skipping verified ones) and load them."""
    cache_dir = Path(cache_dir)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    for split in SPLITS:
        name = f"binarized_mnist_{split}.amat"
        dest = cache_dir / name
        if dest.is_file():
            continue  # verified when it was downloaded, and again when loaded below

        def verify(tmp: Path, split=split, name=name) -> None:
            _check(
                read_amat(tmp).reshape(-1, PIXELS), BINARIZED_MNIST_SHA256[split], base_url + name
            )

        fetch(base_url + name, dest, verify)
    return load_binarized_mnist(cache_dir)


# --------------------------------------------------------------------------- raw MNIST (IDX)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): uint8 images (N, 784) or labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exn:
        raise DataError(f"{path}: cannot read ({exn})") from exn
    stem = path.name.removesuffix(".gz")
    if stem in MNIST_MD5 and hashlib.md5(raw).hexdigest() != MNIST_MD5[stem]:
        raise DataError(f"{path}: md5 does not match the known {MNIST_MD5[stem]} (corrupted?)")
    if len(raw) < 8:
        raise DataError(f"{path}: too short for an IDX header")
    magic, count = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    if magic == 2049:
        data, shape = raw[8:], (count,)
    elif magic == 2051 and len(raw) >= 16:
        data, shape = (
            raw[16:],
            (count, int.from_bytes(raw[8:12], "big") * int.from_bytes(raw[12:16], "big")),
        )
        if shape[1] != PIXELS:
            raise DataError(f"{path}: images of {shape[1]} pixels, expected {PIXELS}")
    else:
        raise DataError(f"{path}: bad IDX magic number {magic}")
    if len(data) != int(np.prod(shape)):
        raise DataError(f"{path}: {len(data)} data bytes, header says {int(np.prod(shape))}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def load_mnist(directory: str | os.PathLike) -> RawData:
    """Raw MNIST intensities 0..255 and labels; train/valid: first 50k/last 10k, test: t10k."""
    directory = Path(directory)
    arrays = {stem: read_idx(_find(directory, stem)) for stem in MNIST_MD5}
    images, labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    splits = {
        "train": images[:MNIST_TRAIN_SIZE],
        "valid": images[MNIST_TRAIN_SIZE:],
        "test": arrays["t10k-images-idx3-ubyte"],
    }
    split_labels = {
        "train": labels[:MNIST_TRAIN_SIZE],
        "valid": labels[MNIST_TRAIN_SIZE:],
        "test": arrays["t10k-labels-idx1-ubyte"],
    }
    for split in SPLITS:
        if len(splits[split]) != len(split_labels[split]):
            raise DataError(
                f"{directory}: {split} has {len(splits[split])} images but "
                f"{len(split_labels[split])} labels"
            )
    hashes = {split: array_sha256(images) for split, images in splits.items()}
    return RawData(splits, mnist_source_hash(), labels=split_labels, content_sha256=hashes)


def download_mnist(cache_dir: str | os.PathLike, base_url: str = MNIST_URL) -> RawData:
    cache_dir = Path(cache_dir)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    for stem in MNIST_MD5:
        dest = cache_dir / f"{stem}.gz"
        if not dest.is_file():
            fetch(
                base_url + dest.name, dest, lambda tmp, stem=stem: _verify_idx_download(tmp, stem)
            )
    return load_mnist(cache_dir)


def _verify_idx_download(tmp: Path, stem: str) -> None:
    # read_idx checks the md5 by the file's stem, which the temporary name lacks.
    with gzip.open(tmp, "rb") as f:
        digest = hashlib.md5(f.read()).hexdigest()
    if digest != MNIST_MD5[stem]:
        raise DataError(f"{stem}.gz: md5 {digest} does not match the known {MNIST_MD5[stem]}")


def binarize_static(images: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """Seeded Bernoulli(intensity / 255) sample of each pixel, once (static binarization).

    `stream` gives independent draws for the same seed (one per split)."""
    rng = np.random.default_rng([seed, stream])
    return (rng.random(images.shape, dtype=np.float32) * 255.0 < images).astype(np.uint8)
