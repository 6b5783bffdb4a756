"""The collectives as ``torch.library`` custom ops, so ``torch.compile`` traces a sharded model whole.

An eager sharded model calls its collectives through ``torch.autograd.Function``s that
issue in-place c10d calls (``runtime.py``); Dynamo cannot trace those and would break
the graph at each one.  Under ``torch.compile`` the same modules call these ops instead:
opaque to Dynamo and Inductor (a fake implementation gives their output's shape), with
Megatron's forward/backward pairs registered as their autograd formulas::

    autotp::all_reduce      forward: all-reduce (sum)       backward: identity       (g)
    autotp::copy_to_region  forward: identity (a copy)      backward: all-reduce     (f)
    autotp::all_gather      forward: all-gather (S -> R)    backward: local slice
    autotp::local_slice     forward: local slice (R -> S)   backward: all-gather

The generic functional ``all_reduce`` has another backward (an all-reduce again); g's is
the identity, which is why these are our own ops.  A custom op cannot take a Python
object, so the communicator travels as its registered name (``register``); the op looks
it up when it runs, on this rank, and issues the collective through it (same-host
transport and timeouts included).  The layout math of a gather and a slice lives here too,
shared with the eager path.
"""
from __future__ import annotations

import functools
import itertools
import math
import weakref
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .placements import pad_zeros, shard_index, take_shard

__all__ = ["register", "communicator", "gather", "local_slice", "seeded", "sdpa_math"]

# name -> object, for the ops (which cannot take Python objects): communicators, and the dropout
# modules whose call counters pick each mask's seed.  Held weakly: a model's modules hold theirs.
_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_NAMES = itertools.count()


def register(owner, kind: str = "comm") -> str:
    """Give ``owner`` a process-unique name the ops can carry, and remember it under that name."""
    name = f"{kind}{next(_NAMES)}"
    _OWNERS[name] = owner
    return name


def communicator(name: str):
    try:
        return _OWNERS[name]
    except KeyError:
        raise ValueError(f"no autotp communicator or dropout named {name!r} in this process: a compiled sharded model runs "
                         "only in the process (rank) that sharded it") from None


def gather(x: torch.Tensor, dim: int, chunks: int, global_size: int, comm) -> torch.Tensor:
    """Rank-ordered all-gather of ``Shard(dim, chunks)`` pieces into the global layout (padding trimmed).

    The parts are written straight into one output tensor, never into a list of parts joined by
    ``cat``: from shared memory with the same-host transport, else by the process group into views
    of the output (``Communicator.all_gather_into``)."""
    if comm.same_host is not None:  # straight into the layout from shared memory
        out = comm.same_host.gather_into(x, dim, chunks, global_size)
        if out is not None:
            return out
    dim = dim % x.dim()
    n, world = x.shape[dim], comm.world_size
    shape = list(x.shape)
    if chunks == 1:
        shape[dim] = world * n  # padded; the padding is trimmed by the narrow below
        out = x.new_empty(shape)
        comm.all_gather_into(x, [out.narrow(dim, r * n, n) for r in range(world)])
        return out.narrow(dim, 0, global_size) if world * n != global_size else out
    # each part is [chunk0 block, chunk1 block, ...]; the global layout is chunk-major: rank r's part is
    # no single view of the output, so it is gathered whole and its blocks copied into place (no cat)
    shape[dim] = global_size
    out = x.new_empty(shape)
    block = n // chunks
    lead, trail = shape[:dim], shape[dim + 1:]
    grid = out.view(*lead, chunks, world, block, *trail)  # [..., chunk, rank, block, ...]
    for r, part in enumerate(comm.all_gather(x)):
        grid.select(dim + 1, r).copy_(part.view(*lead, chunks, block, *trail))
    return out


