"""`bihm eval | validate | sample | inpaint` on a checkpoint.

A checkpoint is a Lightning .ckpt written by `bihm train` (loaded with weights_only=True;
the run's config is in its hyper-parameters) or a file written by `BiHM.save`.
`eval` and `validate` run through a Lightning Trainer, so `--devices N` spreads the work
over N processes (DDP) with the same numbers up to float rounding: see bihm/evaluation.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from bihm import evaluation as ev
from bihm.lightning import BiHMModule, EvalModule, half_mask
from bihm.model import CHECKPOINT_FORMAT, BiHM
from bihm.rng import RowStreams
from pipeline.config import (
    Config,
    ConfigError,
    ModelConfig,
    add_override_argument,
    apply_overrides,
    atomic_write_text,
    config_from_dict,
)

DEFAULT_KS = "1,10,100,1000,10000"


class CheckpointError(ValueError):
    """The file is not a checkpoint `bihm` can read."""


# --------------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path, overrides: list[str] = ()) -> tuple[BiHMModule, Config]:
    """A BiHMModule and its Config from a Lightning .ckpt or a `BiHM.save` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable checkpoint: {err}") from err
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        model = BiHM.load(path)
        data = Config(model=ModelConfig(layers=list(model.layer_sizes))).to_dict()
        cfg = config_from_dict(apply_overrides(data, list(overrides)))
        module = BiHMModule(cfg.to_dict())
        module.model.load_state_dict(model.state_dict())
        return module, cfg
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path} is neither a `bihm train` checkpoint nor a BiHM.save file")
    try:
        data = payload["hyper_parameters"]["config"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path} holds no bihm config (hyper_parameters.config)") from None
    cfg = config_from_dict(apply_overrides(data, list(overrides)))
    module = BiHMModule(cfg.to_dict())
    module.load_state_dict(payload["state_dict"])
    return module, cfg


class SplitDataModule(pl.LightningDataModule):
    """One split of the shards as the test (or validation) loader, exactly once over ranks."""

    def __init__(self, shard_dir: str, split: str, batch_size: int, limit: int | None) -> None:
        super().__init__()
        self.shard_dir, self.split, self.batch_size, self.limit = (
            shard_dir,
            split,
            batch_size,
            limit,
        )
        self.prepare_data_per_node = False

    def prepare_data(self) -> None:
        from pipeline.train import ensure_shards

        ensure_shards(self.shard_dir)

    def _loader(self):
        from data_shards import eval_loader

        return eval_loader(
            self.shard_dir,
            self.split,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            batch_size=self.batch_size,
            limit=self.limit,
        )

    def test_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def _trainer(cfg: Config, devices: int, num_nodes: int, progress: bool = True) -> pl.Trainer:
    from pipeline.train import build_strategy, resolve_accelerator, set_cpu_threads

    accelerator = resolve_accelerator(cfg.train.accelerator)
    set_cpu_threads(cfg, accelerator, devices)
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=build_strategy(accelerator, devices, num_nodes),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=False,
        inference_mode=True,
    )


# --------------------------------------------------------------------------- eval
def evaluate(
    module: BiHMModule,
    cfg: Config,
    *,
    split: str = "test",
    Ks: list[int],
    z_samples: int,
    z_inner: int = 10,
    z_chunk: int = 10_000,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 100,
    devices: int = 1,
    num_nodes: int = 1,
    progress: bool = True,
) -> tuple[dict[str, Any], bool]:
    """The authors' evaluation table as a dict; returns (result, is_global_zero)."""
    evaluator = EvalModule(
        module.model, Ks=Ks, z_samples=z_samples, z_inner=z_inner, z_chunk=z_chunk, seed=seed
    )
    dm = SplitDataModule(cfg.data.shard_dir, split, batch_size, limit)
    trainer = _trainer(cfg, devices, num_nodes, progress)
    trainer.test(evaluator, datamodule=dm, verbose=False)
    result = dict(evaluator.result)
    result.update(split=split, z_inner=z_inner, seed=seed, processes=trainer.world_size)
    return result, trainer.is_global_zero


def format_table(result: dict[str, Any]) -> str:
    """The evaluation as a text table: one row per K, mean ± standard error."""

    def cell(entry):
        return f"{entry['mean']:10.2f} ± {entry['sem']:4.2f}"

    z = result["two_log_z"]
    lines = [
        f"{result.get('split', '?')} set, {result['n_examples']} examples; "
        f"2 log Z = {z['value']:.3f} ± {z['sem']:.3f} (N = {z['n']}, M = {result.get('z_inner')})",
        f"{'K':>6} | {'log p':>17} | {'log p~*':>17} | {'log p*':>17}",
        f"{'-' * 6}-+-{'-' * 17}-+-{'-' * 17}-+-{'-' * 17}",
    ]
    for K in result["log_p"]:
        lines.append(
            f"{K:>6} | {cell(result['log_p'][K])} | {cell(result['log_ptilde_star'][K])} | "
            f"{cell(result['log_pstar'][K])}"
        )
    return "\n".join(lines)


def _parse_ks(text: str) -> list[int]:
    try:
        Ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--samples must be comma-separated integers, got {text!r}") from None
    if not Ks or any(k < 1 for k in Ks):
        raise ConfigError(f"--samples must list integers >= 1, got {text!r}")
    return Ks


