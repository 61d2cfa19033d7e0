"""Config: presets, files, --section.key=value overrides, typed values and errors that name the key."""

import json

import pytest

from meanflow.config import PRESETS, ConfigError, config_from_dict, resolve_config


def test_no_arguments_is_the_mnist_demo():
    cfg = resolve_config([])
    assert cfg.data.source == "mnist" and cfg.model.num_classes == 10 and cfg.train.out == "runs/mnist-demo"


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves(name, tmp_path):
    # the ImageNet presets read the user's latents: they need a data folder, and say so
    if name.startswith("imagenet"):
        with pytest.raises(ValueError, match="data.root"):
            resolve_config(["--config", name])
        assert resolve_config(["--config", name, f"--data.root={tmp_path}"]).data.source == "npy"
    else:
        assert resolve_config(["--config", name]).train.steps > 0


def test_contract_override_keys_exist_and_convert():
    cfg = resolve_config(["--config=smoke", "--train.steps=17", "--train.global_batch=32", "--train.out=x/y",
                          "--checkpoint.every=5", "--optim.lr=3e-4", "--data.hflip=true", "--train.steps=1_000"])
    assert cfg.train.steps == 1000 and cfg.train.global_batch == 32 and cfg.train.out == "x/y"
    assert cfg.checkpoint.every == 5 and cfg.optim.lr == 3e-4 and cfg.data.hflip is True


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--train.stepz=3"], "train.stepz"),
        (["--nosection.x=1"], "nosection.x"),
        (["--train.steps=ten"], "train.steps"),
        (["--train.steps=1.5"], "train.steps"),
        (["--train.global_batch=-1"], "train.global_batch"),
        (["--data.hflip=maybe"], "data.hflip"),
        (["--model.name=DiT-Z/2"], "model.name"),
        (["--objective.engine=jax"], "objective.engine"),
        (["--train.tangent_precision=bf16"], "train.tangent_precision"),
        (["--train.tf32=maybe"], "train.tf32"),
        (["--optim.impl=apex"], "optim.impl"),
        (["--config", "no-such-preset"], "no-such-preset"),
        (["train.steps=3"], "train.steps=3"),
        (["--config"], "--config"),
    ],
)
def test_bad_values_name_the_key(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("-", r"\-")):
        resolve_config(argv)


def test_toml_and_yaml_files_with_a_preset(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "smoke"\n[train]\nsteps = 9\n[optim]\nlr = 0.002\n')
    cfg = resolve_config(["--config", str(toml), "--train.steps=11"])
    assert cfg.model.name == "DiT-Nano/8" and cfg.train.steps == 11 and cfg.optim.lr == 0.002
    yaml = tmp_path / "run.yaml"
    yaml.write_text("preset: smoke\ntrain:\n  global_batch: 4\n")
    assert resolve_config(["--config", str(yaml)]).train.global_batch == 4
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = [\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        resolve_config(["--config", str(bad)])
    typo = tmp_path / "typo.toml"
    typo.write_text("[train]\nstep = 3\n")
    with pytest.raises(ConfigError, match="train.step"):
        resolve_config(["--config", str(typo)])


def test_data_root_alone_selects_the_users_data(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.npy").write_bytes(b"")
    assert resolve_config([f"--data.root={tmp_path}"]).data.source == "npy"


def test_saved_config_round_trips(tmp_path):
    cfg = resolve_config(["--config", "imagenet-XL2", f"--data.root={tmp_path}"])
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.objective.cfg_w == 0.2 and cfg.objective.cfg_k == 0.92 and cfg.objective.cfg_t_end == 0.75


def test_precision_keys(tmp_path):
    cfg = resolve_config(["--config=smoke"])
    assert (cfg.train.precision, cfg.train.tangent_precision, cfg.train.tf32) == ("auto", "fp32", True)
    cfg = resolve_config(["--config=smoke", "--train.precision=bf16", "--train.tangent_precision=primal",
                          "--train.tf32=false"])
    assert (cfg.train.precision, cfg.train.tangent_precision, cfg.train.tf32) == ("bf16", "primal", False)
    for name in ("imagenet-B2", "imagenet-XL2"):  # bf16 with fp32 tangents (reason in config._imagenet)
        train = resolve_config(["--config", name, f"--data.root={tmp_path}"]).train
        assert (train.precision, train.tangent_precision, train.tf32) == ("bf16", "fp32", True)
