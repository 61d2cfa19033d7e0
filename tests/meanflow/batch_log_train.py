"""tests.meanflow.randomized_train, with each process logging what every training step fed the objective (test-only).

    BATCH_LOG=DIR torchrun --standalone --nproc_per_node=2 -m tests.meanflow.batch_log_train --config smoke ...

Each call of meanflow_loss (one per training step) appends one line to DIR/rank<RANK>.jsonl: per row of this rank's
batch, sum(x) and sum(x^2) in float64, the label, sum(e) of its noise, r and t. A rank's rows are its contiguous
slice of the global batch, so concatenating the ranks' lines of a step in rank order gives that global step's rows:
compared across world sizes and resumes, they show the same items, labels, noise and times at every step.
meanflow_loss is replaced before meanflow.trainer is imported (the trainer binds the name at import).
"""

import json
import os
import sys

import meanflow.objective

_loss = meanflow.objective.meanflow_loss

def _row_values(x):
    return x.detach().double().flatten(1)  # (B, n)

def logged_meanflow_loss(model, x, y, d, cfg):
    rows = _row_values(x)
    line = {"x_sum": rows.sum(1).tolist(), "x_sq": rows.pow(2).sum(1).tolist(),
            "y": None if y is None else y.tolist(), "e_sum": _row_values(d.e).sum(1).tolist(),
            "r": d.r.double().tolist(), "t": d.t.double().tolist()}
    path = os.path.join(os.environ["BATCH_LOG"], f"rank{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
    return _loss(model, x, y, d, cfg)

def main(argv):
    os.makedirs(os.environ["BATCH_LOG"], exist_ok=True)
    meanflow.objective.meanflow_loss = logged_meanflow_loss
    from tests.meanflow import randomized_train

    return randomized_train.main(argv)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
