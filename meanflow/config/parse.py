"""Building a config: a preset or a file, then ``--section.key=value`` overrides, each value converted to its field's
type and every name checked.

    cfg = resolve_config(["--config", "smoke", "--train.steps=20", "--optim.lr=3e-4"])

A config file (TOML, YAML or JSON) holds sections of keys and may name a ``preset`` to start from. An unknown
section or key, or a value that does not parse, raises ConfigError naming it with the valid choices.
"""

import json
import math
import os
import tomllib

from meanflow.config.presets import PRESETS
from meanflow.config.schema import SECTIONS, Config, field_types
from meanflow.data import infer_source
from meanflow.errors import ConfigError


def _kind(value) -> str:
    return {list: "a list", tuple: "a list", dict: "a mapping", type(None): "no value"}.get(type(value), "")


def _convert(key, text_or_value, typ):
    """Convert a command-line string (or a file's value) to the field's type, or raise ConfigError naming the key.

    One rule for numbers, on the command line and in files alike: an int field takes 1000, 1_000, 1e3 or 1000.0
    (any integral value), never 2.5; a float field takes any finite number, never nan or inf."""
    kind = _kind(text_or_value)
    if kind:  # a list, mapping or empty value where the schema has a scalar
        raise ConfigError(f"{key}: expected a single {typ.__name__} value, got {kind} ({text_or_value!r})")
    read = {bool: _read_bool, int: _read_int, float: _read_float}.get(typ, _read_str)
    try:
        value = read(text_or_value)
    except (ValueError, TypeError, OverflowError):
        what = "int (a whole number: 1000, 1_000 and 1e3 are read, 2.5 is not)" if typ is int else typ.__name__
        raise ConfigError(f"{key}: cannot read {text_or_value!r} as {what}") from None
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {text_or_value!r}")
    return value


def _read_bool(value):
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _read_int(value):
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            value = float(value)  # "1e3" or "2.0": judged as the number it writes, below
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError


def _read_float(value):
    if isinstance(value, bool):
        raise ValueError
    return float(value)


def _read_str(value):
    if not isinstance(value, (str, int, float)):
        raise ValueError
    return str(value)


def apply_overrides(cfg: Config, overrides: dict, origin: str = "override"):
    """Set ``{"section.key": value}`` or nested ``{"section": {"key": value}}`` on cfg, checking every name."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections ({{section: {{key: value}}}}), got "
                          f"{_kind(overrides) or type(overrides).__name__} ({overrides!r})")
    flat = {}
    for key, value in overrides.items():
        key = str(key)
        if key in SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{origin}: section {key!r} must be a mapping of keys, got {_kind(value) or repr(value)}")
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
        try:
            setattr(obj, name, _convert(key, value, types[name]))
        except ConfigError as e:
            raise ConfigError(str(e) if origin == "command line" else f"{origin}: {e}") from None
    return cfg


def load_file(path: str) -> dict:
    """A config file's mapping; every failure (unreadable, unparsable, not a mapping) a ConfigError naming the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no preset or file named {path!r}; presets: {', '.join(PRESETS)}")
    if not path.endswith((".toml", ".yaml", ".yml", ".json")):
        raise ConfigError(f"{path}: config files must end in .toml, .yaml, .yml or .json")
    try:
        if path.endswith(".toml"):
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif path.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
        else:
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: reading YAML needs pyyaml (pip install pyyaml), or use TOML") from None
            with open(path) as f:
                try:
                    data = yaml.safe_load(f)
                except yaml.YAMLError as e:
                    mark = getattr(e, "problem_mark", None)
                    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
                    raise ConfigError(f"{path}: cannot parse: {where}{getattr(e, 'problem', None) or e}") from None
            data = {} if data is None else data  # an empty YAML file
    except (ValueError, OSError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors, as is bad UTF-8
        raise ConfigError(f"{path}: cannot parse: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (section: {{key: value}}), got "
                          f"{_kind(data) or type(data).__name__}")
    return data


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
            if not isinstance(preset, str) or preset not in PRESETS:
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
