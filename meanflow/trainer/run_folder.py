"""The run folder: is it ours and what does it resume from (read-only checks first), then its files.

    <train.out>/config.json      the resolved config of the latest start
    <train.out>/config.<step>.json  an earlier start's config.json, kept when a resume changed it (never deleted)
    <train.out>/.lock            the advisory lock of the trainer writing here (meanflow.trainer.run_lock)
    <train.out>/summary.json     what the run ran on (meanflow.trainer.summary)
    <train.out>/metrics.jsonl    one line per logged step (meanflow.trainer.metrics)
    <train.out>/checkpoints/     step-N folders (meanflow.checkpoint)
    <train.out>/loss.png         loss and mse against step, log y (meanflow.plots; at every checkpoint and the end)
    <train.out>/samples.png      at the end: the EMA model's 1-NFE samples beside its 2-NFE samples of the same noise
                                 and labels, one row per class, captioned "1-NFE" | "2-NFE", 8 white pixels apart
                                 (meanflow.images.panels); a scatter data | 1-NFE | 2-NFE for an MLP on 2-D data
    <train.out>/samples.npz      samples (1-NFE), samples_2nfe, labels (conditional), data (2-D runs)
    <train.out>/samples/step_N.png  every log.sample_every steps: 1-NFE samples of the EMA, 4 a class, same noise
All the pictures are written by meanflow.trainer.pictures.
"""

import json
import os

from meanflow.checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint, read_meta, write_json_atomic
from meanflow.models.config import ModelConfig

METRICS = "metrics.jsonl"
LOCK = ".lock"  # its text names the holder; a leftover one means nothing once its process is gone


class RunFolderError(ValueError):
    """The run folder cannot be used for this config; nothing in it was changed."""


def inspect_run_folder(run_dir, model_cfg: ModelConfig):
    """(the checkpoint to resume from, (path, meta) of the newest one whose meta.json reads), None where there is
    none; RunFolderError if the folder is not a run folder or holds another model. Reads only."""
    if not os.path.exists(run_dir):
        return None, None
    if not os.path.isdir(run_dir):
        raise RunFolderError(f"train.out: {run_dir} exists and is not a folder")
    if not [name for name in os.listdir(run_dir) if name != LOCK]:  # a trainer that died before writing anything
        return None, None
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise RunFolderError(
            f"train.out: {run_dir} is not empty and holds no config.json, so it is not a meanflow run folder; "
            "choose another --train.out"
        )
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None, None
    reference, meta = newest_readable(run_dir)
    if reference is None:  # no meta.json reads: resume sets them aside one by one and says so
        return latest[1], None
    saved = _saved_model(reference, meta)
    if saved != model_cfg:
        raise RunFolderError(
            f"train.out: {run_dir} holds checkpoints of a different model ({saved}) than this config asks for "
            f"({model_cfg}); use another --train.out or the same model settings"
        )
    return latest[1], (reference, meta)


def newest_readable(run_dir):
    """(path, meta) of the newest complete checkpoint whose meta.json reads, or (None, None): what the run's model
    and config are compared with. A newer one with a damaged meta.json is left to resume, which sets it aside."""
    for _, path in reversed(complete_checkpoints(run_dir)):
        try:
            return path, read_meta(path)
        except CheckpointError:
            continue
    return None, None


def _saved_model(path, meta) -> ModelConfig:
    try:
        model = ModelConfig(**meta.get("config", {}).get("model", {}))
        model.validate()
    except (TypeError, ValueError) as e:
        raise RunFolderError(f"checkpoint {path}: unreadable model config: {e}") from None
    return model


def prepare_run_folder(run_dir, step, config: dict, summary: dict):
    """Create the folder, drop metrics past the resumed step, and write config.json and summary.json (rank 0)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        truncate_metrics(os.path.join(run_dir, METRICS), step)
        keep_previous_config(run_dir, step, config)
        write_json_atomic(os.path.join(run_dir, "config.json"), config)
        write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    except OSError as e:
        raise RunFolderError(f"train.out: cannot write the run folder {run_dir}: {e}") from None


def keep_previous_config(run_dir, step, config: dict):
    """Rename a config.json that differs from the config about to run to config.<step>.json, step being where the run
    resumes (what is left of the earlier start's work); a name already taken gets a suffix: nothing is overwritten."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            previous = json.load(f)
    except FileNotFoundError:
        return
    except json.JSONDecodeError:  # a config.json cut short is still kept, under its own name
        previous = None
    if previous == json.loads(json.dumps(config)):  # through JSON: tuples and lists compare alike
        return
    name, n = f"config.{step}.json", 1
    while os.path.exists(os.path.join(run_dir, name)):
        n += 1
        name = f"config.{step}-{n}.json"
    os.rename(path, os.path.join(run_dir, name))


def truncate_metrics(path, last_step):
    """Drop logged lines beyond the resumed step (they belong to the lost part of a crashed run)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= last_step:
                keep.append(ln)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
