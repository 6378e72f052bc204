"""Writing WebDataset shards and their manifest, and the `prepare` entry point.

Shard layout: `{split}-NNNNNN.tar`, `shard_size` images each. A record (WebDataset sample) holds
a block of up to `images_per_record` consecutive images of one shard (100 by default; an image
is only 98 bytes, and per-record overhead dominates otherwise). Its key is the zero-padded
index, within the split, of its first image, so readers can check order and completeness.
Fields:
  `bits`    np.packbits of the 784 binary pixels, 98 bytes per image   (static binarization)
  `u8`      the 784 raw intensities 0..255, 784 bytes per image        (dynamic binarization,
            or continuous: dequantized by the reader to (k + u) / 256, u ~ U[0, 1))
  `labels`  one uint8 per image (only when labels exist).
`manifest.json` lists per split the image count and the shards (file, count, first index,
sha256), plus the hash of the source content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from bihm.atomic import atomic_write_text, check_writable, commit
from data_shards import DATASETS, sources
from data_shards.sources import PIXELS, DataError, MissingDataError

MANIFEST = "manifest.json"
FORMAT = "bihm-wds-1"
# binarization -> payload field; "continuous" is not binarized at all (see stream.pack)
ENCODINGS = {"static": "bits", "dynamic": "u8", "continuous": "u8"}
PACKED_BYTES = PIXELS // 8
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<num>\d{6})\.tar$")
# Python's tarfile spends ~20 us per member, which capped a loader at ~35k images/s with one
# image per member; blocks of 100 consecutive images make reading ~20x cheaper.
IMAGES_PER_RECORD = 100


def sample_key(idx: int) -> str:
    return f"{idx:08d}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _validate_split(split: str, images: np.ndarray, binarization: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 2 or images.shape[1] != PIXELS or images.shape[0] == 0:
        raise DataError(f"split {split!r}: shape {images.shape}, expected (N>0, {PIXELS})")
    if not (np.issubdtype(images.dtype, np.integer) or images.dtype == bool):
        raise DataError(f"split {split!r}: dtype {images.dtype}, expected an integer type")
    high = 1 if binarization == "static" else 255
    bad = np.argwhere((images < 0) | (images > high))
    if bad.size:
        row, col = (int(v) for v in bad[0])
        raise DataError(
            f"split {split!r}: sample {sample_key(row)} pixel {col} has value {images[row, col]}, "
            f"expected 0..{high}"
        )
    return images.astype(np.uint8, copy=False)


def _validate_labels(split: str, labels: np.ndarray | None, count: int) -> None:
    if labels is None:
        raise DataError(f"split {split!r}: no labels given")
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"split {split!r}: labels of shape {labels.shape} and dtype {labels.dtype}, "
            f"expected ({count},) integers"
        )
    bad = np.flatnonzero((labels < 0) | (labels > 255))
    if bad.size:
        raise DataError(
            f"split {split!r}: sample {sample_key(int(bad[0]))} has label {labels[bad[0]]}, "
            "expected 0..255"
        )


def write_shards(
    splits: Mapping[str, np.ndarray],
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 10_000,
    source_hash: str,
    labels: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
    binarization: str = "static",
    metadata: Mapping[str, Any] | None = None,
    images_per_record: int = IMAGES_PER_RECORD,
) -> dict:
    """Write `splits` ({name: (N, 784) uint8}) as shards plus manifest.json in `out_dir`.

    binarization "static": values must be 0/1 and are bit-packed; "dynamic": values are
    intensities 0..255, stored as is and resampled by the reader every epoch; "continuous":
    stored as "dynamic", dequantized by the reader every epoch.
    Atomic: shards are written under temporary names and renamed only once all are complete;
    the manifest is written last, so a reader never sees a manifest pointing at partial shards.
    Returns the manifest.
    """
    if binarization not in ENCODINGS:
        raise ValueError(f"binarization must be one of {sorted(ENCODINGS)}, got {binarization!r}")
    if shard_size < 1 or images_per_record < 1:
        raise ValueError("shard_size and images_per_record must be >= 1")
    field = ENCODINGS[binarization]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checked = {
        split: _validate_split(split, images, binarization) for split, images in splits.items()
    }
    for split in checked:
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise ValueError(f"split name {split!r}: use letters, digits and underscores only")
        if labels is not None:
            _validate_labels(split, labels.get(split), len(checked[split]))
    clash = set(metadata or {}) & {
        "format",
        "field",
        "binarization",
        "pixels",
        "labels",
        "shard_size",
        "images_per_record",
        "source_hash",
        "splits",
    }
    if clash:
        raise ValueError(f"metadata may not set {sorted(clash)}")

    per_record = min(images_per_record, shard_size)
    token = secrets.token_hex(4)
    written: list[tuple[Path, Path]] = []  # (temporary, final)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "field": field,
        "binarization": binarization,
        "pixels": PIXELS,
        "labels": labels is not None,
        "shard_size": shard_size,
        "images_per_record": per_record,
        "source_hash": source_hash,
        **dict(metadata or {}),
        "splits": {},
    }
    total = sum(len(images) for images in checked.values())
    bar = tqdm(total=total, desc=f"writing shards to {out_dir}", unit="img", disable=not progress)
    try:
        for split, images in checked.items():
            payload = np.packbits(images, axis=1) if field == "bits" else images
            split_labels = None if labels is None else np.asarray(labels[split], dtype=np.uint8)
            entries = []
            for num, first in enumerate(range(0, len(payload), shard_size)):
                end = min(first + shard_size, len(payload))
                final = out_dir / f"{split}-{num:06d}.tar"
                tmp = final.with_name(f"{final.name}.tmp-{token}")
                written.append((tmp, final))
                # mtime fixed so that the same data gives byte-identical shards (and sha256).
                with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
                    for key in range(first, end, per_record):
                        rows = slice(key, min(key + per_record, end))
                        record = {"__key__": sample_key(key), field: payload[rows].tobytes()}
                        if split_labels is not None:
                            record["labels"] = split_labels[rows].tobytes()
                        sink.write(record)
                        bar.update(rows.stop - rows.start)
                entries.append(
                    {
                        "file": final.name,
                        "count": end - first,
                        "first_idx": first,
                        "sha256": file_sha256(tmp),
                    }
                )
            manifest["splits"][split] = {"count": len(payload), "shards": entries}
    except BaseException:
        for tmp in out_dir.glob(f"*.tmp-{token}"):
            tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()

    # Commit: drop the old manifest first, so an interruption below leaves no manifest that
    # could describe a mix of old and new shards; then rename shards, then the new manifest.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    keep = {final.name for _, final in written}
    for old in out_dir.iterdir():
        if SHARD_NAME.match(old.name) and old.name not in keep:
            old.unlink()  # stale shard of an earlier, larger run
    for tmp, final in written:
        commit(tmp, final)
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    """Read and check `shard_dir/manifest.json`; errors name the file and the field."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raw_folder_error(shard_dir)
        raise MissingDataError(
            f"{path}: no manifest; create the shards with `bihm data prepare --out {shard_dir}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise DataError(f"{path}: not valid JSON ({exn})") from exn

    def need(obj: Any, name: str, kind: type, where: str) -> Any:
        if not isinstance(obj, dict) or name not in obj or not isinstance(obj[name], kind):
            raise DataError(f"{path}: field {where}{name} missing or not a {kind.__name__}")
        return obj[name]

    if need(manifest, "format", str, "") != FORMAT:
        raise DataError(f"{path}: field format is {manifest['format']!r}, expected {FORMAT!r}")
    if need(manifest, "field", str, "") not in ENCODINGS.values():
        raise DataError(f"{path}: field 'field' is {manifest['field']!r}")
    need(manifest, "source_hash", str, "")
    if need(manifest, "images_per_record", int, "") < 1:
        raise DataError(f"{path}: field images_per_record must be >= 1")
    for split, info in need(manifest, "splits", dict, "").items():
        where = f"splits.{split}."
        count = need(info, "count", int, where)
        expected_first = 0
        for i, shard in enumerate(need(info, "shards", list, where)):
            at = f"{where}shards[{i}]."
            need(shard, "file", str, at)
            need(shard, "sha256", str, at)
            if (
                need(shard, "first_idx", int, at) != expected_first
                or need(shard, "count", int, at) < 1
            ):
                raise DataError(f"{path}: field {at}first_idx/count do not tile the split")
            expected_first += shard["count"]
        if expected_first != count:
            raise DataError(
                f"{path}: field {where}count is {count}, the shards hold {expected_first}"
            )
    return manifest


def raw_folder_error(folder: str | os.PathLike, role: str = "") -> None:
    """Raise a DataError if `folder` holds raw data (.amat or IDX files) rather than shards:
    it names the files and the command that prepares shards from it into another folder
    (never into the raw data itself). `role` names what pointed there (e.g. '--out')."""
    found = sources.raw_data_files(folder)
    if not found:
        return
    names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    binarized = any(name.endswith((".amat", ".amat.gz")) for name in found)
    dataset = "" if binarized else " --dataset mnist_dynamic"  # or mnist_static/_continuous
    out = "data/binarized_mnist" if binarized else "data/mnist_dynamic"
    raise DataError(
        f"{(role + ' ') if role else ''}{folder} holds raw data ({names}), not prepared "
        f"shards; write shards from it into a folder of their own: `bihm data prepare"
        f"{dataset} --source {folder} --out {out}`, and use that folder"
    )


def verify_shards(shard_dir: str | os.PathLike, manifest: dict, splits=None) -> None:
    """Check that every shard of `splits` (default all) exists and matches its sha256."""
    shard_dir = Path(shard_dir)
    for split in splits or manifest["splits"]:
        if split not in manifest["splits"]:
            raise DataError(f"{shard_dir / MANIFEST}: no split {split!r}")
        for shard in manifest["splits"][split]["shards"]:
            path = shard_dir / shard["file"]
            if not path.is_file():
                raise MissingDataError(f"{path}: shard listed in the manifest is missing")
            actual = file_sha256(path)
            if actual != shard["sha256"]:
                raise DataError(
                    f"{path}: sha256 {actual} does not match the manifest's {shard['sha256']} "
                    "(corrupted or modified shard; re-run `bihm data prepare`)"
                )


# --------------------------------------------------------------------------- prepare


def _expected_identity(dataset: str, shard_size: int, seed: int) -> dict:
    """What a manifest must say for `prepare` to skip the work."""
    identity = {"dataset": dataset, "shard_size": shard_size}
    if dataset == "binarized_mnist":
        identity["source_hash"] = sources.binarized_mnist_source_hash()
    else:
        identity["source_hash"] = sources.mnist_source_hash()
        if dataset == "mnist_static":
            identity["seed"] = seed
    return identity


def _up_to_date(out_dir: Path, identity: dict) -> tuple[dict | None, str]:
    """The manifest if `out_dir` already holds what `identity` asks for, else why not."""
    try:
        manifest = load_manifest(out_dir)
        verify_shards(out_dir, manifest)
    except (OSError, ValueError) as exn:
        return None, str(exn)
    for key, value in identity.items():
        if manifest.get(key) != value:
            return None, f"{out_dir / MANIFEST}: {key} is {manifest.get(key)!r}, want {value!r}"
    return manifest, ""


def _acquire(dataset: str, source: str | os.PathLike | None, out_dir: Path) -> sources.RawData:
    """The raw data; a failure to get it (a missing mirror, a failed download) is a
    SourceError."""
    try:
        return _acquire_raw(dataset, source, out_dir)
    except sources.SourceError:
        raise
    except OSError as exn:
        raise sources.SourceError(str(exn)) from exn


def _acquire_raw(dataset: str, source: str | os.PathLike | None, out_dir: Path) -> sources.RawData:
    mnist = dataset != "binarized_mnist"
    if source is None:
        # $BIHM_MNIST_SOURCE first for the IDX files; $BIHM_DATA_SOURCE may name a folder
        # holding both mirrors (binarized_mnist/ and mnist/), see below.
        names = (sources.MNIST_SOURCE_ENV, sources.SOURCE_ENV) if mnist else (sources.SOURCE_ENV,)
        source = next((os.environ[name] for name in names if os.environ.get(name)), None)
    if source is None:
        source = sources.MNIST_URL if mnist else sources.BINARIZED_MNIST_URL
    if sources.is_url(source):
        cache = out_dir / "download"
        if mnist:
            return sources.download_mnist(cache, source)
        return sources.download_binarized_mnist(cache, source)
    folder = Path(source)
    if not folder.is_dir():
        raise MissingDataError(f"{folder}: data source folder does not exist")
    # Accept the parent of the mirrors too, e.g. shared/datasets/{binarized_mnist,mnist}/.
    sub = folder / ("mnist" if mnist else "binarized_mnist")
    folder = sub if sub.is_dir() else folder
    return sources.load_mnist(folder) if mnist else sources.load_binarized_mnist(folder)


def prepare(
    out_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    *,
    dataset: str = "binarized_mnist",
    shard_size: int = 10_000,
    seed: int = 0,
    progress: bool = True,
    out_name: str = "output folder",
) -> dict:
    """Acquire `dataset`, verify it and write shards + manifest to `out_dir`. Returns the manifest.

    source: a mirror folder (or its parent, holding binarized_mnist/ and mnist/), an http(s)://
    or file:// base URL, or None: then $BIHM_DATA_SOURCE (for the mnist_* data sets
    $BIHM_MNIST_SOURCE, else $BIHM_DATA_SOURCE), else a download from the canonical URL.
    dataset: "binarized_mnist" (standard static binarization), "mnist_static" (raw MNIST
    binarized once with `seed`), "mnist_dynamic" (raw intensities, resampled every epoch),
    "mnist_continuous" (raw intensities, read as uniformly dequantized values in [0, 1]).
    Idempotent: with an up-to-date manifest and intact shards it does nothing and says so.
    Before reading any data it refuses an `out_dir` that holds raw data, and checks that
    `out_dir` can be written; those errors name it as `out_name` (a flag or config key).
    A failure to get the raw data is a `sources.SourceError`.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if dataset == "binarized_mnist_grey":
        from data_shards.grey import prepare_grey

        return prepare_grey(out_dir, source, shard_size=shard_size, progress=progress)
    out_dir = Path(out_dir)
    identity = _expected_identity(dataset, shard_size, seed)
    manifest, reason = _up_to_date(out_dir, identity)
    if manifest is not None:
        print(f"{out_dir / MANIFEST}: up to date ({dataset}), nothing to do")
        return manifest
    raw_folder_error(out_dir, out_name)
    check_writable(out_dir, out_name, folder=True)
    if (out_dir / MANIFEST).exists():
        print(f"rewriting the shards: {reason}")

    raw = _acquire(dataset, source, out_dir)
    splits, binarization = raw.splits, "static"
    if dataset == "mnist_static":
        # A different stream per split so that train and valid do not share noise patterns.
        splits = {
            name: sources.binarize_static(images, seed=seed, stream=i)
            for i, (name, images) in enumerate(raw.splits.items())
        }
    elif dataset == "mnist_dynamic":
        binarization = "dynamic"
    elif dataset == "mnist_continuous":
        binarization = "continuous"
    metadata = {
        key: value for key, value in identity.items() if key not in ("source_hash", "shard_size")
    }
    metadata["content_sha256"] = raw.content_sha256  # of the decoded source splits
    manifest = write_shards(
        splits,
        out_dir,
        shard_size=shard_size,
        source_hash=raw.source_hash,
        labels=raw.labels,
        progress=progress,
        binarization=binarization,
        metadata=metadata,
    )
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    print(f"{out_dir / MANIFEST}: wrote {dataset} ({counts})")
    return manifest
