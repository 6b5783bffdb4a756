"""Per-op placement rules.

A rule sees one fx node and the placements of its inputs and returns a
``Decision``: the placement of the node's output and the placement each tensor
input must have for the local computation to equal the global one.  Where an
input's actual placement differs from the required one, the analysis records a
redistribution (``P -> R`` all-reduce, ``S -> R`` all-gather, ``R -> S`` local
slice) that lowering later inserts -- so collectives appear only where a
placement changes.

A rule that cannot keep a ``Shard`` input sharded raises ``Unsupported``.  The
analysis then gathers that input (always correct) and, unless the gather is at
the graph's output, demotes the column-parallel seeds the shard came from, so
the next round of analysis keeps that region replicated instead.  Correctness
never depends on rule coverage; coverage buys speed and memory.

Rules are registered in tables keyed by aten overload packet (see the bottom of
this file): supporting a new op is adding an entry, not a branch.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import Node

from .placements import Partial, Placement, Replicate, Shard

aten = torch.ops.aten

R = Replicate()
P = Partial()


class Unsupported(Exception):
    """A rule cannot keep a sharded input sharded.

    ``chunk_factor``: when the failure is only that the shard's chunk layout is
    too coarse (e.g. a fused QKV output split in 3), the factor by which the
    seeds' ``chunks`` must be multiplied for the rule to succeed.
    """

    def __init__(self, reason: str, chunk_factor: int | None = None, culprits: list | None = None):
        super().__init__(reason)
        self.reason = reason
        self.chunk_factor = chunk_factor
        self.culprits = culprits  # the inputs whose shard is at fault (default: every sharded input)


@dataclass
class Decision:
    out: Placement | list[Placement] | None
    inputs: dict[Node, Placement] = field(default_factory=dict)
    why: str = ""
    role: str | None = None  # "column" | "row" | "row_bias" | "vocab" for linear / embedding nodes
    local_args: dict[str, Any] = field(default_factory=dict)  # data for the lowering


class Ctx:
    """What a rule may ask about the graph being analyzed."""

    def __init__(self, world_size: int, placements: dict[Node, Any]):
        self.world_size = world_size
        self.placements = placements
        self.column_seeds: dict[Node, int] = {}  # active column seeds -> chunks
        self.vocab_seeds: set[Node] = set()
        self.reduced: set[Node] = set()  # partial sums with several users: all-reduced once, at the source
        self.gather_outputs = True
        self.input_placements: dict[int, Placement] = {}  # flat input position -> declared placement
        self.local_outputs: frozenset[int] = frozenset()  # flat output positions left as each rank's shard

    def pl(self, x: Any) -> Placement | None:
        """Placement of an argument; ``None`` for parameters (placed on demand) and non-tensors."""
        if not isinstance(x, Node):
            return None
        if x in self.reduced:
            return R
        return self.placements.get(x)

    @staticmethod
    def shape(x: Node) -> tuple[int, ...]:
        val = x.meta.get("val")
        return tuple(int(s) for s in val.shape)

    def padded(self, x: Node, p: Shard) -> bool:
        return self.shape(x)[p.dim] % (self.world_size * p.chunks) != 0


def is_tensor_node(x: Any) -> bool:
    return isinstance(x, Node) and isinstance(x.meta.get("val"), torch.Tensor)


def param_of(x: Any) -> tuple[Node, tuple[int, ...]] | None:
    """If ``x`` is a parameter (get_attr), possibly through ``t``/``transpose``/``permute``,
    return ``(get_attr node, perm)`` where ``perm`` maps x's dims to the parameter's dims."""
    if not isinstance(x, Node):
        return None
    if x.op == "get_attr":
        val = x.meta.get("val")
        nd = val.dim() if isinstance(val, torch.Tensor) else 0
        return x, tuple(range(nd))
    if x.op == "call_function" and x.target in (aten.t.default, aten.transpose.int, aten.permute.default):
        inner = param_of(x.args[0])
        if inner is None:
            return None
        base, perm = inner
        nd = len(perm)
        if x.target == aten.t.default:
            order = list(reversed(range(nd)))
        elif x.target == aten.transpose.int:
            d0, d1 = (d % nd for d in x.args[1:3])
            order = list(range(nd))
            order[d0], order[d1] = order[d1], order[d0]
        else:
            order = [d % nd for d in x.args[1]]
        return base, tuple(perm[o] for o in order)
    return None


def tensor_inputs(node: Node) -> list[Node]:
    seen: list[Node] = []
    for x in node.all_input_nodes:
        if x not in seen and (is_tensor_node(x) or isinstance(x.meta.get("val"), (list, tuple))):
            seen.append(x)
    return seen


def _norm(d: int, nd: int) -> int:
    return d % nd if nd else 0


# --------------------------------------------------------------------------- default

def rule_replicated(ctx: Ctx, node: Node) -> Decision:
    """No rule: every input must be replicated; shards cannot pass."""
    ins = {}
    for x in tensor_inputs(node):
        p = ctx.pl(x)
        if isinstance(p, Shard) or isinstance(p, list):
            raise Unsupported(f"no placement rule for {node.target} on a sharded input")
        ins[x] = R
    return Decision(R, ins, why="replicated (no sharded input)")


# --------------------------------------------------------------------------- pointwise

#: Pointwise ops through which a partial sum stays a partial sum, and how:
#: "all" -- every tensor operand must be partial (add, sub: a sum of partial sums);
#: "unary" -- copies.
#: Deliberately not mul-by-replicated or casts: those are linear too, but delaying the
#: all-reduce past them only moves it, and a value that then forks (RMSNorm's
#: ``x * rsqrt(mean(x^2))``) would be reduced twice.
PARTIAL_LINEAR = {
    aten.add: "all", aten.sub: "all",
    aten.alias: "unary", aten.clone: "unary", aten.contiguous: "unary",
}


def _partial_ok(node: Node, parts: list[Node], tins: list[Node]) -> bool:
    kind = PARTIAL_LINEAR.get(getattr(node.target, "overloadpacket", None))
    if kind is None:
        return False
    return len(parts) == len(tins)


def rule_pointwise(ctx: Ctx, node: Node) -> Decision:
    """Elementwise ops with broadcasting.

    S(d) op S(d) -> S(d) (same chunks); S(d) op R -> S(d), slicing R locally when it
    is full-size along d (free) and passing it through when it broadcasts there.
    P op P -> P for add/sub; P * R -> P; anything else with a P input all-reduces it.
    """
    tins = tensor_inputs(node)
    out_nd = len(ctx.shape(node))
    pls = {x: ctx.pl(x) for x in tins}
    shards = {x: p for x, p in pls.items() if isinstance(p, Shard)}
    parts = [x for x, p in pls.items() if isinstance(p, Partial)]
    if not shards and parts:
        if _partial_ok(node, parts, tins):
            return Decision(P, {x: (P if x in parts else R) for x in tins}, why="linear in a partial sum")
        return Decision(R, {x: R for x in tins}, why="needs the full value: all-reduce")
    if not shards:
        return Decision(R, {x: R for x in tins}, why="replicated")
    # Align every shard to the output's dims (broadcasting adds leading dims).
    out_pl = None
    for x, p in shards.items():
        q = Shard(p.dim + out_nd - len(ctx.shape(x)), p.chunks)
        if out_pl is None:
            out_pl = q
        elif q != out_pl:
            raise Unsupported(f"operands sharded differently: {out_pl} vs {q}")
    ins: dict[Node, Placement] = {}
    for x in tins:
        if x in shards:
            ins[x] = shards[x]
            continue
        shp = ctx.shape(x)
        d = out_pl.dim - (out_nd - len(shp))
        if d >= 0 and shp[d] != 1:
            ins[x] = Shard(d, out_pl.chunks)  # full-size replicated operand: take our slice (free)
        else:
            ins[x] = R  # broadcasts along the sharded dim
    return Decision(out_pl, ins, why="pointwise on the shard")


# --------------------------------------------------------------------------- views

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
        return Decision([P] * len(outs), {x: P}, why="split of a partial sum")
    if not isinstance(p, Shard):
        return Decision([R] * len(outs), {x: R} if p is not None else {}, why="replicated")
    dim = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(shp))
    if dim != p.dim:
        return Decision([p] * len(outs), {x: p}, why="split along an unsharded dim")
    sizes = [int(o.shape[dim]) for o in outs]
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


def rule_getitem(ctx: Ctx, node: Node) -> Decision:
    src, idx = node.args
    p = ctx.pl(src)
    if isinstance(p, list):
        return Decision(p[idx], {}, why="element of a split")
    return Decision(p or R, {}, why="getitem")


def rule_cat(ctx: Ctx, node: Node) -> Decision:
    xs = node.args[0]
    out_nd = len(ctx.shape(node))
    dim = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), out_nd)
    pls = {x: ctx.pl(x) for x in xs}
    if all(isinstance(p, Partial) for p in pls.values()):
        return Decision(P, {x: P for x in xs}, why="cat of partial sums")
    shards = {x: p for x, p in pls.items() if isinstance(p, Shard)}
    if not shards:
        return Decision(R, {x: R for x in xs}, why="replicated")
    if len(set(shards.values())) != 1:
        raise Unsupported("cat of differently sharded tensors")
    p = next(iter(shards.values()))
    if p.dim == dim:
        raise Unsupported("cat along the sharded dim")
    ins = {}
    for x in xs:
        ins[x] = p if x in shards else (Shard(p.dim, p.chunks) if ctx.shape(x)[p.dim] != 1 else R)
    return Decision(p, ins, why="cat along an unsharded dim")


# --------------------------------------------------------------------------- reductions / norms

def rule_reduce(ctx: Ctx, node: Node) -> Decision:
    """sum / mean over dims; over the sharded dim, sum gives a partial sum."""
    x = node.args[0]
    p = ctx.pl(x)
    nd = len(ctx.shape(x))
    dims = node.args[1] if len(node.args) > 1 else None
    dims = list(range(nd)) if dims in (None, []) else [_norm(d, nd) for d in ([dims] if isinstance(dims, int) else dims)]
    keep = (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    if isinstance(p, Partial):
        return Decision(P, {x: P}, why="reduction of a partial sum")
    if not isinstance(p, Shard):
        return Decision(R, {x: R}, why="replicated")
    if p.dim in dims:
        is_sum = node.target.overloadpacket == aten.sum
        if is_sum and not ctx.padded(x, p):
            return Decision(P, {x: p}, why="sum over the sharded dim: partial sum")
        raise Unsupported("mean over the sharded dim")
    d = p.dim if keep else p.dim - sum(1 for a in dims if a < p.dim)
    return Decision(Shard(d, p.chunks), {x: p}, why="reduction over unsharded dims")


def rule_softmax(ctx: Ctx, node: Node) -> Decision:
    x = node.args[0]
    p = ctx.pl(x)
    dim = _norm(node.args[1], len(ctx.shape(x)))
    if isinstance(p, Shard) and p.dim != dim:
        return Decision(p, {x: p}, why="softmax along an unsharded dim")
    if isinstance(p, Shard):
        raise Unsupported("softmax along the sharded dim")
    return Decision(R, {x: R}, why="replicated")


def rule_layer_norm(ctx: Ctx, node: Node) -> Decision:
    x = node.args[0]
    p = ctx.pl(x)
    nd = len(ctx.shape(x))
    k = len(node.args[1])
    rest = {a: R for a in tensor_inputs(node) if a is not x}
    if isinstance(p, Shard):
        if p.dim < nd - k:
            return Decision(p, {x: p, **rest}, why="layer_norm over unsharded dims")
        raise Unsupported("layer_norm over the sharded dim")
    return Decision(R, {x: R, **rest}, why="replicated")


# --------------------------------------------------------------------------- attention / matmul

def rule_sdpa(ctx: Ctx, node: Node) -> Decision:
    """scaled_dot_product_attention on (batch, heads, seq, head_dim): heads may be sharded."""
    tins = tensor_inputs(node)
    pls = {x: ctx.pl(x) for x in tins}
    if all(p in (None, R) for p in pls.values()):
        return Decision(R, {x: R for x in tins}, why="replicated")
    shards = {x: p for x, p in pls.items() if isinstance(p, Shard)}
    q, k, v = node.args[:3]
    out_nd = len(ctx.shape(node))
    head = out_nd - 3
    layouts = set()
    for x, p in shards.items():
        if p.dim != head - (out_nd - len(ctx.shape(x))) or x not in (q, k, v):
            raise Unsupported(f"attention input sharded on dim {p.dim}, not on heads", culprits=[x])
        layouts.add(p.chunks)
    if len(layouts) != 1:
        raise Unsupported("q, k, v sharded with different layouts")
    chunks = layouts.pop()
    gqa = node.kwargs.get("enable_gqa", False)
    ins = {}
    for x in tins:
        if x in shards:
            ins[x] = shards[x]
            continue
        if isinstance(pls[x], Partial):
            raise Unsupported("partial attention input")
        shp = ctx.shape(x)
        d = head - (out_nd - len(shp))
        if d >= 0 and shp[d] != 1:
            if gqa and x in (k, v) and shp[d] != ctx.shape(q)[head]:
                raise Unsupported("replicated GQA key/value with enable_gqa")
            ins[x] = Shard(d, chunks)
        else:
            ins[x] = R
    return Decision(Shard(head, chunks), ins, why="attention on local heads")


def rule_matmul(ctx: Ctx, node: Node) -> Decision:
    """Activation x activation matmul/bmm (``q @ k^T``): batch dims may be sharded; a
    shard on the contracted dim of both gives a partial sum."""
    a, b = node.args[:2]
    pa, pb = ctx.pl(a), ctx.pl(b)
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(node)
    if not isinstance(pa, Shard) and not isinstance(pb, Shard):
        return Decision(R, {x: R for x in (a, b) if ctx.pl(x) is not None}, why="replicated")
    if len(sa) < 2 or len(sb) < 2:
        raise Unsupported("matmul of vectors on a shard")
    if (isinstance(pa, Shard) and pa.dim == len(sa) - 1 and isinstance(pb, Shard) and pb.dim == len(sb) - 2
            and pa.chunks == pb.chunks and not ctx.padded(a, pa)):
        return Decision(P, {a: pa, b: pb}, why="contracted dim sharded: partial sum")
    out_pl = None
    for x, p, s in ((a, pa, sa), (b, pb, sb)):
        if isinstance(p, Shard):
            if p.dim >= len(s) - 2:
                raise Unsupported("matmul operand sharded on a matrix dim")
            q = Shard(p.dim + len(so) - len(s), p.chunks)
            if out_pl is not None and q != out_pl:
                raise Unsupported("matmul operands sharded differently")
            out_pl = q
    ins = {}
    for x, p, s in ((a, pa, sa), (b, pb, sb)):
        if isinstance(p, Shard):
            ins[x] = p
        else:
            d = out_pl.dim - (len(so) - len(s))
            ins[x] = Shard(d, out_pl.chunks) if d >= 0 and s[d] != 1 else R
    return Decision(out_pl, ins, why="batched matmul on a sharded batch dim")


# --------------------------------------------------------------------------- linear / embedding

@dataclass(frozen=True)
class LinearSig:
    x: int
    w: int
    bias: int | None
    w_out_dim: int  # the output-features dim of the weight as the op sees it


# Matches the ops that multiply an activation by a 2-D parameter (possibly through t()).
LINEAR_OPS = {
    aten.linear.default: LinearSig(x=0, w=1, bias=2, w_out_dim=0),   # nn.Linear: W is (out, in)
    aten.addmm.default: LinearSig(x=1, w=2, bias=0, w_out_dim=1),    # HF Conv1D: b + x @ W, W is (in, out)
    aten.mm.default: LinearSig(x=0, w=1, bias=None, w_out_dim=1),
    aten.matmul.default: LinearSig(x=0, w=1, bias=None, w_out_dim=1),
}


def linear_weight(node: Node) -> tuple[LinearSig, Node, int, int] | None:
    """``(sig, weight get_attr, param out dim, param in dim)`` if ``node`` is a linear with a 2-D weight."""
    sig = LINEAR_OPS.get(node.target) if node.op == "call_function" else None
    if sig is None or len(node.args) <= max(sig.x, sig.w):
        return None
    found = param_of(node.args[sig.w])
    if found is None:
        return None
    w, perm = found
    if len(perm) != 2:
        return None
    out_dim = perm[sig.w_out_dim]
    return sig, w, out_dim, 1 - out_dim


def linear_bias(node: Node, sig: LinearSig) -> Node | None:
    if sig.bias is None:
        return None
    b = node.args[sig.bias] if len(node.args) > sig.bias else node.kwargs.get("bias")
    return b if isinstance(b, Node) else None


def rule_linear(ctx: Ctx, node: Node) -> Decision:
    found = linear_weight(node)
    if found is None:
        return rule_matmul(ctx, node) if node.target in (aten.matmul.default, aten.mm.default) else rule_replicated(ctx, node)
    sig, w, w_out, w_in = found
    x = node.args[sig.x]
    b = linear_bias(node, sig)
    px = ctx.pl(x)
    nd = len(ctx.shape(x))
    ins: dict[Node, Placement] = {}
    if b is not None and param_of(b) is None:
        raise Unsupported("linear with a computed bias")
    if isinstance(px, Shard) and px.dim == nd - 1:
        ins[x] = px
        ins[w] = Shard(w_in, px.chunks)
        if b is not None:
            ins[b] = R
            return Decision(R, ins, why="row-parallel (input sharded on the contracted dim); bias after all-reduce",
                            role="row_bias")
        return Decision(P, ins, why="row-parallel (input sharded on the contracted dim)", role="row")
    if isinstance(px, Shard):
        ins = {x: px, w: R}
        if b is not None:
            ins[b] = R
        return Decision(px, ins, why="linear on a batch-sharded input")
    chunks = ctx.column_seeds.get(node)
    ins = {x: R, w: R}
    if chunks is not None:
        ins[w] = Shard(w_out, chunks)
        if b is not None:
            ins[b] = Shard(0, chunks)
        return Decision(Shard(len(ctx.shape(node)) - 1, chunks), ins,
                        why="column-parallel (output features split)", role="column")
    if b is not None:
        ins[b] = R
    return Decision(R, ins, why="replicated linear")


def rule_embedding(ctx: Ctx, node: Node) -> Decision:
    w, ids = node.args[:2]
    if isinstance(ctx.pl(ids), Shard):
        raise Unsupported("embedding of sharded indices")
    if node in ctx.vocab_seeds:
        return Decision(P, {w: Shard(0), ids: R}, why="vocab-parallel embedding (rows split, masked lookup)",
                        role="vocab")
    return Decision(R, {w: R, ids: R}, why="replicated embedding")


def rule_cross_entropy(ctx: Ctx, node: Node) -> Decision:
    """cross_entropy_loss(logits (N, C), target): with the class dim sharded, the loss is computed
    from the shards (``autotp.loss``: two all-reduces over ``[N]``) and comes out replicated."""
    x, target = node.args[:2]
    p = ctx.pl(x)
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    if not isinstance(p, Shard):
        return rule_replicated(ctx, node)
    if len(ctx.shape(x)) != 2 or p.dim != 1 or p.chunks != 1 or weight is not None:
        raise Unsupported("cross-entropy on a shard other than the class dim of (N, C) logits")
    return Decision(R, {x: p, target: R}, why="vocab-parallel cross-entropy (no logits gather)", role="vocab_ce")


def rule_ignore(ctx: Ctx, node: Node) -> Decision:
    """Metadata asserts and export's input guards: accept any placement (lowering drops the
    asserts, and the guards where they read a shard)."""
    return Decision(None, {}, why="metadata check (dropped)")


def rule_sym_size(ctx: Ctx, node: Node) -> Decision:
    """sym_size(x, d): a shard's size on any dim but the sharded one is the global size."""
    x, d = node.args[0], node.args[1]
    p = ctx.pl(x)
    if isinstance(p, Shard) and _norm(d, len(ctx.shape(x))) == p.dim:
        raise Unsupported("size of the sharded dim")
    return Decision(None, {x: p} if isinstance(p, Shard) else {x: R}, why="size of an unsharded dim")


