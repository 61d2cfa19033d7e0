"""Train MeanFlow: the torchrun entry point.

    torchrun --standalone --nproc_per_node=N -m meanflow.train [--config NAME|FILE] [--section.key=value ...]
    python -m meanflow.train --config smoke                 # one process
    python -m meanflow.train --help                         # every key with its default and meaning, the presets
    python -m meanflow.train --config smoke --print-config  # the resolved config as JSON (a valid --config file)

Parse the config, join the process group, train (meanflow.trainer), exit: 0 when done, 2 with one line naming the
problem for bad input (config, data, run folder, checkpoint) or a diverged run, 75 (PREEMPTED, EX_TEMPFAIL) after
SIGTERM or SIGINT: every rank finishes its step, one checkpoint is written there, and re-running the same command
resumes from it; a second signal exits at once, without a checkpoint (meanflow.trainer.preemption). Under torchrun
give the save time to finish: torchrun forwards the signal, then kills the workers after --shutdown-timeout
(default 30 s).
"""

import logging
import signal
import sys

from meanflow.checkpoint import CheckpointError
from meanflow.config import ConfigError, config_json, help_text, resolve_config
from meanflow.data import DataError
from meanflow.distributed import PeerFailed, init_distributed, shutdown
from meanflow.host_malloc import keep_freed_memory
from meanflow.trainer.loop import Trainer, TrainingDiverged
from meanflow.trainer.preemption import PREEMPTED, Preempted
from meanflow.trainer.run_folder import RunFolderError

FAILURES = (ConfigError, DataError, CheckpointError, RunFolderError, TrainingDiverged, PeerFailed)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    print_config = "--print-config" in argv
    d = None
    try:
        cfg = resolve_config([a for a in argv if a != "--print-config"])
        if print_config:
            print(config_json(cfg), end="")
            return 0
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        d = init_distributed()
        if d.device.type == "cpu":
            keep_freed_memory()  # a CPU step ~12% faster (meanflow.host_malloc)
        if not d.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        Trainer(cfg, d).run()
    except FAILURES as e:
        sys.stderr.write(f"meanflow.train: error: {e}\n")  # one write: the ranks' lines share one stream
        return 2
    except Preempted as e:
        if d.is_main:
            print(f"meanflow.train: {e}", file=sys.stderr, flush=True)
        return PREEMPTED
    except KeyboardInterrupt:  # Ctrl-C before the trainer installs its own handlers
        print("meanflow.train: interrupted before training started", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    finally:
        if d is not None:
            shutdown(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
