"""``python -m meanflow.train --help``: every section and key with its type, default and meaning (the field's
comment in the code), then the presets."""

import dataclasses

from meanflow.config.presets import PRESET_HELP
from meanflow.config.schema import Config, field_docs, section_types

USAGE = """usage: torchrun --standalone --nproc_per_node=N -m meanflow.train [--config NAME|FILE] [--KEY=VALUE ...]
       python -m meanflow.train ...                     (one process; KEY is section.key, as listed below)
       python -m meanflow.train ... --print-config      (print the resolved config as JSON and exit)

With no arguments it trains the embedded default (preset mnist-demo) on whatever hardware is there. Re-running the
same command on an existing run folder (train.out) resumes from its newest complete checkpoint. A config FILE (.toml,
.yaml, .json) holds sections of keys and may name a preset to start from; the output of --print-config is one."""


def help_text() -> str:
    lines = [USAGE, "", "presets (--config NAME):"]
    width = max(map(len, PRESET_HELP)) + 2
    lines += [f"  {name:<{width}}{text}" for name, text in PRESET_HELP.items()]
    defaults = Config()
    for section, cls in section_types().items():
        docs = field_docs(cls)
        lines += ["", f"{section}:"]
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, section), f.name)
            value = repr(value) if value == "" else value
            typ = f.type if isinstance(f.type, str) else f.type.__name__
            lines.append(f"  --{section}.{f.name}={value}  ({typ})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)