# --------------------------------------------------------------------------- tables

# Matches elementwise ops (unary, binary with broadcasting, and their in-place / scalar forms).
POINTWISE = [
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.pow, aten.rsqrt, aten.sqrt, aten.exp, aten.log,
    aten.tanh, aten.sigmoid, aten.relu, aten.gelu, aten.silu, aten.erf, aten.abs, aten.sin, aten.cos,
    aten.where, aten.clamp, aten.minimum, aten.maximum, aten.min, aten.max, aten.dropout, aten.alias,
    aten.clone, aten.contiguous, aten.detach, aten.to, aten._to_copy, aten.lift_fresh_copy, aten.add_,
    aten.mul_, aten.masked_fill, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_not,
    aten.__and__, aten.__or__, aten.reciprocal, aten.square, aten.type_as, aten.native_dropout,
    aten.leaky_relu, aten.hardtanh, aten.elu, aten.softplus, aten.mish, aten.hardswish, aten.hardsigmoid,
    aten.log1p, aten.expm1, aten.sign, aten.floor, aten.ceil, aten.round, aten.fill, aten.zeros_like,
    aten.ones_like, aten.full_like, aten.empty_like, aten.bitwise_not, aten.relu_, aten.gelu_,
]

RULES: dict[Any, Callable[[Ctx, Node], Decision]] = {op: rule_pointwise for op in POINTWISE}
RULES.update({
    aten.view: rule_view, aten.reshape: rule_view, aten._unsafe_view: rule_view,
    aten.expand: rule_expand,
    aten.transpose: _dim_map_rule(_transpose_dim),
    aten.permute: _dim_map_rule(_permute_dim),
    aten.t: _dim_map_rule(_t_dim),
    aten.unsqueeze: _dim_map_rule(_unsqueeze_dim),
    aten.squeeze: _dim_map_rule(_squeeze_dim),
    aten.slice: rule_slice,
    aten.split: rule_split, aten.split_with_sizes: rule_split, aten.chunk: rule_split,
    aten.cat: rule_cat,
    aten.sum: rule_reduce, aten.mean: rule_reduce,
    aten.softmax: rule_softmax, aten._softmax: rule_softmax, aten.log_softmax: rule_softmax,
    aten._log_softmax: rule_softmax,
    aten.layer_norm: rule_layer_norm,
    aten.scaled_dot_product_attention: rule_sdpa,
    aten.bmm: rule_matmul,
    aten.linear: rule_linear, aten.addmm: rule_linear, aten.mm: rule_linear, aten.matmul: rule_linear,
    aten.embedding: rule_embedding,
    aten.cross_entropy_loss: rule_cross_entropy,
    aten._assert_tensor_metadata: rule_ignore,
    "_guards_fn": rule_ignore,  # Matches torch.export's input-guard module call
    aten.sym_size: rule_sym_size,
    operator.getitem: rule_getitem,
})


def rule_for(node: Node) -> Callable[[Ctx, Node], Decision]:
    key = getattr(node.target, "overloadpacket", node.target)
    return RULES.get(key, rule_replicated)
