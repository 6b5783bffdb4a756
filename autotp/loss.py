"""Vocab-parallel cross-entropy: the loss from vocab-sharded logits, never gathering them.

For logits ``x`` split over the vocab (rank r holds columns ``[start_r, start_r + V_r)``)::

    m_i     = max_c x_ic                          all-reduce MAX over [N]
    e_ic    = exp(x_ic - m_i)   (local columns)
    Z_i     = sum_c e_ic                          \\
    t_i     = x_{i, y_i} - m_i  (owner rank only)  } one all-reduce SUM over [N, 2]
    (s_i    = sum_c (x_ic - m_i), label smoothing) /  ([N, 3] with smoothing)
    loss_i  = (1 - eps) * (log Z_i - t_i) + eps * (log Z_i - s_i / V)

Megatron-LM issues three all-reduces (max, target logit, sum of exp); the target
logit and the sum of exps are fused here into one, so two suffice.  The
backward needs no communication: ``dL/dx_ic = g_i * (softmax_ic - (1 - eps) *
[c == y_i] - eps / V)`` on the local columns.  Semantics follow
``torch.nn.functional.cross_entropy``: ``ignore_index`` rows contribute 0 and are
left out of the mean; ``reduction`` is ``"none"``, ``"mean"`` or ``"sum"``.
"""
from __future__ import annotations


import torch
from torch import nn

from .kernels import available as kernels_available
from .kernels import enabled as kernels_enabled
from .ops import supports as kernels_support
from .runtime import Communicator
from .traceable import communicator

__all__ = ["vocab_parallel_cross_entropy", "VocabParallelCrossEntropy", "vocab_ce_collectives"]

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def _ce_forward(logits, target, vocab_size: int, ignore_index: int, reduction: str, label_smoothing: float,
                comm) -> tuple[torch.Tensor, tuple, int]:
    """The loss, what backward keeps (softmax, idx, owned, ignored, count) and the valid column count."""
    world, rank = comm.world_size, comm.rank
    n_local = logits.shape[-1]
    start = rank * n_local
    valid = max(0, min(n_local, vocab_size - start))  # columns past the vocab are padding
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if valid < n_local:
        x = x.clone()
        x[:, valid:] = float("-inf")
    m = x.max(dim=-1).values
    if world > 1:
        comm.all_reduce_(m, "max")
    x = x - m[:, None]
    ignored = target == ignore_index
    local_t = target - start
    owned = (local_t >= 0) & (local_t < valid) & ~ignored
    idx = local_t.clamp(0, max(n_local - 1, 0))
    e = x.exp()
    parts = [torch.where(owned, x.gather(1, idx[:, None]).squeeze(1), 0.0), e.sum(-1)]
    if label_smoothing:
        parts.append(x[:, :valid].sum(-1))
    out, z, count = _ce_finish(parts, ignored, vocab_size, reduction, label_smoothing, logits.dtype, comm)
    softmax = e.div_(z[:, None])
    return out, (softmax, idx, owned, ignored, count), valid


def _ce_finish(parts, ignored, vocab_size: int, reduction: str, label_smoothing: float, dtype, comm):
    """From each rank's ``[target logit, sum of exp, (sum of logits)]`` (all against the global max):
    the one all-reduce, the loss reduced as asked, and ``(loss, Z, count of rows not ignored)``."""
    stacked = torch.stack(parts, dim=1)
    if comm.world_size > 1:
        comm.all_reduce_(stacked, "sum")
    t, z = stacked[:, 0], stacked[:, 1]
    log_z = z.log()
    loss = log_z - t
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (log_z - stacked[:, 2] / vocab_size)
    loss = loss.masked_fill(ignored, 0.0)
    count = (~ignored).sum()
    if reduction == "none":
        return loss.to(dtype), z, count
    total = loss.sum()
    return (total / count if reduction == "mean" else total).to(dtype), z, count


def _ce_forward_fused(logits, target, vocab_size: int, ignore_index: int, reduction: str, label_smoothing: float,
                      comm) -> tuple[torch.Tensor, tuple, int]:
    """``_ce_forward`` with the kernels of ``csrc/``: one read of the logits for each rank's max, sum of
    exp (relative to its own max, rescaled once the global max is known) and target logit; what
    backward keeps is the logits themselves (no ``[N, V/P]`` softmax copy) and per-row numbers."""
    world, rank = comm.world_size, comm.rank
    n_local = logits.shape[-1]
    start = rank * n_local
    valid = max(0, min(n_local, vocab_size - start))
    ignored = target == ignore_index
    local_t = target - start
    owned = (local_t >= 0) & (local_t < valid) & ~ignored
    t_local = torch.where(owned, local_t, -1)
    stats = torch.ops.autotp_kernels.ce_stats(logits, t_local, valid, bool(label_smoothing))
    m_local = stats[:, 0]
    m = m_local.clone()
    if world > 1:
        comm.all_reduce_(m, "max")
    # sum_c exp(x_c - m) = exp(m_local - m) * sum_c exp(x_c - m_local); a rank with no valid column adds 0
    parts = [torch.where(owned, stats[:, 2] - m, 0.0), stats[:, 1] * torch.exp(m_local - m)]
    if label_smoothing:
        parts.append(stats[:, 3] - valid * m)
    out, z, count = _ce_finish(parts, ignored, vocab_size, reduction, label_smoothing, logits.dtype, comm)
    return out, (logits, t_local, m, z, ignored, count), valid


