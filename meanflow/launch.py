"""torchrun with a scheduler-friendly ending: ``python -m meanflow.launch [torchrun options] -m meanflow.train ...``.

    python -m meanflow.launch --standalone --nproc_per_node=8 -m meanflow.train --config imagenet-XL2 ...

The same launcher (torch.distributed.run: its options, rendezvous, and the signal it forwards to its workers), with
the ending a job script wants:
- signalled itself (a scheduler's SIGTERM, Ctrl-C), it forwards the signal as torchrun does, waits for the workers
  to save and exit, prints one line and exits 75 (PREEMPTED: re-run the same command to resume) instead of
  torchrun's SignalException traceback and status 1;
- when the workers that failed on their own exited 75 (each was signalled alone and saved), it exits 75, quietly;
- any other worker failure: one line naming the ranks and their statuses, and the first status a worker exited
  with on its own (negative ones are workers the launcher stopped; the worker's own error is in its output above),
  instead of torchrun's error box and status 1.
Plain ``torchrun`` works as well; only its ending differs.
"""

import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from meanflow.trainer.preemption import PREEMPTED


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    # torchrun's own log lines on a signal or a failed worker ("Received 15 death signal", "Sending process ...",
    # "failed (exitcode: 2) local_rank: 0"): the ending below says it in one line, the workers' errors are above it
    for name in ("torch.distributed.elastic", "torch.distributed.run"):  # and the OMP_NUM_THREADS banner
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except SignalException as e:
        name = getattr(e.sigval, "name", str(e.sigval))
        print(f"meanflow.launch: {name}: the workers were told to save and stop; re-run the same command to resume",
              file=sys.stderr, flush=True)
        return PREEMPTED
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        # a negative status is a worker the launcher itself stopped after another one failed: not the cause
        own = [f.exitcode for _, f in failures if isinstance(f.exitcode, int) and f.exitcode > 0]
        if own and set(own) == {PREEMPTED}:
            return PREEMPTED
        listed = ", ".join(f"rank {rank} exit {f.exitcode}" for rank, f in failures)
        print(f"meanflow.launch: error: worker(s) failed: {listed} (their errors are above)", file=sys.stderr,
              flush=True)
        return own[0] if own and own[0] < 256 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
