"""Autograd-aware collectives, the communicator they share, and the redistribution table.

Every collective here is one named forward/backward pair (Megatron's mappings):

=================  =========================  ===============================
module             forward                    backward
=================  =========================  ===============================
``AllReduce``      all-reduce (P -> R)        identity
``CopyToRegion``   identity                   all-reduce of the gradient
``AllGather``      all-gather (S -> R)        take the local slice
``LocalSlice``     take the local slice       all-gather of the gradient
``OneRankShare``   rank 0 keeps, others 0     identity (R -> P, no collective)
=================  =========================  ===============================

Each takes an explicit ``Communicator`` (the process group, and the same-host
transport where one is enabled) and is a no-op at world size 1.  Under
``torch.compile`` each calls its ``torch.library`` twin instead (``traceable.py``:
the same pair as an op Dynamo can trace), so a compiled model has no graph break.  They are
``nn.Module``s so that a lowered fx graph can call them (``call_module``) and
carry their communicator and layout with it.  ``REDISTRIBUTIONS`` is the one
table that maps a placement change to its collectives and its module: the
analysis names kinds from it, the plan reads their collectives from it, and
lowering builds its modules from it.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .ops import masked_embedding, masked_embedding_composite
from .placements import Partial, Placement, Replicate, Shard
from .traceable import all_gather as all_gather_op  # the torch.library twins of the modules below
from .traceable import all_reduce as all_reduce_op
from .traceable import copy_to_region as copy_to_region_op
from .traceable import dropout_keep, sdpa_math
from .traceable import gather as _gather
from .traceable import local_slice as _local_slice
from .traceable import register as _register
from .traceable import seeded as _seeded
from .traceable import slice_op

__all__ = [
    "Communicator", "CollectiveError", "AllReduce", "CopyToRegion", "AllGather", "LocalSlice", "OneRankShare", "VocabParallelEmbedding", "TPDropout",
    "TPAttention", "ColumnLinear", "RedistributionKind", "REDISTRIBUTIONS", "redistribution_chain",
]


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


class CollectiveError(RuntimeError):
    """A collective did not complete: a rank died, stalled past the timeout, or took another path."""


class Communicator:
    """The collectives one sharded model issues: its process group, and optionally a same-host
    transport (``autotp.samehost.SameHostComm``) for the forward all-reduces and all-gathers.

    Passed explicitly to every collective module lowering creates; nothing is looked up
    in module-global state.  ``timeout_s`` bounds each wait of a c10d collective on CPU
    (gloo) ranks; ``None`` leaves it to the process group's own timeout (NCCL ranks always
    do: the NCCL watchdog owns timeouts there).  A collective that fails or times out raises
    ``CollectiveError`` naming it.
    """

    def __init__(self, group=None, same_host=None, *, timeout_s: float | None = None):
        self.group = group
        self.same_host = same_host
        self.timeout_s = timeout_s
        # fixed for the group's life; plain attributes, so torch.compile reads them as constants
        self.world_size, self.rank = _world(group), _rank(group)
        # how the torch.library ops (traceable.py, under torch.compile) find it; held weakly there
        self.name = _register(self)
        self.issued = 0  # c10d collectives issued (their number in errors)
        self._wait_timeout = None  # decided on the first wait: the backend is known by then
        self._backend_name = None  # read on the first all_gather_into

    def wait(self, work, op: str, x: torch.Tensor) -> None:
        """Wait for an async c10d ``work`` (``op`` on ``x``); a failure or a timeout becomes a
        ``CollectiveError`` naming it.  Nothing is formatted unless it fails."""
        self.issued += 1
        if self._wait_timeout is None:
            gloo = self.timeout_s is not None and dist.get_backend(self.group) == "gloo"
            self._wait_timeout = (datetime.timedelta(seconds=self.timeout_s),) if gloo else ()
        try:
            work.wait(*self._wait_timeout)
        except RuntimeError as e:
            timed = "timed out" in str(e).lower() and self._wait_timeout
            late = f"within {self.timeout_s:g} s " if timed else ""
            raise CollectiveError(
                f"autotp {op} of {tuple(x.shape)} {x.dtype} (collective #{self.issued} of this model on rank "
                f"{self.rank} of {self.world_size}) "
                f"did not complete {late}({str(e).splitlines()[0][:200]}): a rank died, stalled, or took another "
                "code path; check the other ranks' logs") from e

    def all_reduce_(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place reduction (``"sum"`` or ``"max"``) over the group."""
        if self.same_host is not None and op == "sum":
            return self.same_host.all_reduce_(x)
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        self.wait(dist.all_reduce(x, op=reduce_op, group=self.group, async_op=True), f"all_reduce ({op})", x)
        return x

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_(x.contiguous().clone())

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x``, in rank order."""
        if self.same_host is not None:
            return self.same_host.all_gather(x)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.wait(dist.all_gather(parts, x.contiguous(), group=self.group, async_op=True), "all_gather", x)
        return parts

    def all_gather_into(self, x: torch.Tensor, outs: list[torch.Tensor]) -> None:
        """Every rank's ``x`` written into ``outs[r]`` (each of ``x``'s shape), in rank order: no list of
        parts, no ``cat``.  On gloo CPU ranks ``outs`` may be strided views of one output tensor: gloo's
        all-gather copies each rank's part straight into them.  With the same-host transport a
        message that fits a slot goes through shared memory; elsewhere (NCCL, gloo with CUDA
        tensors) the parts are gathered into their own tensors and copied into ``outs``."""
        x = x.contiguous()
        small = self.same_host is not None and self.same_host.fits(x)
        if not small and x.device.type == "cpu" and self._backend() == "gloo":
            self.wait(dist.all_gather(outs, x, group=self.group, async_op=True), "all_gather", x)
            return
        for out, part in zip(outs, self.all_gather(x)):
            out.copy_(part)

    def _backend(self) -> str:
        if self._backend_name is None:  # fixed for the group's life
            self._backend_name = dist.get_backend(self.group)
        return self._backend_name

    def __repr__(self) -> str:
        return f"Communicator(world_size={self.world_size}, same_host={self.same_host is not None})"


class _AllReduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad), None


class _GatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, chunks, global_size, comm):
        ctx.args = (dim, chunks, comm)
        return _gather(x, dim, chunks, global_size, comm)

    @staticmethod
    def backward(ctx, grad):
        dim, chunks, comm = ctx.args
        return _local_slice(grad, dim, chunks, comm.rank, comm.world_size), None, None, None, None


class _SliceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, chunks, comm):
        ctx.args = (dim, chunks, x.shape[dim], comm)
        return _local_slice(x, dim, chunks, comm.rank, comm.world_size).contiguous()

    @staticmethod
    def backward(ctx, grad):
        dim, chunks, size, comm = ctx.args
        return _gather(grad, dim, chunks, size, comm), None, None, None


class _ColumnLinearFn(torch.autograd.Function):
    """y = x·Wᵀ + b (``out_in``) or b + x·W; backward overlaps the all-reduce of dx with dW, db."""

    @staticmethod
    def forward(ctx, x, w, b, out_in, comm):
        ctx.save_for_backward(x, w)
        ctx.args = (out_in, comm, b is not None)
        if out_in:
            return torch.nn.functional.linear(x, w, b)
        y = x.matmul(w)
        return y + b if b is not None else y

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        out_in, comm, has_bias = ctx.args
        # under autocast the forward ran in a lower precision: do the backward matmuls in g's dtype
        # and hand each gradient back in its input's dtype
        wg, xg = w.to(g.dtype), x.to(g.dtype)
        work = dx = None
        if ctx.needs_input_grad[0]:
            dx = (g.matmul(wg) if out_in else g.matmul(wg.t())).to(x.dtype).contiguous()
            # asynchronous: the process group's own all-reduce (the same-host transport is synchronous)
            work = dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=comm.group, async_op=True)
        g2, x2 = g.reshape(-1, g.shape[-1]), xg.reshape(-1, xg.shape[-1])
        dw = (g2.t().matmul(x2) if out_in else x2.t().matmul(g2)).to(w.dtype) if ctx.needs_input_grad[1] else None
        db = g2.sum(0).to(w.dtype) if has_bias and ctx.needs_input_grad[2] else None
        if work is not None:
            comm.wait(work, "all_reduce (sum) of the input gradient", dx)
        return dx, dw, db, None, None


class _Collective(nn.Module):
    def __init__(self, comm: Communicator):
        super().__init__()
        self.comm = comm

    @property
    def world_size(self) -> int:
        return self.comm.world_size


class ColumnLinear(_Collective):
    """A column-parallel linear fused with its ``CopyToRegion``: forward is the plain linear;
    backward all-reduces the input gradient asynchronously while the weight gradient is computed."""

    def __init__(self, comm: Communicator, *, weight_is_out_in: bool = True):
        super().__init__(comm)
        self.out_in = weight_is_out_in

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.world_size == 1 or not torch.is_grad_enabled():
            if self.out_in:
                return torch.nn.functional.linear(x, w, b)
            return torch.addmm(b, x, w) if b is not None else x.matmul(w)
        if torch.compiler.is_compiling():  # traceable: the copy op's backward is the all-reduce
            x = copy_to_region_op(x, self.comm.name)
            if self.out_in:
                return torch.nn.functional.linear(x, w, b)
            return x.matmul(w) + b if b is not None else x.matmul(w)
        return _ColumnLinearFn.apply(x, w, b, self.out_in, self.comm)


class AllReduce(_Collective):
    """forward: all-reduce (sum) of a partial sum; backward: identity.

    Without autograd the sum is taken in place: lowering gives every partial sum exactly
    one reader, this module, so nothing else can see the buffer change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return all_reduce_op(x, self.comm.name)
        if not torch.is_grad_enabled() and x.is_contiguous():
            return self.comm.all_reduce_(x)
        return _AllReduceFn.apply(x, self.comm)


