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

A third, ``sequence_slice`` (R -> S(seq): this rank's rows, no communication; backward
all-gather), takes a replicated value into the region (a position embedding).

Uneven lengths are padded: a rank holds ``ceil(size / world)`` rows.  Into the region the
padding *copies the last row* (the reduce-scatter's and the slice's forward), so every op there
computes on a padded row what it computes on a real one -- finite wherever the real rows are
(an RMSNorm's ``rsqrt`` of a zero row would not be).  Gradients are padded with zeros (the
reduce-scatter in a gather's backward): a padded row adds nothing to a norm weight's gradient,
and every gather trims the padding.  Each kind exists as an autograd function (eager) and as a
``torch.library`` op with its backward registered (``torch.compile`` traces them,
``autotp.traceable``'s way); importing this module adds the kinds to ``runtime.REDISTRIBUTIONS``.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
from torch.utils.weak import WeakTensorKeyDictionary

from .placements import pad_zeros
from .runtime import REDISTRIBUTIONS, Communicator, RedistributionKind, _Collective
from .traceable import communicator, slice_op
from .traceable import gather as _gather
from .traceable import _gathered_shape

__all__ = ["reduce_scatter", "sequence_slice", "ReduceScatter", "SequenceSlice", "GatherToRegion", "regather_in_backward",
           "reduce_scatter_op",
           "sequence_slice_op", "gather_to_region_op"]


# (torch 2.13 renames reduce_scatter_tensor; the same c10d op)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def pad_rows(x: torch.Tensor, dim: int, pad: int, edge: bool) -> torch.Tensor:
    """``x`` with ``pad`` rows appended along ``dim``: copies of its last row (``edge``) or zeros."""
    if not pad or not edge:
        return pad_zeros(x, dim, pad)
    last = x.narrow(dim, x.shape[dim] - 1, 1)
    return torch.cat([x, last.expand(*[pad if d == dim else -1 for d in range(x.dim())])], dim=dim)


def reduce_scatter(x: torch.Tensor, dim: int, comm: Communicator, edge: bool = False) -> torch.Tensor:
    """Sum ``x`` over the ranks and keep this rank's ``Shard(dim)`` rows (``ceil(size / world)`` of
    them, padded at the end with copies of the last row (``edge``) or zeros): through shared memory
    where the same-host transport carries it, else one c10d ``reduce_scatter_tensor``."""
    dim = dim % x.dim()
    world, size = comm.world_size, x.shape[dim]
    n = math.ceil(size / world)
    x = pad_rows(x, dim, world * n - size, edge)
    if comm.same_host is not None and (out := comm.same_host.reduce_scatter(x, dim)) is not None:
        return out
    whole = x.movedim(dim, 0).contiguous()  # the ranks' parts: consecutive blocks of rows
    out = whole.new_empty((n, *whole.shape[1:]))
    comm.wait(_reduce_scatter(out, whole, group=comm.group, async_op=True), "reduce_scatter", whole)
    return out.movedim(0, dim).contiguous()  # (the graph's views after it need the usual strides)


# ---- eager: autograd functions -----------------------------------------------------------------

def sequence_slice(x: torch.Tensor, dim: int, comm: Communicator) -> torch.Tensor:
    """This rank's ``Shard(dim)`` rows of a replicated ``x``, padded with copies of the last row."""
    dim = dim % x.dim()
    world, size = comm.world_size, x.shape[dim]
    n = math.ceil(size / world)
    return pad_rows(x, dim, world * n - size, True).narrow(dim, comm.rank * n, n).contiguous()


class _ReduceScatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, comm):
        ctx.args = (dim, x.shape[dim], comm)
        return reduce_scatter(x, dim, comm, edge=True)

    @staticmethod
    def backward(ctx, grad):
        dim, size, comm = ctx.args
        return _gather(grad, dim, 1, size, comm), None, None


class _GatherToRegionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, global_size, comm):
        ctx.args = (dim, comm)
        return _gather(x, dim, 1, global_size, comm).contiguous()

    @staticmethod
    def backward(ctx, grad):
        dim, comm = ctx.args
        return reduce_scatter(grad, dim, comm), None, None, None


class _SequenceSliceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, comm):
        ctx.args = (dim, x.shape[dim], comm)
        return sequence_slice(x, dim, comm)

    @staticmethod
    def backward(ctx, grad):
        dim, size, comm = ctx.args
        return _gather(grad, dim, 1, size, comm), None, None


# ---- traced: torch.library ops with their backward -------------------------------------------

@torch.library.custom_op("autotp::reduce_scatter", mutates_args=())
def reduce_scatter_op(x: torch.Tensor, dim: int, comm: str, edge: bool) -> torch.Tensor:
    return reduce_scatter(x, dim, communicator(comm), edge)


