"""BiHM checkpoint files: the payload format, save and load.

A file written by `BiHM.save` is a torch.save of one dict of plain types and tensors,

    {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
     "layer_sizes": [n_0 = |x|, n_1, ..., n_L], "families": per layer "bernoulli"/"gaussian",
     "gaussian_std", "learn_std", "n_classes", "state_dict": the parameters of p and q}

(p: the top prior b and W^p_l, c^p_l; q: W^q_l, c^q_l; a Gaussian layer's log sigmas; the
label node's a, U, V, e; symbols of `bihm-math.md`), so it loads with weights_only=True.
Files written before families and labels existed lack those keys and load as
all-Bernoulli models without a label node. Training runs write Lightning checkpoints
instead (`bihm.lightning.BiHMModule`); `pipeline.evaluate.load_checkpoint` reads both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bihm.atomic import atomic_path
from bihm.errors import CheckpointError, torch_load_error

if TYPE_CHECKING:
    from bihm.model import BiHM

CHECKPOINT_FORMAT = "bihm.BiHM"
CHECKPOINT_VERSION = 1


def save(model: BiHM, path: str | os.PathLike) -> None:
    """Write {"format", "version", "layer_sizes", "families", "gaussian_std", "learn_std",
    "n_classes", "state_dict"} with torch.save, atomically (bihm.atomic: a temporary file,
    fsync, rename; readable as the umask allows). Files without the newer keys (written
    before families and labels existed) load as all-Bernoulli models without labels."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "layer_sizes": list(model.layer_sizes),
        "families": list(model.families),
        "gaussian_std": model.gaussian_std,
        "learn_std": model.learn_std,
        "n_classes": model.n_classes,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(
    cls: type[BiHM], path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> BiHM:
    """Load a file written by `save`. Tensors and plain containers only (weights_only=True).
    `cls` is the model class (`BiHM.load` binds it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no BiHM checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupted, not a torch file, or holding code objects
        raise torch_load_error(path, err) from None
    return cls.from_payload(payload, path).to(map_location)


def from_payload(
    cls: type[BiHM], payload: object, source: str | os.PathLike = "checkpoint"
) -> BiHM:
    """The model from the dict that `save` writes (already read by torch.load).
    `cls` is the model class (`BiHM.from_payload` binds it)."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{source} is not a BiHM checkpoint (missing format {CHECKPOINT_FORMAT!r})"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{source}: unsupported checkpoint version {payload.get('version')!r}, "
            f"expected {CHECKPOINT_VERSION}"
        )
    for key in ("layer_sizes", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{source}: checkpoint is missing the key {key!r}")
    try:
        model = cls(
            payload["layer_sizes"],
            families=payload.get("families"),
            gaussian_std=payload.get("gaussian_std", 1.0),
            learn_std=payload.get("learn_std", True),
            n_classes=payload.get("n_classes", 0),
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: bad model description ({err})") from None
    model.load_state_dict(payload["state_dict"])
    return model
