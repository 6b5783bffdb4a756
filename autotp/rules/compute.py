"""Rules for ops that compute: reductions, norms, attention, matmuls, linears, embeddings, the loss."""
from __future__ import annotations

import torch
from torch.fx import Node

from ..patterns import grouped_weight, linear_bias, linear_weight, op_arg, param_of, param_slice, tensor_inputs
from ..placements import Partial, Placement, Shard

from .base import P, R, Ctx, Decision, Unsupported, _norm, rule_pointwise, rule_replicated
from .padding import BAD, FINITE, NAMES, ZERO

aten = torch.ops.aten


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
        if not ctx.padded(x, p):  # each rank's mean / world (``passes/scale_partial_means``)
            return Decision(P, {x: p}, why="mean over the sharded dim: partial sum of local means / world",
                            local_args={"partial_scale": ctx.world_size})
        raise Unsupported(f"{'sum' if is_sum else 'mean'} over the sharded dim"
                          + (f" of an uneven shard ({ctx.padding_of(x, p)})" if is_sum else ""))
    d = p.dim if keep else p.dim - sum(1 for a in dims if a < p.dim)
    return Decision(Shard(d, p.chunks), {x: p}, why="reduction over unsharded dims")


# Matches reductions other than sum/mean (over the sharded dim they need the whole value, and a
# partial sum must be reduced first), with what they make of zero padding over other dims:
# None keeps the input's state; FINITE / BAD as in ``rules.padding``.
REDUCTIONS = {
    aten.amax: None, aten.amin: None, aten.max: None, aten.min: None, aten.prod: None,
    aten.argmax: FINITE, aten.argmin: FINITE, aten.any: FINITE, aten.all: FINITE, aten.logsumexp: FINITE,
    aten.var: BAD, aten.std: BAD, aten.var_mean: BAD, aten.std_mean: BAD, aten.linalg_vector_norm: BAD,
    aten.norm: BAD,
}
# Matches scans along one dim (same shape out; cummax/cummin also return indices).
SCANS = {aten.cumsum: None, aten.cumprod: None, aten.cummax: None, aten.cummin: None, aten.logcumsumexp: FINITE}


def _outs(node: Node, p):
    vals = node.meta.get("val")
    return [p] * len(vals) if isinstance(vals, (list, tuple)) else p


def _pad_after(ctx: Ctx, node: Node, x: Node, p: Shard, effect) -> int | None:
    if not ctx.padded(x, p) or x in ctx.real_padding or effect is None:
        return None
    if effect == BAD:
        raise Unsupported(f"{node.target} would make the padding of an uneven shard ({ctx.padding_of(x, p)}) "
                          f"{NAMES[BAD]}", culprits=[x])
    return max(effect, ctx.pad_of(x))


def rule_reduction(ctx: Ctx, node: Node) -> Decision:
    """max / min / amax / argmax / prod / logsumexp / var ... over dims (tuple results too):
    over unsharded dims the shard moves; over the sharded dim (or on a partial sum) the
    input must be whole.  ``max.other`` / ``min.other`` are pointwise."""
    if node.target in (aten.max.other, aten.min.other):
        return rule_pointwise(ctx, node)
    x = node.args[0]
    p = ctx.pl(x)
    nd = len(ctx.shape(x))
    dims = op_arg(node, "dim")  # by name: norm's come after ``ord`` / ``p``
    dims = list(range(nd)) if dims in (None, []) else [_norm(d, nd) for d in ([dims] if isinstance(dims, int) else dims)]
    keep = bool(op_arg(node, "keepdim", False))
    if not isinstance(p, Shard):
        return Decision(_outs(node, R), {x: R}, why="replicated" if p is None or p == R else "needs the whole value")
    if p.dim in dims:
        raise Unsupported(f"{node.target} over the sharded dim")
    d = p.dim if keep else p.dim - sum(1 for a in dims if a < p.dim)
    q = Shard(d, p.chunks)
    return Decision(_outs(node, q), {x: p}, why="reduction over unsharded dims",
                    pad=_pad_after(ctx, node, x, p, REDUCTIONS.get(node.target.overloadpacket)))


def rule_scan(ctx: Ctx, node: Node) -> Decision:
    """cumsum / cumprod / cummax ... along ``dim``: along an unsharded dim the shard stays."""
    x = node.args[0]
    p = ctx.pl(x)
    dim = _norm(op_arg(node, "dim"), len(ctx.shape(x)))
    if not isinstance(p, Shard):
        return Decision(_outs(node, R), {x: R}, why="replicated" if p is None or p == R else "needs the whole value")
    if p.dim == dim:
        raise Unsupported(f"{node.target} along the sharded dim")
    return Decision(_outs(node, p), {x: p}, why="scan along an unsharded dim",
                    pad=_pad_after(ctx, node, x, p, SCANS.get(node.target.overloadpacket)))


