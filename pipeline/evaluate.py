"""Evaluation of a trained model: `bihm eval | validate | sample | inpaint` (their command
line is pipeline/eval_cli.py).

A checkpoint is a Lightning .ckpt written by `bihm train` (loaded with weights_only=True;
the run's config is in its hyper-parameters) or a file written by `BiHM.save`.
`eval` and `validate` run through a Lightning Trainer, so `--devices N` spreads the work
over N processes (DDP) with the same numbers up to float rounding: see bihm/evaluation.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from bihm import compiled
from bihm import evaluation as ev
from bihm.checkpoint import CHECKPOINT_FORMAT
from bihm.errors import CheckpointError, torch_load_error
from bihm.eval_module import EvalModule
from bihm.gibbs import half_mask
from bihm.lightning import BiHMModule
from bihm.model import BiHM
from bihm.rng import row_streams
from pipeline.config import (
    Config,
    DataConfig,
    ModelConfig,
    apply_overrides,
    config_from_dict,
)


# --------------------------------------------------------------------------- loading
def load_checkpoint(
    path: str | Path,
    overrides: list[str] = (),
    with_gibbs: bool = False,
    needs_shards: bool = False,
) -> tuple[BiHMModule, Config]:
    """A BiHMModule and its Config from a Lightning .ckpt or a `BiHM.save` file.
    `with_gibbs` turns the Gibbs inpainting validation on (every epoch), unless the model
    has a label node (Gibbs sampling with one is not implemented).

    The config's own data.shard_dir, when relative, was relative to the folder training
    ran in; it is looked for by `locate_shards` (an override such as --shards is taken as
    given). With `needs_shards`, shards that are nowhere to be found are an error naming
    the folders tried, raised before any work."""
    module, cfg = _load_checkpoint(Path(path), overrides, with_gibbs)
    if not any(o.split("=", 1)[0].strip() == "data.shard_dir" for o in overrides):
        found = locate_shards(cfg, Path(path), required=needs_shards)
        if found is not None:
            cfg.data.shard_dir = str(found)
    elif needs_shards:
        from data_shards import load_manifest

        load_manifest(cfg.data.shard_dir)  # names the folder if it holds no shards
    return module, cfg


def _project_folder(cfg: Config, checkpoint: Path) -> Path | None:
    """The folder a `bihm train` run was started from, when `checkpoint` still lies in its
    run folder: <project>/<run_dir>/checkpoints/<file> with a relative run_dir."""
    run_dir = cfg.resolved_run_dir()
    folder = checkpoint.resolve().parent
    if run_dir.is_absolute() or folder.name != "checkpoints":
        return None
    run_folder, parts = folder.parent, run_dir.parts
    if len(run_folder.parts) <= len(parts) or run_folder.parts[-len(parts) :] != parts:
        return None
    return run_folder.parents[len(parts) - 1]


def locate_shards(cfg: Config, checkpoint: Path, required: bool = False) -> Path | None:
    """Where the shards of a checkpoint's relative data.shard_dir are: the current folder
    first (as before, and where a user may have prepared them), then the nearest folder
    above the checkpoint that holds them (the training run's own folder for a checkpoint
    still in its run folder, or a project a results file was copied into). An absolute
    data.shard_dir is taken as it is. None when no candidate holds a manifest; with
    `required` that is a MissingDataError naming what was tried and where to prepare."""
    from data_shards.shards import MANIFEST, load_manifest
    from data_shards.sources import MissingDataError, raw_data_files

    shard_dir = Path(cfg.data.shard_dir)
    if shard_dir.is_absolute():
        if required:
            load_manifest(shard_dir)
        return shard_dir if (shard_dir / MANIFEST).is_file() else None
    if (shard_dir / MANIFEST).is_file():
        return shard_dir
    for folder in checkpoint.resolve().parents:
        if (folder / shard_dir / MANIFEST).is_file():
            return folder / shard_dir
    if not required:
        return None
    project = _project_folder(cfg, checkpoint)
    where = project / shard_dir if project is not None else shard_dir
    for folder in (shard_dir, where):
        if raw_data_files(folder):
            load_manifest(folder)  # raw data, not shards: that error says where to prepare
    raise MissingDataError(
        f"data.shard_dir {shard_dir} of {checkpoint}: no prepared shards in "
        f"{Path.cwd() / shard_dir} (the current folder) nor in {shard_dir} under any "
        f"folder above the checkpoint; pass --shards DIR, or create them with "
        f"`bihm data prepare --out {where}`"
    )


def _load_checkpoint(
    path: Path, overrides: list[str], with_gibbs: bool
) -> tuple[BiHMModule, Config]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupted, not a torch file, or holding code objects
        raise torch_load_error(path, err) from None
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        model = BiHM.from_payload(payload, path)
        data = Config(
            model=ModelConfig(
                layers=list(model.layer_sizes),
                families=list(model.families),
                gaussian_std=model.gaussian_std,
                learn_std=model.learn_std,
                labels=model.n_classes,
            ),
            data=DataConfig(dataset=_dataset_for(model)),
        ).to_dict()
        if model.n_classes:  # no Gibbs with a label node (see pipeline.config)
            data["validation"]["gibbs"]["every_n_epochs"] = 0
            data["samples"]["every_n_epochs"] = 0
        cfg = config_from_dict(apply_overrides(data, _with_gibbs(data, overrides, with_gibbs)))
        module = BiHMModule(cfg.to_dict())
        module.model.load_state_dict(model.state_dict())
        return module, cfg
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path} is neither a `bihm train` checkpoint nor a BiHM.save file")
    try:
        data = payload["hyper_parameters"]["config"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path} holds no bihm config (hyper_parameters.config)") from None
    cfg = config_from_dict(apply_overrides(data, _with_gibbs(data, overrides, with_gibbs)))
    module = BiHMModule(cfg.to_dict())
    module.load_state_dict(payload["state_dict"])
    return module, cfg


def _with_gibbs(data: dict, overrides: list[str], with_gibbs: bool) -> list[str]:
    # An evaluation is one validation pass: a training run's cadence does not apply.
    overrides = [*overrides, "validation.every_n_epochs=1"]
    if with_gibbs and not data.get("model", {}).get("labels"):
        return [*overrides, "validation.gibbs.every_n_epochs=1"]
    return overrides


def _dataset_for(model: BiHM) -> str:
    """A data set kind that fits a bare model file (the shards come from --shards)."""
    if model.families[0] == "gaussian":
        return "mnist_continuous"
    return "mnist_dynamic" if model.n_classes else "binarized_mnist"


class SplitDataModule(pl.LightningDataModule):
    """One split of the shards as the test (or validation) loader, exactly once over ranks."""

    def __init__(
        self,
        shard_dir: str,
        split: str,
        batch_size: int,
        limit: int | None,
        with_labels: bool = False,
    ) -> None:
        super().__init__()
        self.shard_dir, self.split, self.batch_size, self.limit = (
            shard_dir,
            split,
            batch_size,
            limit,
        )
        self.with_labels = with_labels

    def _loader(self):
        from data_shards import eval_loader

        return eval_loader(
            self.shard_dir,
            self.split,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            batch_size=self.batch_size,
            limit=self.limit,
            with_labels=self.with_labels,
        )

    def test_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def _trainer(cfg: Config, devices: int, num_nodes: int, progress: bool = True) -> pl.Trainer:
    from pipeline.train import Compile, build_strategy, resolve_accelerator, set_cpu_threads

    accelerator = resolve_accelerator(cfg.train.accelerator)
    set_cpu_threads(cfg, accelerator, devices)
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=build_strategy(accelerator, devices, num_nodes),
        callbacks=[Compile(cfg.train.compile, cfg.train.cuda_graphs)],
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
    from pipeline.train import release_process_group

    evaluator = EvalModule(
        module.model, Ks=Ks, z_samples=z_samples, z_inner=z_inner, z_chunk=z_chunk, seed=seed
    )
    dm = SplitDataModule(
        cfg.data.shard_dir, split, batch_size, limit, with_labels=module.model.n_classes > 0
    )
    trainer = _trainer(cfg, devices, num_nodes, progress)
    trainer.test(evaluator, datamodule=dm, verbose=False)
    release_process_group()
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
    if "classification" in result:  # a label node: test error from q(y|x) and p*(y|x)
        lines.append("classification error (fraction of examples):")
        lines.append(f"{'K':>6} | {'q(y | x)':>17} | {'p*(y | x)':>17}")
        for K, err in result["classification"].items():
            lines.append(f"{K:>6} | {err['q']:17.4f} | {err['pstar']:17.4f}")
    if "bits_per_dim" in result:  # a Gaussian visible layer: the same in bits/dim (0..255)
        bpd = result["bits_per_dim"]
        lines.append("bits per dimension on the 0..255 scale (lower is better):")
        for K in result["log_p"]:
            lines.append(
                f"{K:>6} | {bpd['log_p'][K]:17.4f} | {bpd['log_ptilde_star'][K]:17.4f} | "
                f"{bpd['log_pstar'][K]:17.4f}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- validate
def validate(
    module: BiHMModule, cfg: Config, *, devices: int = 1, num_nodes: int = 1, progress=True
) -> tuple[dict[str, float], bool]:
    """The training-time validation metrics (config's validation section, with Gibbs).
    The shards must be prepared: evaluation never writes into a checkpoint's data folder."""
    from data_shards import load_manifest
    from pipeline.train import make_datamodule, release_process_group

    load_manifest(cfg.data.shard_dir)  # a clear error naming the folder if it has no shards
    trainer = _trainer(cfg, devices, num_nodes, progress)
    trainer.validate(module, datamodule=make_datamodule(cfg), verbose=False)
    release_process_group()
    return dict(module.epoch_metrics), trainer.is_global_zero


# --------------------------------------------------------------------------- pictures
def single_device_model(module: BiHMModule, cfg: Config) -> BiHM:
    """The model in eval mode on the config's accelerator (one process)."""
    from pipeline.train import report_compile, resolve_accelerator, set_cpu_threads

    accelerator = resolve_accelerator(cfg.train.accelerator)
    set_cpu_threads(cfg, accelerator, 1)
    device = "cuda" if accelerator == "gpu" else "cpu"
    seconds = compiled.enable(cfg.train.compile, device, cfg.train.cuda_graphs)
    if seconds is not None:
        report_compile({"the random streams": seconds})
    return module.model.to(device).eval()


def inpaint_picture(
    model: BiHM,
    x: torch.Tensor,
    path: str | Path,
    *,
    masks: list[str],
    chains: int,
    steps: int,
    proposals: int,
    inner: int,
    seed: int,
    progress: bool = True,
) -> None:
    """PNG, one panel per mask: per digit its original, the masked input, a q-then-p
    fill-in and `chains` Gibbs chains from p*; chain c of digit i has its own stream."""
    from tqdm.auto import tqdm

    from pipeline.plots import save_panels, tile

    device = model.prior_logits.device
    panels = []
    bar = tqdm(total=len(masks) * x.shape[0], desc="inpainting digits", disable=not progress)
    for m, side in enumerate(masks):
        mask = half_mask(side).to(device)
        rows = []
        for i in range(x.shape[0]):
            xi, mi = x[i].expand(chains, -1), mask.expand(chains, -1)
            streams = row_streams(device, seed, ev.GIBBS, m, i, keys=range(chains))
            recon_stream = row_streams(device, seed, ev.RECONSTRUCT, m, i, keys=[0])
            recon = model.reconstruct(xi[:1], mi[:1], generator=recon_stream)
            filled = model.inpaint(
                xi, mi, steps=steps, proposals=proposals, inner=inner, generator=streams
            )
            shown = x[i] * mask + 0.5 * (1 - mask)
            rows.append(torch.cat([x[i][None], shown[None], recon, filled]))
            bar.update(1)
        panels.append((f"{side} half masked", tile(torch.cat(rows), ncols=3 + chains)))
    bar.close()
    save_panels(
        path,
        panels,
        title=f"original | masked | q-then-p | {chains} p* Gibbs chains "
        f"({steps} sweeps, {proposals} proposals)",
    )