class CopyToRegion(_Collective):
    """forward: identity; backward: all-reduce of the gradient.

    Sits where a replicated value enters sharded compute (the input of a
    column-parallel linear): each rank's gradient is a partial sum.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1 or not (torch.is_grad_enabled() and x.requires_grad):
            return x
        if torch.compiler.is_compiling():
            return copy_to_region_op(x, self.comm.name)
        return _CopyFn.apply(x, self.comm)


class AllGather(_Collective):
    """forward: all-gather of ``Shard(dim, chunks)`` pieces (trimming padding); backward: local slice."""

    def __init__(self, dim: int, chunks: int, global_size: int, comm: Communicator):
        super().__init__(comm)
        self.dim, self.chunks, self.global_size = dim, chunks, global_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return all_gather_op(x, self.dim, self.chunks, self.global_size, self.comm.name)
        return _GatherFn.apply(x, self.dim, self.chunks, self.global_size, self.comm)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, chunks={self.chunks}, global_size={self.global_size}"


class LocalSlice(_Collective):
    """forward: this rank's ``Shard(dim, chunks)`` slice of a replicated value (no communication);
    backward: all-gather of the gradient."""

    def __init__(self, dim: int, chunks: int, comm: Communicator):
        super().__init__(comm)
        self.dim, self.chunks = dim, chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return slice_op(x, self.dim, self.chunks, self.comm.name)
        if torch.is_grad_enabled() and x.requires_grad:
            return _SliceFn.apply(x, self.dim, self.chunks, self.comm)
        return _local_slice(x, self.dim, self.chunks, self.comm.rank, self.world_size)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, chunks={self.chunks}"


class _ZeroForwardFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class OneRankShare(_Collective):
    """forward: ``x`` on rank 0, zeros on the others; backward: identity.  No communication.

    Turns a replicated value into a partial sum (R -> P) so that it can join one: ``P + R``
    stays a partial sum when rank 0 alone adds ``R``, and the all-reduce waits until a whole
    value is needed (a parallel-residual block reduces once, not once per branch).  The
    logical value is ``x`` (``sum_r x * [r == 0]``), so its gradient is the replicated
    gradient of the sum, unchanged on every rank.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1 or self.comm.rank == 0:
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            return _ZeroForwardFn.apply(x)
        return torch.zeros_like(x)