def rule_native_dropout(ctx: Ctx, node: Node) -> Decision:
    """native_dropout(x, p, train) -> (out, mask): both laid out like ``x``; zero stays zero."""
    x = node.args[0]
    p = ctx.pl(x)
    if not isinstance(p, Shard):
        return Decision([R, R], {x: R}, why="replicated")
    return Decision([p, p], {x: p}, why="dropout on the shard")


def rule_softmax(ctx: Ctx, node: Node) -> Decision:
    x = node.args[0]
    p = ctx.pl(x)
    dim = _norm(node.args[1], len(ctx.shape(x)))
    if isinstance(p, Shard) and p.dim != dim:
        return Decision(p, {x: p}, why="softmax along an unsharded dim", pad=_pad_after(ctx, node, x, p, FINITE))
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
            return Decision(p, {x: p, **rest}, why="layer_norm over unsharded dims",
                            pad=_pad_after(ctx, node, x, p, FINITE))
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
    padded = [x for x, p in shards.items() if ctx.padded(x, p)]
    if gqa and padded:
        # each rank's q heads must map to its own KV heads: q head h reads KV head h // (Hq / Hkv)
        x = padded[0]
        raise Unsupported(f"enable_gqa on heads not divisible by world_size ({ctx.padding_of(x, shards[x])})",
                          culprits=padded)
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
    # Rows of ``a`` (or columns of ``b``) sharded, the other operand whole: ``[A_1; A_2] @ B = [A_1 B; A_2 B]``
    # (Mamba's per-channel state times the shared C, ``h (B, D, N) @ C (B, N, 1)``).
    for x, p, s, other, d in ((a, pa, sa, b, len(sa) - 2), (b, pb, sb, a, len(sb) - 1)):
        if isinstance(p, Shard) and p.dim == d and not isinstance(ctx.pl(other), Shard):
            q = Shard(len(so) - (2 if x is a else 1), p.chunks)
            ins = {x: p}
            if ctx.pl(other) is not None or param_of(other) is not None:
                ins[other] = R
            return Decision(q, ins, why="matmul with the " + ("rows of the left" if x is a else "columns of the right")
                            + " operand sharded")
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


def rule_baddbmm(ctx: Ctx, node: Node) -> Decision:
    """baddbmm(input, b1, b2, beta, alpha) = beta * input + alpha * (b1 @ b2) (Bloom's ALiBi scores):
    the batched matmul's rule, ``input`` then laid out like the product (sliced where full-size)."""
    inp, b1, b2 = node.args[:3]
    if isinstance(ctx.pl(inp), Shard) or isinstance(ctx.pl(inp), Partial):
        raise Unsupported("baddbmm with a sharded or partial added input", culprits=[inp])
    mm = rule_matmul(ctx, _Args(node, (b1, b2)))
    if isinstance(mm.out, Partial):
        raise Unsupported("baddbmm contracting a sharded dim (its added input would count once per rank)")
    ins = dict(mm.inputs)
    if isinstance(mm.out, Shard):
        shp = ctx.shape(inp)
        d = mm.out.dim - (len(ctx.shape(node)) - len(shp))
        ins[inp] = Shard(d, mm.out.chunks) if d >= 0 and shp[d] != 1 else R
    else:
        ins[inp] = R
    return Decision(mm.out, ins, why=mm.why)


class _Args:
    """A view of ``node`` with other leading arguments (to reuse a rule on a part of an op)."""

    def __init__(self, node: Node, args: tuple):
        self.args, self.kwargs, self.target, self.meta = args, {}, node.target, node.meta


# Matches convolutions, with the position of their ``groups`` argument.
CONVOLUTIONS = {aten.conv1d: 6, aten.conv2d: 6, aten.conv3d: 6, aten.convolution: 8}