def _row_grad(grad, rows: int, reduction: str, count, ignored, dtype) -> torch.Tensor:
    """The loss gradient per row (``[rows]``, 0 on ignored rows)."""
    g = grad.to(dtype)
    if reduction == "mean":
        g = (g / count).expand(rows)
    elif reduction == "sum":
        g = g.expand(rows)
    return g.masked_fill(ignored, 0.0)


def _ce_backward_fused(grad, saved, reduction: str, eps: float, vocab_size: int, valid: int, dtype) -> torch.Tensor:
    """``_ce_backward`` from the kept logits, in one pass (``autotp_kernels::ce_grad``)."""
    logits, t_local, m, z, ignored, count = saved
    g = _row_grad(grad, logits.shape[0], reduction, count, ignored, z.dtype)
    coef = torch.stack([m, g / z, g * (1.0 - eps), g * (eps / vocab_size)], dim=1)
    return torch.ops.autotp_kernels.ce_grad(logits, t_local, valid, coef).to(dtype)


def _ce_backward(grad, saved, reduction: str, eps: float, vocab_size: int, valid: int, dtype) -> torch.Tensor:
    """d loss / d logits on the local columns (no communication); overwrites the saved softmax."""
    softmax, idx, owned, ignored, count = saved
    g = _row_grad(grad, softmax.shape[0], reduction, count, ignored, softmax.dtype)
    dx = softmax
    rows = torch.arange(dx.shape[0], device=dx.device)
    dx[rows[owned], idx[owned]] -= 1.0 - eps
    if eps:
        dx[:, :valid] -= eps / vocab_size
    dx[:, valid:] = 0.0
    dx.mul_(g[:, None])
    return dx.to(dtype)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, ignore_index, reduction, label_smoothing, comm, fused):
        forward = _ce_forward_fused if fused else _ce_forward
        out, saved, valid = forward(logits, target, vocab_size, ignore_index, reduction, label_smoothing, comm)
        ctx.save_for_backward(*saved)
        ctx.args = (reduction, label_smoothing, vocab_size, valid, logits.dtype)
        ctx.fused = fused
        return out

    @staticmethod
    def backward(ctx, grad):
        backward = _ce_backward_fused if ctx.fused else _ce_backward
        return backward(grad, ctx.saved_tensors, *ctx.args), None, None, None, None, None, None, None


# Under torch.compile: the same forward and backward as one custom op (opaque to Dynamo: its
# collectives and its label check run as they do eagerly); what backward keeps is returned.
@torch.library.custom_op("autotp::vocab_parallel_cross_entropy", mutates_args=())
def _ce_op(logits: torch.Tensor, target: torch.Tensor, vocab_size: int, ignore_index: int, reduction: str,
           label_smoothing: float, comm: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor]:
    _check_targets(target, vocab_size, ignore_index)
    out, saved, _ = _ce_forward(logits, target, vocab_size, ignore_index, reduction, label_smoothing,
                                communicator(comm))
    return (out, *saved)


@_ce_op.register_fake
def _(logits, target, vocab_size, ignore_index, reduction, label_smoothing, comm):
    n = logits.shape[0]
    work = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    out = logits.new_empty((n,) if reduction == "none" else ())
    return (out, logits.new_empty(logits.shape, dtype=work), target.new_empty((n,)),
            target.new_empty((n,), dtype=torch.bool), target.new_empty((n,), dtype=torch.bool),
            target.new_empty((), dtype=torch.int64))


def _ce_setup(ctx, inputs, output):
    logits, _, vocab_size, _, reduction, eps, comm = inputs
    ctx.save_for_backward(*output[1:])
    c = communicator(comm)
    valid = max(0, min(logits.shape[-1], vocab_size - c.rank * logits.shape[-1]))
    ctx.args = (reduction, eps, vocab_size, valid, logits.dtype)


def _ce_op_backward(ctx, grad, *_):
    return _ce_backward(grad, ctx.saved_tensors, *ctx.args), None, None, None, None, None, None


_ce_op.register_autograd(_ce_op_backward, setup_context=_ce_setup)


