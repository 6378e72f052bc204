"""`bihm eval | validate | sample | inpaint`: the command line of pipeline/evaluate.py.

Registering the flags imports nothing heavy; each handler imports the evaluation code.
Each handler first checks that its output (--json, --out) can be written, so a typo or a
read-only folder stops it before the checkpoint is even read, not after the work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.argtypes import int_list, non_negative_int, positive_int
from pipeline.config import add_override_argument

DEFAULT_KS = [1, 10, 100, 1000, 10000]
MASKS = ["bottom", "top", "left", "right"]


def _check_output(path: Path | None, flag: str) -> None:
    """Fail fast: `flag`'s file must be writable before any work starts."""
    if path is not None:
        from bihm.atomic import check_writable

        check_writable(path, flag)


def _load(args: argparse.Namespace, with_gibbs: bool = False, needs_shards: bool = True):
    """The checkpoint's module and config, with --set and --shards overrides. The config's
    own relative data.shard_dir is looked for beside the checkpoint too (see
    `pipeline.evaluate.locate_shards`); `needs_shards` makes a missing one an error."""
    from pipeline.evaluate import load_checkpoint

    overrides = list(args.set)
    if args.shards is not None:
        overrides.append(f"data.shard_dir={args.shards}")
    return load_checkpoint(
        args.checkpoint, overrides, with_gibbs=with_gibbs, needs_shards=needs_shards
    )


def _gibbs_model(args: argparse.Namespace, needs_shards: bool):
    """The checkpoint's module and config for a Gibbs sampler; a label node is refused
    (Gibbs sampling with a label node is not implemented)."""
    from bihm.errors import UserError

    module, cfg = _load(args, needs_shards=needs_shards)
    if module.model.n_classes:
        raise UserError(
            f"{args.checkpoint}: the model has a label node; Gibbs sampling with a label "
            "node is not implemented"
        )
    return module, cfg


def _write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        from bihm.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _eval(args: argparse.Namespace) -> int:
    _check_output(args.json, "--json")
    from pipeline.evaluate import evaluate, format_table

    module, cfg = _load(args)
    result, is_zero = evaluate(
        module,
        cfg,
        split=args.split,
        Ks=args.samples,
        z_samples=args.z_samples,
        z_inner=args.z_inner,
        z_chunk=args.z_chunk,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        devices=args.devices,
        num_nodes=args.num_nodes,
        progress=not args.no_progress,
    )
    if is_zero:
        result["checkpoint"] = str(args.checkpoint)
        print(format_table(result))
        _write_json(args.json, result)
    return 0


def _validate(args: argparse.Namespace) -> int:
    _check_output(args.json, "--json")
    from pipeline.evaluate import validate

    # The Gibbs inpainting metrics are part of this report whatever the training cadence.
    module, cfg = _load(args, with_gibbs=True)
    metrics, is_zero = validate(
        module, cfg, devices=args.devices, num_nodes=args.num_nodes, progress=not args.no_progress
    )
    if is_zero:
        for key, value in metrics.items():
            if key != "epoch":
                print(f"{key:28s} {value:.6f}")
        _write_json(args.json, metrics)
    return 0


def _sample(args: argparse.Namespace) -> int:
    _check_output(args.out, "--out")
    from pipeline.evaluate import single_device_model
    from pipeline.train import save_sample_picture

    module, cfg = _gibbs_model(args, needs_shards=False)  # samples need no data
    save_sample_picture(
        single_device_model(module, cfg),
        args.out,
        n=args.n,
        steps=args.gibbs_steps,
        proposals=args.proposals,
        inner=args.inner,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"bihm sample: wrote {args.out}")
    return 0


def _inpaint(args: argparse.Namespace) -> int:
    _check_output(args.out, "--out")
    from data_shards import eval_loader, load_manifest
    from pipeline.evaluate import inpaint_picture, single_device_model

    module, cfg = _gibbs_model(args, needs_shards=True)
    model = single_device_model(module, cfg)
    load_manifest(cfg.data.shard_dir)  # names the folder if it holds no prepared shards
    # `limit` picks digits spread over the whole split (the test split is sorted by class).
    loader = eval_loader(cfg.data.shard_dir, args.split, batch_size=args.digits, limit=args.digits)
    x = next(iter(loader))[0].to(model.prior_logits.device)
    inpaint_picture(
        model,
        x,
        args.out,
        masks=MASKS if args.mask == "all" else [args.mask],
        chains=args.chains,
        steps=args.steps,
        proposals=args.proposals,
        inner=args.inner,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"bihm inpaint: wrote {args.out}")
    return 0


def _common(p: argparse.ArgumentParser, distributed: bool = False) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help=".ckpt or BiHM.save file")
    p.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="prepared shards to evaluate on (default: the checkpoint config's data.shard_dir)",
    )
    add_override_argument(p, "override a value of the checkpoint's config, e.g. validation.K=1000")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if distributed:
        p.add_argument("--devices", type=positive_int, default=1, help="processes (DDP when > 1)")
        p.add_argument("--num-nodes", type=positive_int, default=1)


def _gibbs_flags(p: argparse.ArgumentParser, steps: int, flag: str = "--steps") -> None:
    p.add_argument(flag, type=non_negative_int, default=steps, help="Gibbs sweeps")
    p.add_argument("--proposals", type=positive_int, default=1000, help="S per layer and sweep")
    p.add_argument("--inner", type=positive_int, default=10, help="q samples for p~*(x)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", type=Path, required=True, help="PNG file")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="log p, log p~*, log p* per K and 2 log Z")
    _common(p, distributed=True)
    p.add_argument("--split", choices=["train", "valid", "test"], default="test")
    p.add_argument(
        "--samples",
        type=int_list(minimum=1),
        default=DEFAULT_KS,
        help="the Ks, comma-separated (default 1,10,100,1000,10000)",
    )
    p.add_argument("--z-samples", type=positive_int, default=1_000_000, help="N for 2 log Z")
    p.add_argument("--z-inner", type=positive_int, default=10, help="M for 2 log Z")
    p.add_argument(
        "--z-chunk", type=positive_int, default=10_000, help="outer samples per seeded chunk"
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="evaluate LIMIT examples spread evenly over the split",
    )
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--json", type=Path, default=None, help="write the numbers as JSON")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser(
        "validate", help="the training-time validation metrics of a checkpoint"
    )
    _common(p, distributed=True)
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=_validate)

    p = subparsers.add_parser("sample", help="p samples and p* Gibbs samples side by side")
    _common(p)
    p.add_argument("--n", type=positive_int, default=100, help="samples of each kind")
    _gibbs_flags(p, 250, "--gibbs-steps")
    p.set_defaults(func=_sample)

    p = subparsers.add_parser("inpaint", help="fill in half of some digits by Gibbs from p*")
    _common(p)
    p.add_argument("--mask", choices=[*MASKS, "all"], default="bottom")
    p.add_argument("--split", choices=["train", "valid", "test"], default="test")
    p.add_argument("--digits", type=positive_int, default=10, help="spread over the split")
    p.add_argument("--chains", type=positive_int, default=10, help="Gibbs chains per digit")
    _gibbs_flags(p, 100)
    p.set_defaults(func=_inpaint)