@reduce_scatter_op.register_fake
def _(x, dim, comm, edge):
    world = communicator(comm).world_size
    return x.new_empty(_gathered_shape(x, dim % x.dim(), -(-x.shape[dim] // world)))


def _save_rs(ctx, inputs, output):
    x, ctx.dim, ctx.comm, _ = inputs
    ctx.size = x.shape[ctx.dim]


def _rs_backward(ctx, grad):
    return gather_to_region_op(grad, ctx.dim, ctx.size, ctx.comm, False), None, None, None


@torch.library.custom_op("autotp::sequence_slice", mutates_args=())
def sequence_slice_op(x: torch.Tensor, dim: int, comm: str) -> torch.Tensor:
    return sequence_slice(x, dim, communicator(comm))


@sequence_slice_op.register_fake
def _(x, dim, comm):
    world = communicator(comm).world_size
    return x.new_empty(_gathered_shape(x, dim % x.dim(), -(-x.shape[dim] // world)))


def _save_sequence_slice(ctx, inputs, output):
    x, ctx.dim, ctx.comm = inputs
    ctx.size = x.shape[ctx.dim]


def _sequence_slice_backward(ctx, grad):
    return gather_to_region_op(grad, ctx.dim, ctx.size, ctx.comm, False), None, None


sequence_slice_op.register_autograd(_sequence_slice_backward, setup_context=_save_sequence_slice)


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
        return reduce_scatter_op(grad, ctx.dim, ctx.comm, False), None, None, None, None
    return slice_op(grad, ctx.dim, 1, ctx.comm), None, None, None, None


reduce_scatter_op.register_autograd(_rs_backward, setup_context=_save_rs)
gather_to_region_op.register_autograd(_gather_backward, setup_context=_save_gather)


# ---- the modules lowering inserts ---------------------------------------------------------------

class _SequenceRows(_Collective):
    """A module that takes a value onto this rank's sequence rows along ``dim``: eager (the autograd
    function when a gradient is needed) or traced (the ``torch.library`` op)."""

    def __init__(self, dim: int, comm: Communicator):
        super().__init__(comm)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return self._traced(x, self.dim, self.comm.name)
        if torch.is_grad_enabled() and x.requires_grad:
            return self._autograd.apply(x, self.dim, self.comm)
        return self._eager(x, self.dim, self.comm)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class ReduceScatter(_SequenceRows):
    """forward: reduce-scatter of a partial sum to ``Shard(dim)``; backward: all-gather."""

    _traced = staticmethod(lambda x, dim, comm: reduce_scatter_op(x, dim, comm, True))
    _autograd = _ReduceScatterFn
    _eager = staticmethod(lambda x, dim, comm: reduce_scatter(x, dim, comm, edge=True))


class SequenceSlice(_SequenceRows):
    """forward: this rank's sequence rows of a replicated value (last row copied into the padding;
    no communication); backward: all-gather of the gradient."""

    _traced = staticmethod(lambda x, dim, comm: sequence_slice_op(x, dim, comm))
    _autograd = _SequenceSliceFn
    _eager = staticmethod(sequence_slice)


# ---- the gathered input is not kept for backward: each rank keeps its shard and gathers again ------

# a gather's output -> (a key of its own, the shard it was gathered from, dim, size, comm).  The key is a
# counter, never ``id()``: a freed output's id is reused by a later one, and ranks would then disagree on
# which unpack gathers -- a hang, or another layer's activations
_GATHERED = WeakTensorKeyDictionary()
_KEYS = itertools.count()


class _Regather:
    """What autograd keeps of a gathered tensor (or a view of one): the shard, gathered again when unpacked."""

    def __init__(self, base, view):
        self.key, self.shard, self.dim, self.size, self.comm = _GATHERED[base]
        self.geometry = (view.size(), view.stride(), view.storage_offset())


class regather_in_backward(torch.autograd.graph.saved_tensors_hooks):
    """Within it, what a ``GatherToRegion``'s output (or a view of it) is saved for backward as -- a column-parallel
    linear's input, for its weight gradient -- is only this rank's shard, all-gathered again when backward needs it
    (Megatron-LM's sequence parallelism does the same): 1/world of those activations held between forward and
    backward, for one more all-gather each in backward.  Linears reading one gather share one re-gather (q, k, v).
    Autograd unpacks in the same order on every rank, so the ranks issue the re-gathers alike."""

    def __init__(self):
        self.cache: dict[int, list] = {}  # base key -> [gathered tensor, unpacks left]
        self.packs: dict[int, int] = {}
        super().__init__(self._pack, self._unpack)

    def _pack(self, t):
        base = t if t in _GATHERED else t._base if t._base is not None and t._base in _GATHERED else None
        if base is None:
            return t
        r = _Regather(base, t)
        self.packs[r.key] = self.packs.get(r.key, 0) + 1
        return r

    def _unpack(self, r):
        if not isinstance(r, _Regather):
            return r
        entry = self.cache.get(r.key)
        if entry is None:
            entry = self.cache[r.key] = [_gather(r.shard, r.dim, 1, r.size, r.comm).contiguous(),
                                         self.packs.pop(r.key, 1)]
        full = entry[0]
        entry[1] -= 1
        if entry[1] <= 0:
            del self.cache[r.key]
        return full.as_strided(*r.geometry)


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
            out = _GatherToRegionFn.apply(x, self.dim, self.global_size, self.comm)
            _GATHERED[out] = (next(_KEYS), x.detach(), self.dim, self.global_size, self.comm)  # (regather_in_backward)
            return out
        return _gather(x, self.dim, 1, self.global_size, self.comm).contiguous()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, global_size={self.global_size}"


REDISTRIBUTIONS.update({k.name: k for k in (
    RedistributionKind("reduce_scatter", "P -> S (sequence)", "reduce_scatter", "all_gather",
                       lambda frm, to, size, comm: ReduceScatter(to.dim, comm)),
    RedistributionKind("sequence_slice", "R -> S (sequence)", None, "all_gather",
                       lambda frm, to, size, comm: SequenceSlice(to.dim, comm)),
    RedistributionKind("gather_to_region", "S (sequence) -> R (into sharded compute)", "all_gather", "reduce_scatter",
                       lambda frm, to, size, comm: GatherToRegion(frm.dim, size, comm)),
)})
