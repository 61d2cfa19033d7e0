"""Config: presets, files, --section.key=value overrides, typed values and errors that name the key."""

import json
import sys

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
        (["--config", "toy-moons", "--model.long_skips=true"], "model.long_skips"),
        (["--model.canvas=20"], "model.canvas"),
        (["--model.canvas=24", "--model.prediction=u"], "model.canvas"),
        (["--model.canvas=0"], "model.input_size"),  # the demo's patch 6 tiles its 24 x 24 canvas, not 32 x 32
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


# ----------------------------------------------------------------------------------------------------------------------
# Hardening: every bad file or value is one line naming the file or key, exit 2, never a traceback
# ----------------------------------------------------------------------------------------------------------------------
BAD_FILES = [
    # (file name, text, what the message must hold besides the file name)
    ("syntax.yaml", "train:\n  steps: [3\n  out: x\n", ["cannot parse", "line "]),
    ("tabs.yaml", "train:\n\tsteps: 3\n", ["cannot parse"]),
    ("list.yaml", "- preset: smoke\n- train: 3\n", ["top level must be a mapping", "a list"]),
    ("scalar.json", "42\n", ["top level must be a mapping"]),
    ("syntax.json", '{"train": {"steps": 3,}}', ["cannot parse"]),
    ("list_for_int.toml", "[train]\nsteps = [1, 2]\n", ["train.steps", "expected a single int", "a list"]),
    ("map_for_float.yaml", "optim:\n  lr: {a: 1}\n", ["optim.lr", "a mapping"]),
    ("empty_value.yaml", "train:\n  steps:\n", ["train.steps", "no value"]),
    ("section_scalar.toml", "train = 5\n", ["section 'train' must be a mapping"]),
    ("nan_lr.toml", "[optim]\nlr = nan\n", ["optim.lr", "finite"]),
    ("inf_lr.yaml", "optim:\n  lr: .inf\n", ["optim.lr", "finite"]),
    ("inf_lr.json", '{"optim": {"lr": Infinity}}', ["optim.lr", "finite"]),
    ("half_step.toml", "[train]\nsteps = 2.5\n", ["train.steps", "as int"]),
    ("half_step.yaml", "train:\n  steps: 2.5\n", ["train.steps", "as int"]),
    ("list_for_str.toml", "[train]\nout = ['a', 'b']\n", ["train.out", "a list"]),
    ("list_preset.yaml", "preset: [smoke]\n", ["unknown preset"]),
]


@pytest.mark.parametrize("name,text,needles", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_config_files_name_the_file(name, text, needles, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        resolve_config(["--config", str(path)])
    msg = str(e.value)
    for needle in [str(path), *needles]:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("arg,needles", [
    ("--optim.lr=nan", ["optim.lr", "finite", "'nan'"]),
    ("--optim.lr=inf", ["optim.lr", "finite", "'inf'"]),
    ("--objective.cfg_w=-inf", ["objective.cfg_w", "finite"]),
    ("--data.scale=1e999", ["data.scale", "finite"]),
    ("--train.steps=2.5", ["train.steps", "as int"]),
    ("--train.steps=nan", ["train.steps", "as int"]),
    ("--train.steps=inf", ["train.steps", "as int"]),
])
def test_bad_numbers_on_the_command_line_name_the_key(arg, needles):
    with pytest.raises(ConfigError) as e:
        resolve_config(["--config", "smoke", arg])
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


@pytest.mark.parametrize("written,value", [("1e3", 1000), ("2.0", 2), ("1_000", 1000), ("12", 12)])
def test_integral_numbers_read_as_int_in_files_and_on_the_command_line(written, value, tmp_path):
    cli = resolve_config(["--config", "smoke", f"--train.steps={written}"]).train.steps
    toml = tmp_path / "a.toml"
    toml.write_text(f"[train]\nsteps = {written}\n")
    yaml = tmp_path / "a.yaml"
    yaml.write_text(f"train:\n  steps: {written}\n")
    json_file = tmp_path / "a.json"
    json_file.write_text(json.dumps({"train": {"steps": written}}))  # as a string: JSON has no 1_000
    got = [cli] + [resolve_config(["--config", str(p)]).train.steps for p in (toml, yaml, json_file)]
    assert got == [value] * 4 and all(type(v) is int for v in got)


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    from tests.meanflow.cli import cli_env, run

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [3\n")
    for args, needles in [(["--config", str(bad)], [str(bad), "cannot parse"]),
                          (["--config", "smoke", "--optim.lr=nan"], ["optim.lr", "finite"]),
                          (["--config", "smoke", "--train.steps=2.5"], ["train.steps"])]:
        p = run([sys.executable, "-m", "meanflow.train", *args, "--print-config"], cli_env(tmp_path / "cache"),
                check=False)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        for needle in needles:
            assert needle in p.stderr, (needle, p.stderr)
