"""Typed run configuration: one dataclass per component, named presets, files and ``--section.key=value`` overrides.

    cfg = resolve_config(["--config", "smoke", "--train.steps=20", "--optim.lr=3e-4"])

A config is built in three layers: a preset (by name) or a TOML/YAML file (which may name a ``preset`` to start
from), then command-line overrides. Values are converted to the field's type; an unknown section or key, or a value
that does not parse, raises ConfigError naming it with the valid choices. The resolved config is saved as
``config.json`` in the run folder and inside every checkpoint.
"""

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field

from meanflow.data import DataConfig, DataError
from meanflow.models import MODEL_NAMES
from meanflow.models.layers import TANGENT_PRECISIONS
from meanflow.objective import ObjectiveConfig


class ConfigError(ValueError):
    """A bad configuration; the message names the key or file."""


@dataclass
class ModelConfig:
    name: str = "DiT-B/2"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    time_scale: float = 1.0

    def validate(self):
        if self.name not in MODEL_NAMES:
            raise ConfigError(f"model.name: unknown model {self.name!r}; valid choices: {', '.join(MODEL_NAMES)}")
        for key in ("input_size", "in_channels"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes: must be >= 0, got {self.num_classes}")

    def build_kwargs(self):
        if self.name == "MLP":
            return dict(dim=self.in_channels, num_classes=self.num_classes, time_scale=self.time_scale)
        return dict(input_size=self.input_size, in_channels=self.in_channels, num_classes=self.num_classes,
                    time_scale=self.time_scale)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup of the learning rate
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    impl: str = "auto"  # "auto" or "torch": torch's AdamW (fused on CUDA)
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay_k = min(ema_decay, (1 + k) / (10 + k)): useful for short runs

    def validate(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1/beta2: must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay: must lie in [0, 1), got {self.ema_decay}")
        if self.impl not in ("auto", "torch"):
            raise ConfigError(f"optim.impl: unknown value {self.impl!r}; valid choices: auto, torch")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be >= 0")


@dataclass
class TrainConfig:
    steps: int = 400_000
    global_batch: int = 256
    out: str = "runs/default"  # the run folder
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32" (README: Precision)
    tangent_precision: str = "fp32"  # the JVP tangent under bf16: "fp32", or "primal" (bf16 like the primal)
    tf32: bool = True  # fp32 matmuls and convolutions on CUDA in TF32 (torch and the attention kernel)
    compile: bool = False  # torch.compile each DiT block's dual path
    activation_checkpointing: bool = False
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    samples_at_end: int = 10  # samples per class in samples.png written at the end (0: none)

    def validate(self):
        if self.steps <= 0:
            raise ConfigError(f"train.steps: must be > 0, got {self.steps}")
        if self.global_batch <= 0:
            raise ConfigError(f"train.global_batch: must be > 0, got {self.global_batch}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision: unknown value {self.precision!r}; valid choices: auto, bf16, fp32")
        if self.tangent_precision not in TANGENT_PRECISIONS:
            raise ConfigError(f"train.tangent_precision: unknown value {self.tangent_precision!r}; valid choices: "
                              f"{', '.join(TANGENT_PRECISIONS)}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"train.max_bad_steps: must be >= 1, got {self.max_bad_steps}")
        if not self.out:
            raise ConfigError("train.out: the run folder must be set")


@dataclass
class LogConfig:
    every: int = 50  # steps between metrics.jsonl lines
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = False

    def validate(self):
        if self.every <= 0:
            raise ConfigError(f"log.every: must be > 0, got {self.every}")


@dataclass
class CheckpointConfig:
    every: int = 5000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all

    def validate(self):
        if self.every <= 0:
            raise ConfigError(f"checkpoint.every: must be > 0, got {self.every}")
        if self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last: must be >= 0, got {self.keep_last}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self):
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            try:
                section.validate()
            except ValueError as e:  # each section's own error type: surface all as ConfigError
                raise ConfigError(str(e)) from None
        return self

    def to_dict(self):
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------------------------

def _mnist_demo():
    """Sized to finish in under 10 minutes on a 2-core CPU with 2 processes (see README for the measured time)."""
    return {
        "model": {"name": "DiT-Micro/4", "input_size": 32, "in_channels": 1, "num_classes": 10},
        "data": {"source": "mnist"},
        # guidance in training (v~ = 2 v - u(z, t, t | null)): at equal wall time it gave clearly more legible
        # digits than none (1300 guided steps vs 1500 plain ones, looked at side by side)
        "objective": {"adaptive_p": 0.75, "adaptive_c": 1e-3, "ratio_r_neq_t": 0.25, "time_mu": -0.4,
                      "class_drop": 0.1, "cfg_w": 2.0, "cfg_k": 0.0},
        "optim": {"lr": 1e-3, "warmup_steps": 100, "grad_clip": 1.0, "ema_decay": 0.995, "ema_warmup": True},
        "train": {"steps": 1250, "global_batch": 64, "out": "runs/mnist-demo"},
        "log": {"every": 20},
        "checkpoint": {"every": 250, "keep_last": 2},
    }


def _smoke():
    return {
        "model": {"name": "DiT-Nano/8", "input_size": 32, "in_channels": 1, "num_classes": 10},
        "data": {"source": "mnist", "num_workers": 0},
        "objective": {"adaptive_p": 0.75},
        "optim": {"lr": 1e-3, "ema_decay": 0.9, "ema_warmup": True},
        "train": {"steps": 6, "global_batch": 8, "out": "runs/smoke", "samples_at_end": 2},
        "log": {"every": 1, "progress": False},
        "checkpoint": {"every": 3, "keep_last": 2},
    }


def _imagenet(name, w, k, t_end, p=1.0, c=1e-2):
    """The paper's ImageNet 256 recipe on SD-VAE latents (32x32x4, scaled 0.18215): 240 epochs at batch 256.

    In bf16 with fp32 tangents rather than the paper's fp32: bf16 tensor cores run twice TF32's rate on A100/H100 and
    bf16 activations and all-gathers move half the bytes, while master weights, optimizer, gradient reduction and
    the tangent (the target's derivative, at the bf16 primal's floor: tests/meanflow/test_precision.py) stay fp32.
    --train.precision=fp32 (TF32 matmuls) is the paper's setting.
    """
    return {
        "model": {"name": name, "input_size": 32, "in_channels": 4, "num_classes": 1000},
        "data": {"source": "npy", "scale": 0.18215, "hflip": True},
        "objective": {"adaptive_p": p, "adaptive_c": c, "ratio_r_neq_t": 0.25, "time_mu": -0.4, "time_sigma": 1.0,
                      "cfg_w": w, "cfg_k": k, "cfg_t_start": 0.0, "cfg_t_end": t_end, "class_drop": 0.1},
        "optim": {"lr": 1e-4, "beta2": 0.95, "weight_decay": 0.0, "ema_decay": 0.9999},
        "train": {"steps": 1_200_000, "global_batch": 256, "out": f"runs/imagenet-{name[4:].replace('/', '')}",
                  "precision": "bf16", "tangent_precision": "fp32", "tf32": True},
    }


PRESETS = {
    "mnist-demo": _mnist_demo,
    "smoke": _smoke,
    "imagenet-B2": lambda: _imagenet("DiT-B/2", 1.0, 0.5, 1.0),
    "imagenet-M2": lambda: _imagenet("DiT-M/2", 1.0, 0.5, 1.0),
    "imagenet-L2": lambda: _imagenet("DiT-L/2", 0.2, 0.92, 0.8),
    "imagenet-XL2": lambda: _imagenet("DiT-XL/2", 0.2, 0.92, 0.75),
}


# ----------------------------------------------------------------------------------------------------------------------
# building a config
# ----------------------------------------------------------------------------------------------------------------------

def _convert(key, text_or_value, typ):
    """Convert a command-line string (or a file's value) to the field's type, or raise ConfigError naming the key."""
    value = text_or_value
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except ValueError:
        raise ConfigError(f"{key}: cannot read {text_or_value!r} as {typ.__name__}") from None


def _field_types(section_obj):
    hints = {f.name: f.type for f in dataclasses.fields(section_obj)}
    names = {"int": int, "float": float, "bool": bool, "str": str}
    return {k: names.get(v, v) if isinstance(v, str) else v for k, v in hints.items()}


def apply_overrides(cfg: Config, overrides: dict, origin: str = "override"):
    """Set ``{"section.key": value}`` or nested ``{"section": {"key": value}}`` on cfg, checking every name."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    sections = [f.name for f in dataclasses.fields(cfg)]
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ConfigError(f"{origin}: unknown key {key!r}; sections: {', '.join(sections)}")
        obj = getattr(cfg, section)
        types = _field_types(obj)
        if name not in types:
            raise ConfigError(f"{origin}: unknown key {key!r}; valid keys of {section}: {', '.join(types)}")
        setattr(obj, name, _convert(key, value, types[name]))
    return cfg


def load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no preset or file named {path!r}; presets: {', '.join(PRESETS)}")
    try:
        if path.endswith(".toml"):
            with open(path, "rb") as f:
                return tomllib.load(f)
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: reading YAML needs pyyaml (pip install pyyaml), or use TOML") from None
            with open(path) as f:
                return yaml.safe_load(f) or {}
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    raise ConfigError(f"{path}: config files must end in .toml, .yaml, .yml or .json")


def parse_argv(argv):
    """Split argv into (config name or file, {"section.key": "value"})."""
    source, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a preset name or a file")
            source, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            source, i = arg.split("=", 1)[1], i + 1
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}: expected --config NAME|FILE or --section.key=value")
        key, value = arg[2:].split("=", 1)
        overrides[key] = value
        i += 1
    return source, overrides


def _infer_source(cfg: Config, overrides: dict):
    """--data.root alone means "my data instead of the embedded default": read it as arrays or images."""
    if "data.root" in overrides and "data.source" not in overrides and cfg.data.source == "mnist":
        root = cfg.data.root
        if not os.path.isdir(root):
            raise DataError(f"data.root: data folder {root} does not exist")
        names = [n for _, _, files in os.walk(root) for n in files]
        cfg.data.source = "npy" if any(n.endswith(".npy") for n in names) else "images"


def resolve_config(argv) -> Config:
    source, overrides = parse_argv(list(argv))
    cfg = Config()
    if source is None:
        source = "mnist-demo"  # no arguments: the embedded default
    if source in PRESETS:
        apply_overrides(cfg, PRESETS[source](), origin=f"preset {source}")
    else:
        data = load_file(source)
        preset = data.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"{source}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
            apply_overrides(cfg, PRESETS[preset](), origin=f"preset {preset}")
        apply_overrides(cfg, data, origin=source)
    apply_overrides(cfg, overrides, origin="command line")
    _infer_source(cfg, overrides)
    return cfg.validate()


def config_from_dict(d: dict) -> Config:
    return apply_overrides(Config(), d, origin="saved config").validate()
