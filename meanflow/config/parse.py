"""Building a config: a preset or a file, then ``--section.key=value`` overrides, each value converted to its field's
type and every name checked.

    cfg = resolve_config(["--config", "smoke", "--train.steps=20", "--optim.lr=3e-4"])

A config file (TOML, YAML or JSON) holds sections of keys and may name a ``preset`` to start from. An unknown
section or key, or a value that does not parse, raises ConfigError naming it with the valid choices.
"""

import json
import os
import tomllib

from meanflow.config.presets import PRESETS
from meanflow.config.schema import SECTIONS, Config, field_types
from meanflow.data import infer_source
from meanflow.errors import ConfigError


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


def apply_overrides(cfg: Config, overrides: dict, origin: str = "override"):
    """Set ``{"section.key": value}`` or nested ``{"section": {"key": value}}`` on cfg, checking every name."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"{origin}: unknown key {key!r}; sections: {', '.join(SECTIONS)}")
        obj = getattr(cfg, section)
        types = field_types(obj)
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
    # --data.root alone means "my data instead of the embedded default": read it as arrays or images
    if "data.root" in overrides and "data.source" not in overrides:
        infer_source(cfg.data)
    return cfg.validate()


def config_from_dict(d: dict) -> Config:
    return apply_overrides(Config(), d, origin="saved config").validate()


def config_json(cfg: Config) -> str:
    """The resolved config as a JSON config file: given back with --config FILE.json it rebuilds the same config."""
    return json.dumps(cfg.to_dict(), indent=2) + "\n"
