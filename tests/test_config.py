"""Config files: both shipped configs load; bad keys and values are errors naming the key."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import (
    CONFIG_DIR,
    ConfigError,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
)


def test_paper_config_has_the_authors_settings():
    cfg = load_config(CONFIG_DIR / "bmnist_paper.yaml")
    assert cfg.model.layers == [784, 300, 200, 100, 75, 50, 35, 30, 25, 20, 15, 10, 10]
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.train.K) == (1e-3, 100, 10)
    assert cfg.optim.weight_decay == 0.0 and cfg.train.objective == "bihm"
    assert cfg.train.early_stopping_patience == 10 and cfg.train.max_epochs == 10_000
    # Low-noise validation (the earlier port's mistake #7) and proper Gibbs proposals (#6).
    assert cfg.validation.K >= 100 and cfg.validation.z_samples >= 10_000
    assert cfg.validation.gibbs.proposals == 1000
    assert cfg.logging.wandb in ("off", "offline")


def test_default_config_is_the_paper_config():
    assert load_config(None) == load_config(CONFIG_DIR / "bmnist_paper.yaml")


def test_smoke_config_is_tiny():
    cfg = load_config(CONFIG_DIR / "smoke.yaml")
    assert sum(cfg.model.layers[1:]) < 200
    assert cfg.data.train_limit is not None and cfg.data.train_limit <= 10_000
    assert cfg.train.accelerator == "cpu"


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.learning_rate=0.1", "optim.learning_rate"),
        ("bogus=1", "bogus"),
        ("validation.gibbs.chain=3", "validation.gibbs.chain"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=abc", "optim.lr"),
        ("train.objective=vae", "train.objective"),
        ("train.K=0", "train.K"),
        ("train.K=2.5", "train.K"),
        ("train.max_time_s=0", "train.max_time_s"),
        ("train.max_time_s=soon", "train.max_time_s"),
        ("model.layers=[784]", "model.layers"),
        ("model.layers=[784, -3]", "model.layers[1]"),
        ("data.train_limit=true", "data.train_limit"),
        ("logging.wandb=sometimes", "logging.wandb"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.switch.K=100", "optim.switch.epoch"),
        ("optim.switch.reset_optimizer=true", "optim.switch.epoch"),
        ("optim.switch.reset_optimizer=maybe", "optim.switch.reset_optimizer"),
        ("optim=3", "optim"),
        ("model.families=[gaussian, bernoulli]", "model.families"),
        ("model.families=[bernoulli, poisson, bernoulli]", "model.families[1]"),
        ("model.families=[gaussian, bernoulli, bernoulli]", "model.families"),  # binary data
        ("model.layers=[{sise: 784}, 64, 16]", "model.layers[0].sise"),
        ("model.layers=[{family: gaussian}, 64, 16]", "model.layers[0]"),
        ("model.layers=[784, {size: 64, family: poisson}, 16]", "model.layers[1].family"),
        ("model.layers=[784, {size: -64}, 16]", "model.layers[1]"),
        ("model.layers=[{size: 784, family: gaussian}, 64, 16]", "model.families"),  # binary
        ("data.dataset=mnist_continuous", "model.families"),  # real data, Bernoulli x
        ("model.gaussian_std=0", "model.gaussian_std"),
        ("model.labels=10", "model.labels"),  # binarized MNIST has no labels
        ("model.labels=-1", "model.labels"),
        ("train.labelled_fraction=1.5", "train.labelled_fraction"),
        ("validation.every_n_epochs=0", "validation.every_n_epochs"),
        # the Gibbs inpainting and sample pictures are drawn at a validation
        ("validation.every_n_epochs=3", "validation.gibbs.every_n_epochs"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "smoke.yaml", [override])
    assert repr(key) in str(err.value), str(err.value)
    assert "smoke.yaml" in str(err.value)


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  K: 10\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"'train\.epochs'.*unknown key"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        CONFIG_DIR / "smoke.yaml",
        ["optim.lr=3e-4", "optim.switch.epoch=5", "optim.switch.K=100", "data.valid_limit=null"],
    )
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML reads 3e-4 as a string: coerced
    assert (cfg.optim.switch.epoch, cfg.optim.switch.K) == (5, 100)
    assert cfg.data.valid_limit is None
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("optim.lr")


def test_layer_entries_can_name_their_family(tmp_path):
    """model.layers entries as {size, family} mappings resolve into sizes and families;
    the saved config is the resolved form, and it loads again to the same config."""
    overrides = ["model.layers=[{size: 784, family: gaussian}, {size: 64}, 16]"]
    cfg = load_config(CONFIG_DIR / "smoke.yaml", [*overrides, "data.dataset=mnist_continuous"])
    assert cfg.model.layers == [784, 64, 16]
    assert cfg.model.families == ["gaussian", "bernoulli", "bernoulli"]
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    with pytest.raises(ConfigError, match="not both"):
        load_config(CONFIG_DIR / "smoke.yaml", [*overrides, "model.families=[gaussian]"])


def test_yaml_off_means_off_and_round_trip(tmp_path):
    cfg = config_from_dict({"logging": {"wandb": False}})  # what YAML makes of `wandb: off`
    assert cfg.logging.wandb == "off"
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert again.resolved_run_dir().as_posix() == "runs/bihm"


# configs/sweep_*.yaml are `bihm tune` sweep files, checked in tests/test_tune.py.
TRAINING_CONFIGS = [p for p in sorted(CONFIG_DIR.glob("*.yaml")) if not p.name.startswith("sweep_")]


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
