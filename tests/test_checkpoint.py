"""Checkpoints (bihm/checkpoint.py): BiHM.save / BiHM.load, bad files, and the files that
earlier versions wrote (results/), which must still load into the same tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bihm import BiHM
from bihm.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from bihm.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
# Written by `BiHM.save` and by `bihm train` (Lightning) before bihm/model.py was split.
SAVED = sorted((ROOT / "results").glob("*/*.pt"))
LIGHTNING = sorted((ROOT / "results").glob("*/last.ckpt"))


def binary(*shape, seed=0):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.5).float()


def test_save_load_round_trip(tmp_path):
    model = BiHM([8, 5, 3])
    with torch.no_grad():
        model.prior_logits.add_(0.25)
    path = tmp_path / "sub" / "model.pt"
    model.save(path)
    assert not list(path.parent.glob("*.tmp")), "temporary file left behind"
    payload = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert payload["layer_sizes"] == [8, 5, 3]
    loaded = BiHM.load(path)
    assert loaded.layer_sizes == [8, 5, 3]
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    x = binary(4, 8)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(
        model.log_likelihood(x, 5, generator=gen())[0],
        loaded.log_likelihood(x, 5, generator=gen())[0],
    )


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt"):
        BiHM.load(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        BiHM.load(garbage)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a BiHM checkpoint"):
        BiHM.load(other)


def test_the_stored_files_are_there():
    """The two tests below must not pass on an empty list."""
    assert len(SAVED) >= 2 and len(LIGHTNING) >= 2, (SAVED, LIGHTNING)


@pytest.mark.parametrize("path", SAVED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stored_bihm_save_files_load_and_save_back_unchanged(path, tmp_path):
    """An old `BiHM.save` file loads into exactly its tensors, and saving the model again
    writes the same payload: the format has not changed."""
    old = torch.load(path, map_location="cpu", weights_only=True)
    assert (old["format"], old["version"]) == (CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    model = BiHM.load(path)
    assert model.layer_sizes == old["layer_sizes"]
    model.save(tmp_path / "again.pt")
    new = torch.load(tmp_path / "again.pt", map_location="cpu", weights_only=True)
    assert new.keys() == old.keys()
    assert {k: v for k, v in new.items() if k != "state_dict"} == {
        k: v for k, v in old.items() if k != "state_dict"
    }
    assert list(new["state_dict"]) == list(old["state_dict"])
    for name, tensor in old["state_dict"].items():
        assert torch.equal(new["state_dict"][name], tensor), name
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("path", LIGHTNING, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stored_lightning_checkpoints_load(path):
    """A `bihm train` checkpoint loads as `bihm eval` loads it, into exactly its tensors."""
    from pipeline.evaluate import load_checkpoint

    payload = torch.load(path, map_location="cpu", weights_only=True)
    module, cfg = load_checkpoint(path)
    assert module.model.layer_sizes == payload["hyper_parameters"]["config"]["model"]["layers"]
    stored = {k.removeprefix("model."): v for k, v in payload["state_dict"].items()}
    state = module.model.state_dict()
    assert state.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
