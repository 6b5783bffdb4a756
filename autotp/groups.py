"""The ranks a model is sharded over: joining the process group, and checking that the ranks agree on inputs."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

__all__ = ["init_process_group_from_env", "resolve_group", "check_same_inputs", "check_inputs_once", "max_and_min",
           "comm_device"]


def init_process_group_from_env(world_size: int | None) -> None:
    """Initialize the default group from torchrun's environment if none exists.

    Raises a clear error when ``world_size`` disagrees with the launcher.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if world_size in (None, 1):
            return
        raise RuntimeError(
            f"autotp.shard(world_size={world_size}) needs torch.distributed: launch with "
            f"`torchrun --nproc_per_node {world_size} script.py`, call "
            "torch.distributed.init_process_group() first, or use autotp.parallelize() from one process"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # for another, init_process_group yourself
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)


def resolve_group(world_size: int | None, group=None):
    """Return ``(group, world_size, rank)``, checking ``world_size`` against the group."""
    if world_size is not None and world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    init_process_group_from_env(world_size)
    if not dist.is_initialized():
        return group, 1, 0
    actual = dist.get_world_size(group)
    if world_size is not None and world_size != actual:
        raise ValueError(
            f"world_size ({world_size}) disagrees with the process group, which has {actual} ranks; "
            f"launch with --nproc_per_node {world_size} or pass world_size={actual}"
        )
    return group, actual, dist.get_rank(group)


def comm_device(group=None) -> torch.device:
    """The device a collective's tensors must be on for ``group``: this rank's current GPU on
    NCCL, the CPU otherwise (gloo also takes CUDA tensors, but CPU ones always)."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_and_min(t: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise max and min of ``t`` over the ranks (two all-reduces): ranks agree
    where they are equal.  On NCCL ranks the reduction runs on the rank's own GPU."""
    t = t.to(comm_device(group))
    hi, lo = t.clone(), t.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    return hi, lo


_SLOTS = 64  # input tensors fingerprinted one by one; more share the last slot


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """An int64 checksum of ``x``'s bytes weighted by position (odd weights, wrapping arithmetic):
    any changed byte, and any reordering of unequal elements, changes it."""
    b = x.detach().contiguous().reshape(-1).view(torch.uint8).to(torch.int64)
    w = torch.arange(b.numel(), dtype=torch.int64, device=b.device) * 0x5851F42D4C957F2D | 1
    return (b * w).sum()


def check_same_inputs(args, kwargs, group) -> None:
    """Raise if ranks were given different inputs: one MAX and one MIN all-reduce of a fixed-size
    fingerprint (count, then per tensor its shape's size and a position-weighted checksum of its
    bytes), so a permutation of rows or a single changed byte is caught, and the error names
    the argument."""
    leaves = [(("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:]), x)
              for path, x in pytree.tree_flatten_with_path((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    fp = torch.zeros(2 + 2 * _SLOTS, dtype=torch.int64)
    fp[0] = len(leaves)
    for i, (_, x) in enumerate(leaves):
        slot = 2 + 2 * min(i, _SLOTS - 1)
        fp[slot] += x.numel() * 1_000_003 + x.dim()
        fp[slot + 1] += _fingerprint(x).cpu()
    hi, lo = max_and_min(fp, group)
    if torch.equal(hi, lo):
        return
    if hi[0] != lo[0]:
        raise ValueError(f"ranks were given different numbers of tensor inputs ({int(lo[0])} to {int(hi[0])}); every "
                         "rank must call the sharded module with the same arguments")
    bad = [name for i, (name, _) in enumerate(leaves)
           if not torch.equal(hi[2 + 2 * min(i, _SLOTS - 1):][:2], lo[2 + 2 * min(i, _SLOTS - 1):][:2])]
    raise ValueError(
        f"ranks were given different inputs: {', '.join(bad)} differ between ranks (values, order or shape). Every "
        "rank must see the same inputs: seed before making random inputs (torch.manual_seed), shard the data "
        "loader by data-parallel rank only, or broadcast the batch from one rank"
    )


@torch.library.custom_op("autotp::check_inputs_once", mutates_args=("done",))
def check_inputs_once(done: torch.Tensor, inputs: list[torch.Tensor], comm: str) -> None:
    """``check_same_inputs`` on the first call (``done`` is 0), under ``torch.compile``: an op with a
    side effect (it sets ``done``), so the compiled graph keeps it; later calls only read the flag.
    The inputs are named by position (``args[i]``: the tensor inputs, in order)."""
    if int(done):
        return
    from .traceable import communicator

    check_same_inputs(tuple(inputs), {}, communicator(comm).group)
    done.fill_(1)


@check_inputs_once.register_fake
def _(done, inputs, comm):
    return None
