"""Data parallelism on PyTorch's own engine: which process am I, and what do we share.

`torchrun --nproc_per_node N -m gpt2_course.train ...` starts N copies of the trainer and
tells each its place through the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). Each copy holds the whole model; every step, each takes its own part of
the global batch, and `DistributedDataParallel` averages the gradients across the copies
during backward (NCCL between GPUs, gloo between CPU processes), so that every copy makes
the same update. The result is the run one process would make with the whole batch, up
to the order in which floats are added.

    rank = start("cuda")     # joins the group when torchrun started us; rank 0 of 1 otherwise
    ...
    stop()
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from jaxtyping import Int
from torch import Tensor

# Evaluation and checkpoints happen on rank 0 alone while the others wait at the next
# collective: give them time (HellaSwag on a big model takes minutes).
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Rank:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # its index on this machine (which GPU it drives)

    @property
    def main(self) -> bool:
        """Rank 0 alone writes checkpoints and logs and shows the progress bar."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def from_environment() -> Rank:
    """The place torchrun gave this process (rank 0 of 1 when it was started otherwise)."""
    try:
        return Rank(
            rank=int(os.environ.get("RANK", 0)),
            world=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as error:
        raise RuntimeError(f"RANK, WORLD_SIZE or LOCAL_RANK is not a number ({error})") from None


def current() -> Rank:
    """This process's place: from the process group when one is running, else rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size(), from_environment().local_rank)
    return Rank()


def start(device: str | None = None) -> Rank:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a no-op alone.

    On CUDA each process drives the GPU of its LOCAL_RANK.
    """
    place = from_environment()
    if not place.parallel or dist.is_initialized():
        return current()
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        gpus = torch.cuda.device_count()
        if place.local_rank >= gpus:
            raise RuntimeError(
                f"process {place.local_rank} of this machine needs GPU {place.local_rank}, and "
                f"there are {gpus}: start at most {gpus} processes per machine (or train on "
                "the CPU with --device cpu)"
            )
        torch.cuda.set_device(place.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    return current()


def stop() -> None:
    """Leave the process group (when there is one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(place: Rank, name: str | None) -> str | None:
    """A CUDA device name gets this process's GPU: "cuda" -> "cuda:LOCAL_RANK"."""
    if place.parallel and name in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{place.local_rank}"
    return name


def my_part(indices: Int[Tensor, "batch"], place: Rank) -> Int[Tensor, "part"]:
    """This rank's contiguous share of the global batch (the batch divides evenly)."""
    if len(indices) % place.world:
        raise ValueError(f"a batch of {len(indices)} does not split over {place.world} processes")
    share = len(indices) // place.world
    return indices[place.rank * share : (place.rank + 1) * share]


def sum_everywhere(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """The sums of `values` over all processes (the values themselves when alone)."""
    if not current().parallel:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()


def barrier() -> None:
    if current().parallel:
        dist.barrier()
