"""The run config: one typed dataclass per section, each living with the code that reads it.

    model      meanflow/models/config.py   ModelConfig
    data       meanflow/data/config.py     DataConfig
    objective  meanflow/objective.py       ObjectiveConfig
    optim      meanflow/trainer/optim.py   OptimConfig
    train      meanflow/trainer/loop.py    TrainConfig
    log        meanflow/trainer/metrics.py LogConfig
    checkpoint meanflow/trainer/checkpointing.py CheckpointConfig

A field's trailing comment is its documentation: ``--help`` reads it from the source (:func:`field_docs`), so the
comment a reader sees in the code and the line a user sees in the terminal are the same text.
"""

import dataclasses
import inspect
import re
from dataclasses import dataclass, field

from meanflow.data import DataConfig
from meanflow.errors import ConfigError
from meanflow.models.config import ModelConfig
from meanflow.objective import ObjectiveConfig
from meanflow.trainer.checkpointing import CheckpointConfig
from meanflow.trainer.loop import TrainConfig
from meanflow.trainer.metrics import LogConfig
from meanflow.trainer.optim import OptimConfig


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
            try:
                getattr(self, f.name).validate()
            except ValueError as e:  # each section's own error type: surface all as ConfigError
                raise ConfigError(str(e)) from None
        return self

    def to_dict(self):
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:\s*[\w\[\], .|]+?\s*=.*?#\s*(.+)$")


def section_types():
    """{section: its dataclass}."""
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}


def field_docs(cls) -> dict:
    """{field name: the trailing comment on its line in cls's source}."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD_LINE.match(line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def field_types(section_obj) -> dict:
    names = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: names.get(f.type, f.type) if isinstance(f.type, str) else f.type
            for f in dataclasses.fields(section_obj)}
