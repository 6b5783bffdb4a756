"""Rules for ops that move data without computing: views, reshapes, permutations, slices, splits, cat."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.fx import Node

from ..patterns import param_of, size_hint
from ..placements import Partial, Shard

from .base import P, R, Ctx, Decision, Unsupported, _norm

aten = torch.ops.aten


def _groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split a reshape src -> dst into minimal groups of dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        if i < len(src):
            gi.append(i); pi *= src[i]; i += 1
        if j < len(dst):
            gj.append(j); pj *= dst[j]; j += 1
        while pi != pj or (i < len(src) and src[i] == 1 and pi == pj and j >= len(dst)):
            if pi < pj or j >= len(dst):
                gi.append(i); pi *= src[i]; i += 1
            else:
                gj.append(j); pj *= dst[j]; j += 1
        groups.append((gi, gj))
    return groups


def reshape_shard(src: tuple[int, ...], dst: tuple[int, ...], p: Shard, world: int) -> Shard:
    """Where ``Shard(p.dim, p.chunks)`` of a tensor of shape ``src`` lands after a reshape to ``dst``.

    Merge the sharded dim's group into one flat dim (chunks multiply by the sizes
    of the dims before the shard), then split it: the shard lands on the first
    dst dim ``j`` whose preceding group product ``A`` divides the flat chunks and
    whose size is divisible by ``flat_chunks / A * world``.  That ``j`` is unique.
    """
    for gi, gj in _groups(src, dst):
        if p.dim not in gi:
            continue
        flat_chunks = math.prod(src[k] for k in gi if k < p.dim) * p.chunks
        if len(gi) == 1 and len(gj) == 1:
            return Shard(gj[0], p.chunks)
        if src[p.dim] % (p.chunks * world):
            raise Unsupported(f"a padded shard (size {src[p.dim]}, world {world}) cannot be reshaped")
        a = 1
        hint = None
        for j in gj:
            if flat_chunks % a == 0:
                pj = flat_chunks // a
                if dst[j] % (pj * world) == 0:
                    return Shard(j, pj)
            elif hint is None and dst[j] % world == 0 and j != gj[-1]:
                hint = a // math.gcd(a, flat_chunks)  # e.g. (3*H*D) -> (3, H, D): chunk by the leading 3
            a *= dst[j]
        lead = next((dst[j] for j in gj if dst[j] > 1), src[p.dim])
        raise Unsupported(
            f"num_heads ({lead}) is not divisible by world_size ({world}): reshape {list(src)} -> {list(dst)} "
            f"splits the sharded dim {p.dim} (size {src[p.dim]}) into {lead} pieces",
            chunk_factor=hint,
        )
    raise AssertionError("sharded dim not found in reshape groups")


def rule_view(ctx: Ctx, node: Node) -> Decision:
    x = node.args[0]
    p = ctx.pl(x)
    if isinstance(p, Partial):
        return Decision(P, {x: P}, why="reshape of a partial sum")
    if not isinstance(p, Shard):
        return Decision(R, {x: R} if p is not None else {}, why="replicated")
    q = reshape_shard(ctx.shape(x), ctx.shape(node), p, ctx.world_size)
    return Decision(q, {x: p}, why=f"reshape moves the shard to dim {q.dim}", local_args={"size_dim": q.dim})


def rule_unflatten(ctx: Ctx, node: Node) -> Decision:
    """unflatten(x, dim, sizes): a reshape of one dim into ``sizes`` (Falcon's fused qkv into heads); the
    entry of ``sizes`` the shard lands on is localized."""
    dec = rule_view(ctx, node)
    q = dec.out
    if isinstance(q, Shard):
        d = _norm(node.args[1], len(ctx.shape(node.args[0])))
        sizes = node.args[2]
        dec.local_args = {"unflatten_index": q.dim - d} if d <= q.dim < d + len(sizes) else {}
    return dec


def rule_flatten(ctx: Ctx, node: Node) -> Decision:
    """flatten(x, start, end): a reshape whose arguments name dims, not sizes (nothing to localize)."""
    dec = rule_view(ctx, node)
    return Decision(dec.out, dec.inputs, why=dec.why)


def rule_expand(ctx: Ctx, node: Node) -> Decision:
    x = node.args[0]
    p = ctx.pl(x)
    if not isinstance(p, Shard):
        return Decision(p or R, {x: p} if p is not None else {}, why="expand")
    off = len(ctx.shape(node)) - len(ctx.shape(x))
    q = Shard(p.dim + off, p.chunks)
    return Decision(q, {x: p}, why="expand keeps the shard", local_args={"size_dim": q.dim})


def _dim_map_rule(fn: Callable[[Node, int, int], int | None]):
    """Rule for ops that only move dims around: ``fn(node, dim, in_ndim)`` gives the output dim."""

    def rule(ctx: Ctx, node: Node) -> Decision:
        x = node.args[0]
        p = ctx.pl(x)
        if p is None and param_of(node) is not None:
            return Decision(None, {}, why="view of a parameter")
        if isinstance(p, Partial):
            return Decision(P, {x: P}, why="dim permutation of a partial sum")
        if not isinstance(p, Shard):
            return Decision(R, {x: R} if p is not None else {}, why="replicated")
        d = fn(node, p.dim, len(ctx.shape(x)))
        if d is None:
            raise Unsupported(f"{node.target} removes the sharded dim {p.dim}")
        return Decision(Shard(d, p.chunks), {x: p}, why="dims permuted")

    return rule


def _transpose_dim(node, d, nd):
    d0, d1 = (_norm(a, nd) for a in node.args[1:3])
    return d1 if d == d0 else d0 if d == d1 else d


def _permute_dim(node, d, nd):
    return [_norm(a, nd) for a in node.args[1]].index(d)


def _t_dim(node, d, nd):
    return nd - 1 - d


def _unsqueeze_dim(node, d, nd):
    u = _norm(node.args[1], nd + 1)
    return d + 1 if u <= d else d


def _squeeze_dim(node, d, nd):
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else dims
    dims = [_norm(a, nd) for a in dims]
    if d in dims:
        return None
    return d - sum(1 for a in dims if a < d)


def rule_slice(ctx: Ctx, node: Node) -> Decision:
    x = node.args[0]
    p = ctx.pl(x)
    nd = len(ctx.shape(x))
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
    if p is None and param_of(node) is not None:
        return Decision(None, {}, why="part of a parameter")  # placed where it is read
    if isinstance(p, Partial):
        return Decision(P, {x: P}, why="slice of a partial sum")
    if not isinstance(p, Shard):
        return Decision(R, {x: R} if p is not None else {}, why="replicated")
    if dim == p.dim and ctx.shape(x)[dim] != ctx.shape(node)[dim]:
        raise Unsupported(f"slice along the sharded dim {dim}")
    return Decision(p, {x: p}, why="slice along an unsharded dim")


def rule_split(ctx: Ctx, node: Node) -> Decision:
    """split / split_with_sizes / chunk: along the sharded dim, each piece keeps ``chunks / pieces``."""
    x = node.args[0]
    p = ctx.pl(x)
    shp = ctx.shape(x)
    outs = node.meta["val"]
    if isinstance(p, Partial):
        if sum(1 for u in node.users if u.users) > 1:  # one all-reduce before, not one per piece after
            return Decision([R] * len(outs), {x: R}, why="split of a partial sum read in pieces: all-reduced first")
        return Decision([P] * len(outs), {x: P}, why="split of a partial sum")
    if not isinstance(p, Shard):
        return Decision([R] * len(outs), {x: R} if p is not None else {}, why="replicated")
    dim = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(shp))
    if dim != p.dim:
        return Decision([p] * len(outs), {x: p}, why="split along an unsharded dim")
    sizes = [size_hint(o.shape[dim]) for o in outs]
    k = len(sizes)
    if len(set(sizes)) != 1:
        raise Unsupported(f"uneven split {sizes} of the sharded dim")
    if ctx.padded(x, p):
        raise Unsupported("split of a padded shard")
    if p.chunks % k:
        raise Unsupported(f"split into {k} pieces of a shard with {p.chunks} chunk(s)",
                          chunk_factor=k // math.gcd(k, p.chunks))
    q = Shard(dim, p.chunks // k)
    if sizes[0] % (q.chunks * ctx.world_size):
        raise Unsupported(f"split pieces of size {sizes[0]} are not divisible by world_size ({ctx.world_size})")
    return Decision([q] * k, {x: p}, why=f"split of the sharded dim into {k} sharded pieces",
                    local_args={"split_dim": dim})


def rule_tensor_split(ctx: Ctx, node: Node) -> Decision:
    """tensor_split(x, indices, dim): split at indices (Mamba's chunked prefix, along the sequence) -- as
    ``split``; along the sharded dim only by indices (equal pieces: each index divides by the world size)."""
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    p = ctx.pl(node.args[0])
    if (isinstance(p, Shard) and _norm(dim, len(ctx.shape(node.args[0]))) == p.dim
            and node.target != aten.tensor_split.indices):
        raise Unsupported("tensor_split of the sharded dim into sections")
    return rule_split(ctx, node)


def rule_getitem(ctx: Ctx, node: Node) -> Decision:
    src, idx = node.args
    p = ctx.pl(src)
    if isinstance(p, list):
        return Decision(p[idx], {}, why="element of a split")
    return Decision(p or R, {}, why="getitem")


def _joined(pls: dict, what: str):
    """What a join (cat, stack) of inputs placed ``pls`` can be: its ``Decision`` when every input is a
    partial sum or none is sharded, else the one ``Shard`` the sharded inputs share."""
    xs = list(pls)
    if all(isinstance(p, Partial) for p in pls.values()):
        return Decision(P, {x: P for x in xs}, why=f"{what} of partial sums")
    shards = {p for p in pls.values() if isinstance(p, Shard)}
    if not shards:
        return Decision(R, {x: R for x in xs}, why="replicated")
    if len(shards) != 1:
        raise Unsupported(f"{what} of differently sharded tensors")
    return next(iter(shards))


def rule_cat(ctx: Ctx, node: Node) -> Decision:
    out_nd = len(ctx.shape(node))
    # legacy empty operands (shape (0,)) are ignored by cat: they take no part in the layout
    xs = [x for x in node.args[0] if len(ctx.shape(x)) == out_nd]
    dim = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), out_nd)
    pls = {x: ctx.pl(x) for x in xs}
    p = _joined(pls, "cat")
    if isinstance(p, Decision):
        return p
    shards = {x for x, q in pls.items() if isinstance(q, Shard)}
    if p.dim == dim:
        raise Unsupported("cat along the sharded dim")
    ins = {}
    for x in xs:
        ins[x] = p if x in shards else (Shard(p.dim, p.chunks) if ctx.shape(x)[p.dim] != 1 else R)
    return Decision(p, ins, why="cat along an unsharded dim")


def rule_stack(ctx: Ctx, node: Node) -> Decision:
    """stack(xs, dim): equal shapes, a new dim inserted; the shard moves past it (GPT-J's
    interleaved rotary stacks the two halves of each rotated pair along a new last dim)."""
    xs = list(node.args[0])
    out_nd = len(ctx.shape(node))
    dim = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), out_nd)
    pls = {x: ctx.pl(x) for x in xs}
    p = _joined(pls, "stack")
    if isinstance(p, Decision):
        return p
    if any(isinstance(q, Partial) for q in pls.values()):
        raise Unsupported("stack of sharded tensors and partial sums")
    q = Shard(p.dim + 1 if dim <= p.dim else p.dim, p.chunks)
    return Decision(q, {x: p for x in xs}, why="stack along an unsharded dim")


# select(x, dim, i) -- ``x[..., i, :]``: removes one dim, like a squeeze, so the shard moves the
# same way (q, k or v of a fused projection laid out per head, ``[.., heads, 3, head_dim]``:
# Bloom, Persimmon); selecting along the sharded dim itself is unsupported.
rule_select = _dim_map_rule(_squeeze_dim)


def rule_unbind(ctx: Ctx, node: Node) -> Decision:
    """unbind(x, dim): every piece is a select along ``dim``."""
    x = node.args[0]
    p = ctx.pl(x)
    outs = node.meta["val"]
    if isinstance(p, Partial):
        return Decision([P] * len(outs), {x: P}, why="unbind of a partial sum")
    if not isinstance(p, Shard):
        return Decision([R] * len(outs), {x: R} if p is not None else {}, why="replicated")
    nd = len(ctx.shape(x))
    dim = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), nd)
    if dim == p.dim:
        raise Unsupported(f"unbind along the sharded dim {p.dim}")
    d = p.dim - (dim < p.dim)
    return Decision([Shard(d, p.chunks)] * len(outs), {x: p}, why="unbind along an unsharded dim")


def rule_view_as(ctx: Ctx, node: Node) -> Decision:
    """view_as(x, other): a reshape to ``other``'s shape, read locally -- so ``other`` must hold
    the same shard as the result (a replicated ``other`` is sliced: only its shape is read)."""
    x, other = node.args[:2]
    p = ctx.pl(x)
    if isinstance(p, Partial):
        return Decision(P, {x: P, other: R}, why="reshape of a partial sum")
    if not isinstance(p, Shard):
        if isinstance(ctx.pl(other), Shard):
            raise Unsupported("view_as a sharded tensor of a replicated one", culprits=[other])
        return Decision(R, {x: R, other: R}, why="replicated")
    q = reshape_shard(ctx.shape(x), ctx.shape(node), p, ctx.world_size)
    po = ctx.pl(other)
    if isinstance(po, Shard) and po != q:
        raise Unsupported(f"view_as a tensor sharded as {po}, not {q}", culprits=[x, other])
    if isinstance(po, Partial):
        raise Unsupported("view_as a partial sum's shape")
    return Decision(q, {x: p, other: q}, why=f"reshape moves the shard to dim {q.dim}")


def rule_index(ctx: Ctx, node: Node) -> Decision:
    """index(x, [None, .., idx, ..]) -- ``x[..., idx, :]`` with one constant 1-D index tensor on a dim other
    than the sharded one (Falcon's ``qkv[:, :, :, [-2]]`` on a view sharded by KV groups): the shard stays."""
    x, indices = node.args[:2]
    p = ctx.pl(x)
    given = [(j, i) for j, i in enumerate(indices) if i is not None]
    idx = [i for _, i in given]
    if not isinstance(p, Shard):
        if any(isinstance(ctx.pl(i), Shard) for i in idx if isinstance(i, Node)):
            raise Unsupported("index with sharded indices")
        return Decision(R, {a: R for a in [x, *idx] if isinstance(a, Node)}, why="replicated")
    if len(given) != 1 or not isinstance(given[0][1], Node) or len(ctx.shape(given[0][1])) != 1:
        raise Unsupported("index of a sharded tensor other than by one 1-D index tensor")
    j, i = given[0]
    if j == p.dim or isinstance(ctx.pl(i), Shard):
        raise Unsupported(f"index along the sharded dim {p.dim}")
    if not _constant(i):
        raise Unsupported("index of a sharded tensor by computed indices")
    return Decision(p, {x: p, i: R}, why="index along an unsharded dim")


def _constant(x: Node) -> bool:
    """Is ``x`` a tensor constant of the graph (export lifts ``t[..., [-2], :]``'s list to one)?"""
    while x.op == "call_function" and x.target in (aten.lift_fresh_copy.default, aten.clone.default):
        x = x.args[0]
    return x.op == "get_attr"


def rule_index_copy(ctx: Ctx, node: Node) -> Decision:
    """index_copy(_)(x, dim, index, source) -- rows of ``source`` written into ``x`` at ``index`` along
    ``dim`` (a static KV cache's write at the position index).  Along an unsharded dim every rank writes
    its own slice of the rows: ``x`` and ``source`` share the shard, and ``x`` is never redistributed
    (written in place, it must stay the tensor it is)."""
    x, dim, index, source = node.args[:4]
    px, ps = ctx.pl(x), ctx.pl(source)
    if isinstance(ctx.pl(index), (Shard, list)):
        raise Unsupported("index_copy with a sharded index", culprits=[index])
    if isinstance(px, Partial):
        raise Unsupported("index_copy into a partial sum", culprits=[x])
    if not isinstance(px, Shard):
        if isinstance(ps, Shard):
            raise Unsupported("index_copy of a sharded source into a replicated tensor", culprits=[source])
        return Decision(R, {x: R, index: R, source: R}, why="replicated")
    if _norm(dim, len(ctx.shape(x))) == px.dim:
        raise Unsupported(f"index_copy along the sharded dim {px.dim}", culprits=[x])
    if isinstance(ps, Shard) and ps != px:
        raise Unsupported(f"index_copy of a source sharded as {ps} into one sharded as {px}", culprits=[source])
    return Decision(px, {x: px, index: R, source: px}, why="index_copy along an unsharded dim: each rank its slice")
