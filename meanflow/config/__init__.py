"""Typed run configuration: the sections (schema.py, each section's dataclass living with the code that reads it),
named presets (presets.py), building a config from a preset or file plus ``--section.key=value`` overrides
(parse.py), and the ``--help`` text (help.py). The resolved config is saved as ``config.json`` in the run folder and
inside every checkpoint."""

from meanflow.config.help import help_text
from meanflow.config.parse import (
    apply_overrides,
    config_from_dict,
    config_json,
    load_file,
    parse_argv,
    resolve_config,
)
from meanflow.config.presets import PRESETS
from meanflow.config.schema import Config, field_docs, section_types
from meanflow.errors import ConfigError

__all__ = [
    "PRESETS",
    "Config",
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_json",
    "field_docs",
    "help_text",
    "load_file",
    "parse_argv",
    "resolve_config",
    "section_types",
]
