"""Placements: how one logical tensor is laid out over the ranks of a TP group.

The vocabulary is DTensor's -- ``Replicate()``, ``Shard(dim)``, ``Partial()`` --
with one addition that tensor parallelism over fused projections needs:
``Shard(dim, chunks=P)``.  A dim of global size ``N`` with ``chunks=P`` is read
as ``P`` equal chunks, and every rank holds one contiguous block of
``N / (P * world)`` elements *inside each chunk*::

    N = 12, P = 3, world = 2      [a a b b | c c d d | e e f f]
    rank 0 holds a a, c c, e e    (chunk-local block 0)
    rank 1 holds b b, d d, f f    (chunk-local block 1)

That is exactly the layout a fused QKV projection (GPT-2's ``c_attn``, whose
output is ``[q | k | v]``) must be sharded with so that each rank gets whole
heads of q, k and v.  Two ``Shard``s of the same global size are the same
layout iff they have the same ``chunks``.

``Shard(dim)`` with ``chunks=1`` may be *padded*: when ``N % world != 0`` each
rank holds ``ceil(N / world)`` elements, the tail of the last rank(s) being
zeros (Megatron's make-vocab-size-divisible-by).  Padding is only legal where
the zeros are provably inert (a vocab slice, the inner dim of a column->row
pair); the analysis decides that.

A *parameter* may be laid out in ``pieces``: consecutive runs of ``dim``, each
either sharded (rank ``r`` holds block ``r`` of the run) or held whole on every
rank -- a fused projection whose parts are placed differently (multi-query
attention: the q rows split by heads, the one k and v head whole)::

    pieces = ((4, True), (2, False)), world = 2     [q q q q | k v]
    rank 0 holds q q, k v     rank 1 holds q q, k v
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Placement", "Replicate", "Shard", "Partial", "shard_index", "placement_index", "local_size", "take_shard",
           "pad_zeros"]


class Placement:
    """Base class of the three placements."""


@dataclass(frozen=True)
class Replicate(Placement):
    """Every rank holds the full tensor."""

    def __repr__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard(Placement):
    """Rank ``r`` holds block ``r`` of every one of ``chunks`` chunks of ``dim``."""

    dim: int
    chunks: int = 1
    pieces: tuple[tuple[int, bool], ...] = ()  # (size, sharded) runs of ``dim``, parameters only

    def __repr__(self) -> str:
        if self.pieces:
            runs = "+".join(f"{n}{'S' if sharded else 'R'}" for n, sharded in self.pieces)
            return f"S({self.dim},pieces={runs})"
        return f"S({self.dim})" if self.chunks == 1 else f"S({self.dim},chunks={self.chunks})"


@dataclass(frozen=True)
class Partial(Placement):
    """Every rank holds a partial sum; the value is the sum over ranks."""

    reduce_op: str = "sum"

    def __repr__(self) -> str:
        return "P"


def local_size(global_size: int, world_size: int, chunks: int = 1, pieces: tuple = ()) -> int:
    """Size of a sharded dim on one rank (padded up when chunks == 1)."""
    if pieces:
        return sum(n // world_size if sharded else n for n, sharded in _checked(pieces, global_size, world_size))
    if chunks == 1:
        return math.ceil(global_size / world_size)
    if global_size % (chunks * world_size):
        raise ValueError(
            f"a dim of size {global_size} cannot be split into {chunks} chunks "
            f"x {world_size} ranks ({global_size} % {chunks * world_size} != 0)"
        )
    return global_size // world_size


def _checked(pieces: tuple, global_size: int, world_size: int) -> tuple:
    if sum(n for n, _ in pieces) != global_size or any(sharded and n % world_size for n, sharded in pieces):
        raise ValueError(f"pieces {list(pieces)} do not lay out a dim of size {global_size} over {world_size} ranks "
                         "(their sizes must add up to it, and every sharded one be divisible by the world size)")
    return pieces


def shard_index(global_size: int, world_size: int, rank: int, chunks: int = 1,
                pieces: tuple = ()) -> tuple[torch.Tensor, int]:
    """Global indices rank ``rank`` holds along a ``Shard(dim, chunks, pieces)`` dim.

    Returns ``(index, pad)``: ``index`` is a 1-D LongTensor of global positions in
    local order, and ``pad`` the number of zero rows to append after them (only
    for ``chunks == 1`` when ``global_size % world_size != 0``).
    """
    if pieces:
        out, start = [], 0
        for n, sharded in _checked(pieces, global_size, world_size):
            block = n // world_size if sharded else n
            first = start + (rank * block if sharded else 0)
            out.append(torch.arange(first, first + block))
            start += n
        return torch.cat(out), 0
    if chunks == 1:
        block = math.ceil(global_size / world_size)
        start = min(rank * block, global_size)
        stop = min(start + block, global_size)
        return torch.arange(start, stop), block - (stop - start)
    per_chunk = global_size // chunks
    block = local_size(global_size, world_size, chunks) // chunks
    base = torch.arange(chunks) * per_chunk + rank * block
    return (base[:, None] + torch.arange(block)[None, :]).reshape(-1), 0



def placement_index(pl: Shard, global_size: int, world_size: int, rank: int) -> tuple[torch.Tensor, int]:
    """``shard_index`` of a ``Shard`` placement, whatever its layout (chunks or pieces)."""
    return shard_index(global_size, world_size, rank, pl.chunks, pl.pieces)


def pad_zeros(t: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """``t`` with ``pad`` zero rows appended along ``dim`` (the tail of a padded ``Shard``)."""
    if not pad:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def take_shard(t: torch.Tensor, dim: int, index: torch.Tensor, pad: int) -> torch.Tensor:
    """``t``'s rows ``index`` along ``dim`` (a view when they are contiguous), plus ``pad`` zero rows."""
    if len(index) and bool((index[1:] - index[:-1] == 1).all()):
        out = t.narrow(dim, int(index[0]), len(index))
    else:
        out = t.index_select(dim, index.to(t.device))
    return pad_zeros(out, dim, pad)