@dataclass(frozen=True)
class RedistributionKind:
    """One row of the redistribution table: a placement change and how it runs.

    ``forward`` / ``backward``: the collective each pass issues (``None``: none, or local
    work only); the backward one runs when the value needs a gradient.  ``build(frm, to,
    global_size, comm)`` makes the module lowering inserts.
    """

    name: str
    change: str
    forward: str | None
    backward: str | None
    build: Callable[[Placement, Placement, int, Communicator], nn.Module]


# Matches each placement change with its collectives and runtime module (Megatron's mappings).
REDISTRIBUTIONS: dict[str, RedistributionKind] = {k.name: k for k in (
    RedistributionKind("all_reduce", "P -> R", "all_reduce", None,
                       lambda frm, to, size, comm: AllReduce(comm)),
    RedistributionKind("all_gather", "S -> R", "all_gather", None,
                       lambda frm, to, size, comm: AllGather(frm.dim, frm.chunks, size, comm)),
    RedistributionKind("slice", "R -> S", None, "all_gather",
                       lambda frm, to, size, comm: LocalSlice(to.dim, to.chunks, comm)),
    RedistributionKind("copy", "R -> R (into sharded compute)", None, "all_reduce",
                       lambda frm, to, size, comm: CopyToRegion(comm)),
    RedistributionKind("to_partial", "R -> P (rank 0 adds it)", None, None,
                       lambda frm, to, size, comm: OneRankShare(comm)),
)}