@functools.lru_cache(maxsize=1024)
def _rows(size: int, world: int, rank: int, chunks: int, device: torch.device):
    """``(start, index, count, pad)`` of a rank's rows: ``start`` where they are contiguous (a narrow),
    else ``index`` already on ``device`` -- built once, not every forward.  Real tensors even when
    first asked while ``torch.compile`` traces (a fake ``arange`` would make the check below
    data-dependent)."""
    if chunks == 1:  # one contiguous block (``shard_index``'s layout), in plain ints
        block = -(-size // world)
        start = min(rank * block, size)
        count = min(block, size - start)
        return start, None, count, block - count
    with unset_fake_temporarily():
        index, pad = shard_index(size, world, rank, chunks)
        if len(index) and bool((index[1:] - index[:-1] == 1).all()):
            return int(index[0]), None, len(index), pad
        return None, index.to(device), len(index), pad


def local_slice(x: torch.Tensor, dim: int, chunks: int, rank: int, world: int) -> torch.Tensor:
    """This rank's ``Shard(dim, chunks)`` piece of a whole ``x`` (a view where the rows are contiguous)."""
    size = x.shape[dim]
    if type(size) is not int:  # symbolic (a dynamic shape under tracing): nothing to cache
        return take_shard(x, dim, *shard_index(size, world, rank, chunks))
    start, index, count, pad = _rows(size, world, rank, chunks, x.device)
    out = x.narrow(dim, start, count) if index is None else x.index_select(dim, index)
    return pad_zeros(out, dim, pad)


def _gathered_shape(x: torch.Tensor, dim: int, global_size: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = global_size
    return shape


# ---- all_reduce: P -> R; backward identity -------------------------------------------------

@torch.library.custom_op("autotp::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, comm: str) -> torch.Tensor:
    return communicator(comm).all_reduce(x)


@all_reduce.register_fake
def _(x, comm):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _identity_backward(ctx, grad):
    return grad, None


all_reduce.register_autograd(_identity_backward)


# ---- copy_to_region: identity; backward all-reduce ------------------------------------------

@torch.library.custom_op("autotp::copy_to_region", mutates_args=())
def copy_to_region(x: torch.Tensor, comm: str) -> torch.Tensor:
    return x.clone()


@copy_to_region.register_fake
def _(x, comm):
    return torch.empty_like(x)


def _save_comm(ctx, inputs, output):
    ctx.comm = inputs[-1]


def _copy_backward(ctx, grad):
    return all_reduce(grad, ctx.comm), None


copy_to_region.register_autograd(_copy_backward, setup_context=_save_comm)


# ---- all_gather: S -> R; backward local slice -----------------------------------------------

@torch.library.custom_op("autotp::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, dim: int, chunks: int, global_size: int, comm: str) -> torch.Tensor:
    return gather(x, dim, chunks, global_size, communicator(comm)).contiguous()


@all_gather.register_fake
def _(x, dim, chunks, global_size, comm):
    return x.new_empty(_gathered_shape(x, dim, global_size))


def _save_gather(ctx, inputs, output):
    x, ctx.dim, ctx.chunks, _, ctx.comm = inputs


def _gather_backward(ctx, grad):
    c = communicator(ctx.comm)
    return local_slice(grad, ctx.dim, ctx.chunks, c.rank, c.world_size), None, None, None, None


all_gather.register_autograd(_gather_backward, setup_context=_save_gather)


# ---- local_slice: R -> S; backward all-gather -----------------------------------------------

@torch.library.custom_op("autotp::local_slice", mutates_args=())
def slice_op(x: torch.Tensor, dim: int, chunks: int, comm: str) -> torch.Tensor:
    c = communicator(comm)
    return local_slice(x, dim, chunks, c.rank, c.world_size).clone(memory_format=torch.contiguous_format)


@slice_op.register_fake
def _(x, dim, chunks, comm):
    c = communicator(comm)
    index, pad = shard_index(x.shape[dim], c.world_size, c.rank, chunks)
    return x.new_empty(_gathered_shape(x, dim, len(index) + pad))


def _save_slice(ctx, inputs, output):
    x, ctx.dim, ctx.chunks, ctx.comm = inputs
    ctx.size = x.shape[ctx.dim]


def _slice_backward(ctx, grad):
    return all_gather(grad, ctx.dim, ctx.chunks, ctx.size, ctx.comm), None, None, None


slice_op.register_autograd(_slice_backward, setup_context=_save_slice)


# ---- dropout on sharded activations: each rank's own stream, traceable ------------------------

@contextmanager
def seeded(seed: int, device: torch.device):
    """Draw from ``seed`` inside a forked RNG: the default generators ranks share are left as they were."""
    if device.type != "cuda":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index]):  # the generator of the tensor's own GPU, not the current one
        torch.cuda.default_generators[index].manual_seed(seed)
        yield


@torch.library.custom_op("autotp::dropout_keep", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_keep(like: torch.Tensor, p: float, owner: str) -> torch.Tensor:
    """The keep mask (1 kept, 0 dropped) of ``owner``'s next dropout call, drawn from its next seed:
    the draw ``F.dropout`` makes there (``bernoulli(1 - p)`` of the input's shape), so compiled and
    eager calls drop the same elements.  Tagged nondeterministic: never merged with another call,
    never recomputed in backward."""
    with seeded(communicator(owner).next_seed(), like.device):
        return torch.empty_like(like, memory_format=torch.contiguous_format).bernoulli_(1 - p)


@dropout_keep.register_fake
def _(like, p, owner):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def sdpa_math(q, k, v, attn_mask=None, *, dropout_p: float, keep, is_causal: bool = False, scale=None,
              enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` written out, its dropout mask from ``keep(probabilities)``:
    what a compiled model runs where attention dropout draws from a rank's own stream (the fused
    op draws its mask inside, where no generator can be given)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.ops.aten._safe_softmax(scores, -1)  # a row with nothing to attend to gives zeros, as the op does
    if dropout_p > 0.0:
        probs = probs * (keep(probs) / (1.0 - dropout_p))
    return probs @ v
