"""Process-group setup for torchrun (or a plain single process): backend nccl on CUDA, gloo on CPU."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meanflow.errors import ConfigError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # torchrun sets all three for every process


class PeerFailed(RuntimeError):
    """Another rank (rank 0) failed in work the ranks must leave together; its own error says why."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # a process group exists (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.initialized:
            dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.initialized:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def run_on_main(self, fn, *args):
        """fn(*args) on rank 0 only (writing the run folder, say), with every rank leaving together: when it raises
        there, rank 0 re-raises its error and the other ranks raise PeerFailed at once, instead of waiting in the
        next collective until a timeout."""
        error = None
        if self.is_main:
            try:
                fn(*args)
            except Exception as e:  # told to the other ranks first, then re-raised below
                error = e
        failed = error is not None
        if self.initialized:
            flag = torch.tensor([float(failed)], device=self.device)
            dist.broadcast(flag, src=0)
            failed = bool(flag.item())
        if error is not None:
            raise error
        if failed:
            raise PeerFailed("rank 0 failed (its error is in its output); this rank stops too")

    def broadcast_object(self, obj):
        if not self.initialized:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launch_ranks() -> tuple:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from the environment once WORLD_SIZE is set; a ConfigError naming the variable
    when one is missing or not an integer (a hand-set WORLD_SIZE, say), before any process group is joined."""
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun (it sets RANK, WORLD_SIZE "
                          "and LOCAL_RANK), or unset WORLD_SIZE to run one process")
    values = []
    for name in LAUNCH_VARIABLES:
        try:
            values.append(int(os.environ[name]))
        except ValueError:
            raise ConfigError(f"{name}={os.environ[name]!r} must be an integer (torchrun sets it)") from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need WORLD_SIZE >= 1, "
                          "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return rank, world, local


def init_distributed() -> Dist:
    """Join torchrun's process group when WORLD_SIZE is set; otherwise run as one process."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world, local = launch_ranks()
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(rank, world, local, device, True)


def shutdown(d: Dist):
    if d.initialized and dist.is_initialized():
        dist.destroy_process_group()
