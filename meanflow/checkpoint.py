"""Crash-safe checkpoints with torch.distributed.checkpoint (DCP), resharded on load to any world size.

Layout of a run folder:

    config.json                 the resolved config of the latest start
    metrics.jsonl               one JSON object per logged step
    checkpoints/step_00000600/  a complete checkpoint: DCP shards + meta.json (written last)
    checkpoints/.step_00000600.tmp/   one being written; never read, removed by the next successful save

A checkpoint is written into a temporary folder by every rank, then rank 0 writes meta.json and renames the folder
into place: a rename is atomic, so a crash (even SIGKILL) leaves either the old set of checkpoints or the new one.
Only folders named step_* that hold meta.json count; pruning touches nothing else.
"""

import json
import os
import re
import shutil
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

CKPT_DIR = "checkpoints"
_STEP = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used; the message names the folder."""


def checkpoint_root(run_dir):
    return os.path.join(run_dir, CKPT_DIR)


def complete_checkpoints(run_dir):
    """[(step, path)] of complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir):
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(path):
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read meta.json: {e}") from None


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state(model, ema_module, optimizer):
    state = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema_module)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_checkpoint(dist, run_dir, step, model, ema_module, optimizer, meta, keep_last=0):
    """Write checkpoints/step_<step> atomically (collective: every rank calls it)."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f".step_{step:08d}.tmp")
    if dist.is_main:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(tmp):  # debris of a crash during an earlier save of this step
            shutil.rmtree(tmp)
    dist.barrier()
    with warnings.catch_warnings():  # one process without a process group is a supported DCP mode, not a concern
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(_state(model, ema_module, optimizer), checkpoint_id=tmp)
    dist.barrier()
    if dist.is_main:
        meta = dict(meta, step=step, world_size=dist.world_size, saved_at=time.time(), torch=torch.__version__)
        write_json_atomic(os.path.join(tmp, "meta.json"), meta)
        if os.path.isdir(final):  # re-saving a step after a crash: move the old copy aside only now
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(run_dir, keep_last)
    dist.barrier()
    return final


def _prune(run_dir, keep_last):
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path, model, ema_module, optimizer=None):
    """Load a checkpoint into (possibly sharded) modules; a different world size is resharded by DCP."""
    state = _state(model, ema_module, optimizer)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP raises a variety of errors for a mismatched or damaged checkpoint
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {str(e).splitlines()[0]}") from None
    opts = StateDictOptions(strict=True)
    set_model_state_dict(model, state["model"], options=opts)
    set_model_state_dict(ema_module, state["ema"], options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return read_meta(path)


def load_ema_weights(path, module):
    """Load only the EMA weights of a checkpoint into an unsharded module (for sampling and evaluation)."""
    state = {"ema": get_model_state_dict(module)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=path)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}") from None
    set_model_state_dict(module, state["ema"], options=StateDictOptions(strict=True))
    return read_meta(path)
