"""Sequence parallelism's collectives (issue 15, first part): reduce-scatter and the gather into a region.

Megatron-LM's sequence parallelism (Korthikanti et al., 2022) shards the regions *between* the
column -> row blocks along the sequence.  In autotp's terms two placement changes replace the
all-reduce after a row-parallel linear and the identity before a column-parallel one::

    reduce_scatter     P -> S(seq)                         forward reduce-scatter, backward all-gather
    gather_to_region   S(seq) -> R (into sharded compute)  forward all-gather, backward reduce-scatter

The same bytes cross the wire as one all-reduce (a reduce-scatter plus an all-gather), and
between them each rank holds 1/world of the activations.  The math equals the chains the
table already has -- ``all_reduce`` then ``slice`` for ``P -> S``, ``all_gather`` then ``copy``
for ``S -> R`` into sharded compute -- each fused into one collective each way.

Uneven lengths are padded like uneven widths: a rank holds ``ceil(size / world)`` rows, the
last one's tail zeros (reduce-scatter pads its input; the gather trims).  Both exist as
autograd functions (eager) and as ``torch.library`` ops with their backward registered
(``torch.compile`` traces them, ``autotp.traceable``'s way); importing this module adds the
two kinds to ``runtime.REDISTRIBUTIONS``.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .placements import pad_zeros
from .runtime import REDISTRIBUTIONS, Communicator, RedistributionKind, _Collective
from .traceable import communicator, slice_op
from .traceable import gather as _gather
from .traceable import _gathered_shape

__all__ = ["reduce_scatter", "ReduceScatter", "GatherToRegion", "reduce_scatter_op", "gather_to_region_op"]


def reduce_scatter(x: torch.Tensor, dim: int, comm: Communicator) -> torch.Tensor:
    """Sum ``x`` over the ranks and keep this rank's ``Shard(dim)`` rows (``ceil(size / world)`` of
    them, zero-padded at the end): one c10d ``reduce_scatter_tensor``."""
    dim = dim % x.dim()
    world, size = comm.world_size, x.shape[dim]
    n = math.ceil(size / world)
    if world * n != size:
        x = pad_zeros(x, dim, world * n - size)
    whole = x.movedim(dim, 0).contiguous()  # the ranks' parts: consecutive blocks of rows
    out = whole.new_empty((n, *whole.shape[1:]))
    comm.wait(dist.reduce_scatter_tensor(out, whole, group=comm.group, async_op=True), "reduce_scatter", whole)
    return out.movedim(0, dim)


# ---- eager: autograd functions -----------------------------------------------------------------

class _ReduceScatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, comm):
        ctx.args = (dim, x.shape[dim], comm)
        return reduce_scatter(x, dim, comm)

    @staticmethod
    def backward(ctx, grad):
        dim, size, comm = ctx.args
        return _gather(grad, dim, 1, size, comm), None, None


class _GatherToRegionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, global_size, comm):
        ctx.args = (dim, comm)
        return _gather(x, dim, 1, global_size, comm)

    @staticmethod
    def backward(ctx, grad):
        dim, comm = ctx.args
        return reduce_scatter(grad, dim, comm), None, None, None


# ---- traced: torch.library ops with their backward -------------------------------------------

@torch.library.custom_op("autotp::reduce_scatter", mutates_args=())
def reduce_scatter_op(x: torch.Tensor, dim: int, comm: str) -> torch.Tensor:
    return reduce_scatter(x, dim, communicator(comm)).contiguous()


@reduce_scatter_op.register_fake
def _(x, dim, comm):
    world = communicator(comm).world_size
    return x.new_empty(_gathered_shape(x, dim % x.dim(), -(-x.shape[dim] // world)))


def _save_rs(ctx, inputs, output):
    x, ctx.dim, ctx.comm = inputs
    ctx.size = x.shape[ctx.dim]


def _rs_backward(ctx, grad):
    return gather_to_region_op(grad, ctx.dim, ctx.size, ctx.comm, False), None, None


@torch.library.custom_op("autotp::gather_to_region", mutates_args=())
def gather_to_region_op(x: torch.Tensor, dim: int, global_size: int, comm: str, reduce_grad: bool) -> torch.Tensor:
    """All-gather of sequence shards; its backward reduce-scatters (``reduce_grad``, into sharded
    compute) or slices (the backward of a reduce-scatter: the gradient is already whole)."""
    return _gather(x, dim, 1, global_size, communicator(comm)).contiguous()


@gather_to_region_op.register_fake
def _(x, dim, global_size, comm, reduce_grad):
    return x.new_empty(_gathered_shape(x, dim % x.dim(), global_size))


def _save_gather(ctx, inputs, output):
    _, ctx.dim, _, ctx.comm, ctx.reduce_grad = inputs


def _gather_backward(ctx, grad):
    if ctx.reduce_grad:
        return reduce_scatter_op(grad, ctx.dim, ctx.comm), None, None, None, None
    return slice_op(grad, ctx.dim, 1, ctx.comm), None, None, None, None


reduce_scatter_op.register_autograd(_rs_backward, setup_context=_save_rs)
gather_to_region_op.register_autograd(_gather_backward, setup_context=_save_gather)


# ---- the modules lowering inserts ---------------------------------------------------------------

class ReduceScatter(_Collective):
    """forward: reduce-scatter of a partial sum to ``Shard(dim)``; backward: all-gather."""

    def __init__(self, dim: int, comm: Communicator):
        super().__init__(comm)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return reduce_scatter_op(x, self.dim, self.comm.name)
        if torch.is_grad_enabled() and x.requires_grad:
            return _ReduceScatterFn.apply(x, self.dim, self.comm)
        return reduce_scatter(x, self.dim, self.comm)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class GatherToRegion(_Collective):
    """forward: all-gather of ``Shard(dim)`` pieces (padding trimmed) into sharded compute;
    backward: reduce-scatter of the gradient (each rank's part of it is a partial sum)."""

    def __init__(self, dim: int, global_size: int, comm: Communicator):
        super().__init__(comm)
        self.dim, self.global_size = dim, global_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return gather_to_region_op(x, self.dim, self.global_size, self.comm.name, True)
        if torch.is_grad_enabled() and x.requires_grad:
            return _GatherToRegionFn.apply(x, self.dim, self.global_size, self.comm)
        return _gather(x, self.dim, 1, self.global_size, self.comm)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, global_size={self.global_size}"


REDISTRIBUTIONS.update({k.name: k for k in (
    RedistributionKind("reduce_scatter", "P -> S (sequence)", "reduce_scatter", "all_gather",
                       lambda frm, to, size, comm: ReduceScatter(to.dim, comm)),
    RedistributionKind("gather_to_region", "S (sequence) -> R (into sharded compute)", "all_gather", "reduce_scatter",
                       lambda frm, to, size, comm: GatherToRegion(frm.dim, size, comm)),
)})