def rule_conv(ctx: Ctx, node: Node) -> Decision:
    """A depthwise convolution (``groups`` = input channels: each output channel reads one input
    channel -- Mamba's causal conv1d) on channel-sharded input runs on the rank's channels:
    input, output, weight and bias all split on the channel dim, ``groups`` localized.
    Convolutions that mix channels need them whole."""
    x, w = node.args[:2]
    b = node.args[2] if len(node.args) > 2 else None
    at = CONVOLUTIONS[node.target.overloadpacket]
    groups = node.args[at] if len(node.args) > at else 1
    px = ctx.pl(x)
    others = [a for a in (w, b) if isinstance(a, Node)]
    if not isinstance(px, Shard):
        for a in others:
            if isinstance(ctx.pl(a), Shard):
                raise Unsupported("convolution with a sharded weight", culprits=[a])
        return Decision(R, {a: R for a in [x] + others if ctx.pl(a) is not None or param_of(a) is not None},
                        why="replicated")
    if node.target.overloadpacket == aten.convolution and node.args[6]:
        raise Unsupported("transposed convolution on a sharded input")
    if px.dim != 1:
        raise Unsupported(f"convolution on an input sharded on dim {px.dim}, not its channels")
    c_in, c_out = ctx.shape(x)[1], ctx.shape(node)[1]
    if groups != c_in or c_out != c_in:
        raise Unsupported(f"convolution mixing channels (groups {groups}, {c_in} -> {c_out} channels) on a "
                          "channel-sharded input")
    for a in others:
        if param_of(a) is None:
            raise Unsupported("convolution with a computed weight or bias on a sharded input", culprits=[x])
        if ctx.padded(x, px) and ctx.pad_of(a) != ZERO:
            raise Unsupported(f"convolution weight whose padding ({ctx.padding_of(x, px)}) is not zero", culprits=[x])
    ins = {x: px, w: Shard(0, px.chunks)}
    if isinstance(b, Node):
        ins[b] = Shard(0, px.chunks)
    return Decision(Shard(1, px.chunks), ins, why="depthwise convolution on the rank's channels",
                    local_args={"local_arg": at})


# --------------------------------------------------------------------------- linear / embedding

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
    feat = 2 if sig.left else 1  # features run along the last dim (x @ W^T), or the one before (W @ x)
    # the weight's placement is asked of the parameter, or of the part of it the linear reads (one part
    # of a fused weight, ``autotp.split_linears``), in the dims that part is read with
    if param_slice(node.args[sig.w]) is not None:
        w = node.args[sig.w]
        perm = param_of(w)[1]
        w_out, w_in = perm.index(w_out), perm.index(w_in)
    if isinstance(px, Shard) and px.dim == nd - feat:
        if ctx.padded(x, px) and ctx.pad_of(x) != ZERO:
            raise Unsupported(f"the padding of an uneven shard ({ctx.padding_of(x, px)}) is {NAMES[ctx.pad_of(x)]}, "
                              "not zero, where it enters a row-parallel linear (an op between the column and the "
                              "row linear does not map 0 to 0)", culprits=[x])
        ins[x] = px
        ins[w] = Shard(w_in, px.chunks)
        if b is not None:
            # the bias joins the partial sum on rank 0 only, so the all-reduce can wait for a whole
            # value to be needed (a parallel-residual block sums both branches first)
            ins[b] = P
            return Decision(P, ins, why="row-parallel (input sharded on the contracted dim); bias on rank 0",
                            role="row")
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
        return Decision(Shard(len(ctx.shape(node)) - feat, chunks), ins,
                        why="column-parallel (output features split)", role="column")
    if b is not None:
        ins[b] = R
    return Decision(R, ins, why="replicated linear")


def rule_grouped_mm(ctx: Ctx, node: Node) -> Decision:
    """Grouped matmul ``y[rows of e] = x[rows of e] @ W[e]`` (a mixture of experts, W: (E, in, out)):
    Megatron's column -> row inside every expert.  Column: each rank holds a block of every
    expert's output features; row: a block of every expert's contracted dim, giving a partial
    sum.  The router and the row offsets stay replicated; rows cannot be split (they are grouped)."""
    found = grouped_weight(node)
    if found is None:
        return rule_replicated(ctx, node)
    sig, w, w_out, w_in = found
    x = node.args[sig.x]
    nd = len(ctx.shape(x))
    px = ctx.pl(x)
    ins: dict[Node, Placement] = {a: R for a in tensor_inputs(node) if a is not x and a is not node.args[sig.w]}
    if isinstance(px, Shard) and px.dim == nd - 1:
        if ctx.padded(x, px) and ctx.pad_of(x) != ZERO:
            raise Unsupported(f"the padding of an uneven shard ({ctx.padding_of(x, px)}) is {NAMES[ctx.pad_of(x)]}, "
                              "not zero, where it enters a row-parallel grouped matmul", culprits=[x])
        ins.update({x: px, w: Shard(w_in, px.chunks)})
        return Decision(P, ins, why="row-parallel in every expert (contracted dim sharded)", role="row")
    if isinstance(px, Shard):
        raise Unsupported("grouped matmul on an input sharded on its rows")
    chunks = ctx.column_seeds.get(node)
    ins[x] = R
    if chunks is not None:
        ins[w] = Shard(w_out, chunks)
        return Decision(Shard(len(ctx.shape(node)) - 1, chunks), ins,
                        why="column-parallel in every expert (output features split)", role="column")
    ins[w] = R
    return Decision(R, ins, why="replicated grouped matmul")


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