def vocab_ce_collectives(rows: int, label_smoothing: float) -> list[tuple[str, list, str]]:
    """What one forward of the vocab-parallel cross-entropy over ``rows`` rows communicates:
    ``[(reduce op, shape, why), ...]``, all-reduces of float32 (the plan lists these; the
    backward communicates nothing)."""
    stats = "target logit + sum of exp" + (" + sum of logits" if label_smoothing else "")
    return [("max", [rows], "max of the logits"), ("sum", [rows, 3 if label_smoothing else 2], stats)]


def _check_targets(target: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
    if bool(bad.any()):
        vals = target[bad].unique()[:5].tolist()
        raise ValueError(
            f"cross-entropy targets out of the vocab range [0, {vocab_size}): {vals} "
            f"({int(bad.sum())} of {target.numel()}); ignore_index is {ignore_index}. "
            "Check the labels against the tokenizer's vocab_size"
        )


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, *, group=None, comm=None,
                                 vocab_size: int | None = None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0,
                                 fused: bool | None = None) -> torch.Tensor:
    """Cross-entropy of vocab-sharded logits, equal to ``F.cross_entropy`` of the gathered ones.

    Args:
        logits_shard: ``(..., V_local)``: this rank's contiguous block of the vocab
            (rank r holds ``[r * V_local, (r + 1) * V_local)``; columns past ``vocab_size`` are padding).
        target: ``(...)`` class indices, the same on every rank.
        group: the tensor-parallel process group (default: the world).
        comm: a ``runtime.Communicator`` to issue the all-reduces through instead (a sharded
            model passes its own: its timeout applies).
        vocab_size: the real vocab size (default ``V_local * world``).
        ignore_index / reduction / label_smoothing: as ``torch.nn.functional.cross_entropy``.
        fused: use the ``csrc/`` kernels (one read of the logits; the gradient computed from the
            logits, so no softmax copy is kept for backward).  ``None``: where compiled for the
            logits' device and not turned off (``AUTOTP_KERNELS=0``).  Eager only: under
            ``torch.compile`` the composite is traced (Inductor fuses it).

    Returns:
        The loss, replicated on every rank (a scalar, or ``target``'s shape for ``reduction="none"``).

    Example::

        >>> loss = vocab_parallel_cross_entropy(local_logits, labels, group=tp_group)
        >>> loss.backward()   # gradients flow to local_logits only; no communication
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    comm = comm if comm is not None else Communicator(group)
    world = comm.world_size
    n_local = logits_shard.shape[-1]
    vocab_size = vocab_size or n_local * world
    if not (n_local * (world - 1) < vocab_size <= n_local * world):
        raise ValueError(f"vocab_size ({vocab_size}) does not fit {world} shards of {n_local} columns")
    if logits_shard.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits_shard.shape)} and target {tuple(target.shape)} disagree: "
                         "logits must be target's shape plus the vocab dim")
    flat = logits_shard.reshape(-1, n_local)
    if torch.compiler.is_compiling():  # traceable: the op checks the targets when it runs
        loss = _ce_op(flat, target.reshape(-1), vocab_size, ignore_index, reduction, float(label_smoothing),
                      comm.name)[0]
    else:
        _check_targets(target, vocab_size, ignore_index)
        if fused is None:
            fused = kernels_enabled() and kernels_support(flat.device)
        elif fused and not kernels_support(flat.device):
            raise ValueError(f"fused=True, but autotp's kernels are not compiled for {flat.device} "
                             f"(autotp.kernels.available(): {kernels_available()}); pass fused=None or False")
        loss = _VocabParallelCE.apply(flat, target.reshape(-1), vocab_size, ignore_index, reduction,
                                      float(label_smoothing), comm, bool(fused))
    return loss.view(target.shape) if reduction == "none" else loss


class VocabParallelCrossEntropy(nn.Module):
    """``aten.cross_entropy_loss`` on vocab-sharded logits, as a graph node (see the module docstring)."""

    def __init__(self, vocab_size: int, reduction: int | str = 1, ignore_index: int = -100,
                 label_smoothing: float = 0.0, *, comm, fused: bool = False):
        super().__init__()
        self.vocab_size = vocab_size
        self.reduction = _REDUCTIONS.get(reduction, reduction)
        self.ignore_index, self.label_smoothing, self.comm = ignore_index, label_smoothing, comm
        self.fused = fused  # the csrc/ kernels (lowering decides: ShardConfig.kernels and what was compiled)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, target, comm=self.comm, vocab_size=self.vocab_size,
                                            ignore_index=self.ignore_index, reduction=self.reduction,
                                            label_smoothing=self.label_smoothing,
                                            fused=None if self.fused else False)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, reduction={self.reduction}, ignore_index={self.ignore_index}"
                + (", fused" if self.fused else ""))