def _eval(args: argparse.Namespace) -> int:
    module, cfg = load_checkpoint(args.checkpoint, args.set)
    result, is_zero = evaluate(
        module,
        cfg,
        split=args.split,
        Ks=_parse_ks(args.samples),
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
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------- validate
def validate(
    module: BiHMModule, cfg: Config, *, devices: int = 1, num_nodes: int = 1, progress=True
) -> tuple[dict[str, float], bool]:
    """The training-time validation metrics (config's validation section, with Gibbs)."""
    from pipeline.train import make_datamodule

    trainer = _trainer(cfg, devices, num_nodes, progress)
    trainer.validate(module, datamodule=make_datamodule(cfg), verbose=False)
    return dict(module.epoch_metrics), trainer.is_global_zero


def _validate(args: argparse.Namespace) -> int:
    # The Gibbs inpainting metrics are part of this report whatever the training cadence.
    module, cfg = load_checkpoint(args.checkpoint, [*args.set, "validation.gibbs.every_n_epochs=1"])
    metrics, is_zero = validate(
        module, cfg, devices=args.devices, num_nodes=args.num_nodes, progress=not args.no_progress
    )
    if is_zero:
        for key, value in metrics.items():
            if key != "epoch":
                print(f"{key:28s} {value:.6f}")
        if args.json:
            atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------- pictures
def _single_device_model(module: BiHMModule, cfg: Config) -> BiHM:
    """The model in eval mode on the config's accelerator (one process)."""
    from pipeline.train import resolve_accelerator, set_cpu_threads

    accelerator = resolve_accelerator(cfg.train.accelerator)
    set_cpu_threads(cfg, accelerator, 1)
    return module.model.to("cuda" if accelerator == "gpu" else "cpu").eval()


def _sample(args: argparse.Namespace) -> int:
    from pipeline.train import save_sample_picture

    module, cfg = load_checkpoint(args.checkpoint, args.set)
    save_sample_picture(
        _single_device_model(module, cfg),
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
    from tqdm.auto import tqdm

    from data_shards import eval_loader
    from pipeline.plots import save_panels, tile

    module, cfg = load_checkpoint(args.checkpoint, args.set)
    model = _single_device_model(module, cfg)
    device = model.prior_logits.device
    loader = eval_loader(cfg.data.shard_dir, args.split, batch_size=args.digits, limit=args.digits)
    x = next(iter(loader))[0][: args.digits].to(device)
    mask = half_mask(args.mask).to(device)
    rows = []
    for i in tqdm(range(x.shape[0]), desc="inpainting digits", disable=args.no_progress):
        xi = x[i].expand(args.chains, -1)
        mi = mask.expand(args.chains, -1)
        streams = RowStreams.keyed(device, args.seed, ev.GIBBS, i, keys=range(args.chains))
        recon = model.reconstruct(xi[:1], mi[:1], generator=streams[:1])
        filled = model.inpaint(
            xi, mi, steps=args.steps, proposals=args.proposals, inner=args.inner, generator=streams
        )
        shown = x[i] * mask + 0.5 * (1 - mask)
        rows.append(torch.cat([x[i][None], shown[None], recon, filled]))
    grid = tile(torch.cat(rows), ncols=3 + args.chains)
    save_panels(
        args.out,
        [
            (
                f"{args.mask} half masked: original | masked | q-then-p | "
                f"{args.chains} p* Gibbs chains ({args.steps} sweeps)",
                grid,
            )
        ],
    )
    print(f"bihm inpaint: wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- CLI
def _common(p: argparse.ArgumentParser, distributed: bool = False) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help=".ckpt or BiHM.save file")
    add_override_argument(p, "override a value of the checkpoint's config, e.g. data.shard_dir=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if distributed:
        p.add_argument("--devices", type=int, default=1, help="processes (DDP when > 1)")
        p.add_argument("--num-nodes", type=int, default=1)


def _guard(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (CheckpointError, ConfigError) as err:
            print(f"bihm {args.command}: error: {err}", file=sys.stderr)
            return 2

    return run


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="log p, log p~*, log p* per K and 2 log Z")
    _common(p, distributed=True)
    p.add_argument("--split", choices=["train", "valid", "test"], default="test")
    p.add_argument("--samples", default=DEFAULT_KS, help=f"the Ks (default {DEFAULT_KS})")
    p.add_argument("--z-samples", type=int, default=1_000_000, help="N for 2 log Z")
    p.add_argument("--z-inner", type=int, default=10, help="M for 2 log Z")
    p.add_argument("--z-chunk", type=int, default=10_000, help="outer samples per seeded chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only examples with idx < LIMIT")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--json", type=Path, default=None, help="write the numbers as JSON")
    p.set_defaults(func=_guard(_eval))

    p = subparsers.add_parser(
        "validate", help="the training-time validation metrics of a checkpoint"
    )
    _common(p, distributed=True)
    p.add_argument("--json", type=Path, default=None)
    p.set_defaults(func=_guard(_validate))

    p = subparsers.add_parser("sample", help="p samples and p* Gibbs samples side by side")
    _common(p)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--gibbs-steps", type=int, default=250)
    p.add_argument("--proposals", type=int, default=1000)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="PNG file")
    p.set_defaults(func=_guard(_sample))

    p = subparsers.add_parser("inpaint", help="fill in half of some digits by Gibbs from p*")
    _common(p)
    p.add_argument("--mask", choices=["bottom", "top", "left", "right"], default="bottom")
    p.add_argument("--split", choices=["train", "valid", "test"], default="test")
    p.add_argument("--digits", type=int, default=10)
    p.add_argument("--chains", type=int, default=10)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--proposals", type=int, default=1000)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="PNG file")
    p.set_defaults(func=_guard(_inpaint))
