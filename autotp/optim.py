"""Optimizer helpers for training a ``ShardedModule``: global gradient clipping and the LR schedule.

Adam(W), SGD and friends are elementwise, so ``torch.optim.AdamW(sharded.parameters())``
on each rank updates its shards exactly as the unsharded optimizer would update
those slices, with no communication. The one step that needs the whole model is
the gradient norm used for clipping: a rank only holds part of the sharded
gradients. ``clip_grad_norm_`` computes the norm of the *unsharded* gradient:

    ||g||^2 = sum_ranks sum_{p sharded} ||g_p,local||^2  +  sum_{p replicated} ||g_p||^2

one all-reduce of the sharded part over the TP group, the replicated part
counted once (every rank holds the same replicated gradients). Padding rows of
an unevenly sharded dim get zero gradients, so they add nothing.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .groups import comm_device
from .placements import Shard

__all__ = ["clip_grad_norm_", "grad_norm", "cosine_lr"]


def _split_params(sharded: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(sharded grads, replicated grads) of a ``ShardedModule``, by the placements in its plan."""
    placements = {name: p.placement for name, p in sharded.plan.parameters.items()}
    split: tuple[list, list] = ([], [])
    for name, param in sharded.module.named_parameters():
        if param.grad is None:
            continue
        if name not in placements:
            raise KeyError(
                f"parameter {name!r} of the sharded module is not in its plan ({len(placements)} entries), so "
                "whether it is sharded is unknown; clip a module returned by autotp.shard, unmodified")
        split[0 if isinstance(placements[name], Shard) else 1].append(param.grad.detach())
    return split


def _norm(grads: list[torch.Tensor], norm_type: float, device) -> torch.Tensor:
    """||grads||^p summed (p = norm_type), or their max |g| for p = inf, as a float32 scalar."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in grads])
    return norms.max() if math.isinf(norm_type) else norms.pow(norm_type).sum()


def grad_norm(sharded: nn.Module, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of the unsharded model's gradient, identical on every rank (see module docstring).

    Args:
        sharded: a ``ShardedModule`` after ``backward()``; a plain module is treated as
            unsharded (world size 1).
        norm_type: 2.0 or ``inf``.

    Returns:
        A float32 scalar tensor on the gradients' device.
    """
    norm_type = float(norm_type)
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type}")
    if not hasattr(sharded, "plan"):  # plain module: nothing to reduce
        grads = [p.grad.detach() for p in sharded.parameters() if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        total = _norm(grads, norm_type, device)
        return total if math.isinf(norm_type) else total.pow(1.0 / norm_type)
    local, replicated = _split_params(sharded)
    # a rank with no gradient still joins the all-reduce, on the device its backend takes
    device = (local + replicated)[0].device if local + replicated else comm_device(sharded.group)
    part = _norm(local, norm_type, device)
    if sharded.world_size > 1:
        dist.all_reduce(part, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM,
                        group=sharded.group)
    whole = _norm(replicated, norm_type, device)
    if math.isinf(norm_type):
        return torch.maximum(part, whole)
    return (part + whole).pow(1.0 / norm_type)


def clip_grad_norm_(sharded: nn.Module, max_norm: float, norm_type: float = 2.0, *,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Scale the gradients of ``sharded`` so that the unsharded gradient's norm is at most ``max_norm``.

    The tensor-parallel ``torch.nn.utils.clip_grad_norm_``: the norm is that of the whole
    model's gradient (one all-reduce over the TP group), so every rank scales by the
    same coefficient and the result equals clipping the unsharded model.

    Args:
        sharded: a ``ShardedModule`` after ``backward()`` (a plain module works too, unsharded).
        max_norm: the largest allowed norm; ``inf`` measures without clipping.
        norm_type: 2.0 or ``inf``.
        error_if_nonfinite: raise when the norm is nan or inf (otherwise the gradients
            are left as they are and the caller skips the step, as loss scalers do).

    Returns:
        The total norm before clipping (float32 scalar tensor, identical on every rank).

    Example::

        >>> loss.backward()
        >>> autotp.optim.clip_grad_norm_(sharded, 1.0)   # == clip_grad_norm_(model.parameters(), 1.0)
        tensor(3.4310)
    """
    total = grad_norm(sharded, norm_type)
    if not torch.isfinite(total):
        if error_if_nonfinite:
            raise RuntimeError(f"the total gradient norm is {total.item()}: a gradient holds nan or inf; lower the "
                               "learning rate, use bf16 instead of fp16, or skip this step")
        return total
    coef = float(max_norm) / (total.item() + 1e-6)
    if coef < 1.0:
        grads: Iterable[torch.Tensor] = [p.grad.detach() for p in sharded.parameters() if p.grad is not None]
        torch._foreach_mul_(list(grads), coef)
    return total


def cosine_lr(step: int, *, max_lr: float, min_lr: float = 0.0, warmup: int = 0, total: int) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``max_lr``, then cosine decay to ``min_lr``.

    Megatron's ``--lr-decay-style cosine``: ``max_lr * (step + 1) / warmup`` for the
    first ``warmup`` steps, then ``min_lr + (max_lr - min_lr) * (1 + cos(pi * t)) / 2``
    with ``t = (step - warmup) / (total - warmup)`` going 0 -> 1, and ``min_lr`` after
    ``total`` steps (the decay length, which may be shorter than training).

    Example::

        >>> [round(cosine_lr(s, max_lr=1.0, min_lr=0.1, warmup=2, total=6), 3) for s in range(8)]
        [0.5, 1.0, 1.0, 0.868, 0.55, 0.232, 0.1, 0.1]
    """
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if not 0 <= warmup <= total:
        raise ValueError(f"need 0 <= warmup <= total, got warmup={warmup}, total={total}")
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    t = (step - warmup) / (total - warmup)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