def redistribution_chain(frm: Placement, to: Placement) -> list[tuple[str, Placement, Placement]]:
    """The kinds, in order, that take a value from ``frm`` to ``to``: ``[(kind, from, to), ...]``.

    ``P -> S`` is an all-reduce then a local slice; ``S -> S'`` (another layout) an all-gather
    then a slice; ``R -> P`` keeps the value on rank 0 only (``OneRankShare``).  ``R -> R`` is
    empty (a ``copy`` is asked for where a replicated value enters sharded compute, not implied
    by the placements).
    """
    r = Replicate()
    if frm == to:
        return []
    if isinstance(frm, Partial):
        head = [("all_reduce", frm, r)]
    elif isinstance(frm, Shard):
        head = [("all_gather", frm, r)]
    elif isinstance(frm, Replicate):
        head = []
    else:
        raise AssertionError(f"no redistribution from {frm}")
    if isinstance(to, Shard):
        return head + [("slice", r, to)]
    if isinstance(to, Replicate):
        return head
    if isinstance(to, Partial):
        return head + [("to_partial", r, to)]
    raise AssertionError(f"no redistribution from {frm} to {to}")


class VocabParallelEmbedding(nn.Module):
    """Lookup in this rank's rows ``[start, start + rows)`` of the vocab; other ids give zero rows.

    ``E[ids] = sum_r E_r[ids]`` where ``E_r`` is rank r's row block (zero elsewhere):
    the output is a partial sum, made whole by one all-reduce.
    """

    def __init__(self, start: int, rows: int, padding_idx: int = -1, *, fused: bool = False):
        super().__init__()
        self.start, self.rows, self.padding_idx = start, rows, padding_idx
        self.fused = fused  # autotp_kernels::masked_embedding where compiled (lowering decides)

    def forward(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        pad = self.padding_idx - self.start if 0 <= self.padding_idx - self.start < self.rows else -1
        if self.fused:
            return masked_embedding(weight, ids, self.start, pad)
        return masked_embedding_composite(weight, ids, self.start, pad)

    def extra_repr(self) -> str:
        return f"rows=[{self.start}, {self.start + self.rows})" + (", fused" if self.fused else "")


class TPDropout(nn.Module):
    """Dropout with probability ``p`` while ``self.training``; see ``passes/lower_dropout.py``.

    ``sharded=True`` draws each call's mask from ``seed + call number`` inside a forked RNG, so
    the default generator stays in step across ranks and a recomputation (activation
    checkpointing) can replay the mask by rewinding ``_calls``.
    """

    def __init__(self, p: float, *, sharded: bool, seed: int):
        super().__init__()
        self.p, self.sharded, self.seed = p, sharded, seed
        self._calls = 0
        self.name = _register(self, "dropout")  # how the traceable mask op finds next_seed

    def next_seed(self) -> int:
        self._calls += 1
        return self.seed + 1_000_003 * self._calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.sharded:
            return torch.nn.functional.dropout(x, self.p, True)
        if torch.compiler.is_compiling():  # the same mask, from an op Dynamo can trace
            return x * (dropout_keep(x.detach(), self.p, self.name) / (1.0 - self.p))
        with _seeded(self.next_seed(), x.device):
            return torch.nn.functional.dropout(x, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p}, sharded={self.sharded}"


class TPAttention(nn.Module):
    """``scaled_dot_product_attention`` whose attention dropout follows ``self.training``.

    On sharded heads the dropout mask comes from this rank's own seed sequence, drawn inside
    ``torch.random.fork_rng`` so the default generator every rank shares is left untouched.
    """

    def __init__(self, dropout_p: float, *, sharded: bool, seed: int, **sdpa_kwargs):
        super().__init__()
        self.dropout_p, self.sharded, self.seed = dropout_p, sharded, seed
        self.sdpa_kwargs = sdpa_kwargs
        self._calls = 0
        self.name = _register(self, "dropout")

    next_seed = TPDropout.next_seed

    def forward(self, q, k, v, attn_mask=None):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if not self.training or self.dropout_p == 0.0:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=0.0, **self.sdpa_kwargs)
        if not self.sharded:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p, **self.sdpa_kwargs)
        if torch.compiler.is_compiling():  # written out, so that the mask comes from the traceable op
            return sdpa_math(q, k, v, attn_mask, dropout_p=self.dropout_p, **self.sdpa_kwargs,
                             keep=lambda probs: dropout_keep(probs.detach(), self.dropout_p, self.name))
        with _seeded(self.next_seed(), q.device):
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p, **self.sdpa_kwargs)

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}, sharded={self.sharded}"
