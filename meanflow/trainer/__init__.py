"""The training loop's parts, one concern a module; :mod:`meanflow.train` is the torchrun entry that wires them.

    loop.py           the `train.*` section; Trainer: setup, the loop, the train step, samples at the end
    run_folder.py     is the folder ours, what it resumes from, config.json / summary.json, metrics truncation
    run_lock.py       one trainer per run folder: the advisory lock on <train.out>/.lock
    config_change.py  resuming with a changed config: what differs, what applies, what is refused
    metrics.py        the `log.*` section; metrics.jsonl, TensorBoard, the progress bar, step timing
    optim.py          the `optim.*` section; AdamW and the learning-rate schedule
    checkpointing.py  the `checkpoint.*` section; when to save, what goes with a checkpoint, resuming
    summary.py        the run summary printed at start (device, precision, FLOPs, data, kernels, resume point)
    pictures.py       samples.png at the end (1-NFE beside 2-NFE, or 2-D scatters), step grids, loss.png
"""
