"""Preemption: SIGTERM or SIGINT stops the run at a step every rank agrees on, with a checkpoint there.

    with StopWatch() as stop:          # installs the handlers; the previous ones come back on exit
        ...
        if stop.agreed(dist):          # after each step; a collective (all-reduce MAX) when there is a process group
            save, then raise Preempted(step, path)

The first signal only sets a flag: the rank finishes its step, the ranks all-reduce the flag (so a signal that
reached one rank one step later than another still stops them all at the same step), one checkpoint is written, and
meanflow.train exits with PREEMPTED (75, EX_TEMPFAIL: "try again"; re-running the same command resumes).

A second signal exits at once, without a checkpoint, by the signal's own default action (status 128 + signal
number in a shell). Copies of the first signal that arrive within REPEAT_WINDOW_S of it count as the first: a
terminal's Ctrl-C or a scheduler's SIGTERM reaches every process of the job, and torchrun forwards the one it gets to
each worker as well, so a worker under torchrun sees the same request twice within milliseconds.
"""

import os
import signal
import threading
import time

import torch

PREEMPTED = 75  # the exit status of a preempted run: a checkpoint is written, re-run the same command to resume
SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0  # a second signal sooner than this after the first is the same request delivered twice


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint at `step`."""

    def __init__(self, step, checkpoint, signame, save_s=None):
        took = f" in {save_s:.2f} s" if save_s is not None else ""
        super().__init__(f"preempted by {signame} at step {step}: checkpoint written to {checkpoint}{took}; re-run "
                         "the same command to resume")
        self.step, self.checkpoint, self.signame, self.save_s = step, checkpoint, signame, save_s


class StopWatch:
    """Catches SIGTERM and SIGINT while open (from the main thread only; elsewhere it never fires)."""

    def __init__(self, window_s=REPEAT_WINDOW_S, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self.signum = self.first_at = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def handle(self, signum, frame=None):
        now = self.clock()
        if self.signum is None:
            self.signum, self.first_at = signum, now
            return
        if now - self.first_at < self.window_s:
            return
        # the second request: no checkpoint, no cleanup; die by the signal as if no handler were installed
        os.write(2, f"meanflow.train: {signal.Signals(signum).name} again: exiting now, without a checkpoint\n"
                 .encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    @property
    def requested(self) -> bool:
        """A signal reached this process."""
        return self.signum is not None

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"

    def agreed(self, dist) -> bool:
        """Whether any rank got a signal: the same answer on every rank (a collective when there is a process group;
        call it at the same point on every rank)."""
        if not dist.initialized:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
