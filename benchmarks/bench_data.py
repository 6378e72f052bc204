"""Data loader throughput on the real binarized MNIST shards.

    .venv/bin/python benchmarks/bench_data.py [--shards DIR] [--source DIR] [--workers 0,1,2]

Prepares the shards if needed (`bihm data prepare`, a no-op when up to date), then times the
training loader (batch 100) with each number of DataLoader workers (JSON with --json OUT);
exit status 1 if it is too slow. The loader must deliver at least 10x the training step's
images/s (the paper's model at batch 100, K=10: roughly 1,000-3,000 images/s on this CPU).
Same measurement as `bihm data bench --shards DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from data_shards import prepare
from data_shards.bench import bench_loader, format_rows

ROOT = Path(__file__).resolve().parents[1]
TRAINING_STEP_IMAGES_PER_S = 3_000  # upper end of the training step's rate on this CPU


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=str(ROOT / "data" / "binarized_mnist"))
    parser.add_argument(
        "--source",
        default=os.environ.get("BIHM_DATA_SOURCE")
        or str(ROOT.parent / "shared" / "datasets" / "binarized_mnist"),
    )
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    prepare(args.shards, args.source, progress=False)
    workers = [int(w) for w in args.workers.split(",")]
    results = bench_loader(args.shards, workers=workers, epochs=args.epochs)
    results["required_samples_per_s"] = 10 * TRAINING_STEP_IMAGES_PER_S
    print("\n".join(format_rows(results)))
    slowest = min(row["samples_per_s"] for row in results["loader"])
    print(
        f"slowest: {slowest:,} samples/s = {slowest / TRAINING_STEP_IMAGES_PER_S:.0f}x "
        f"the training step's ~{TRAINING_STEP_IMAGES_PER_S:,} images/s (need >= 10x)"
    )
    if args.json:
        from bihm.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if slowest >= results["required_samples_per_s"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
