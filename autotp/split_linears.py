"""split_fused_linears: one linear per part of a fused projection whose parts are read apart.

A fused weight (q, k and v in one matrix) whose output is cut into parts of unequal sizes cannot
be sharded as one ``Shard(dim, chunks)``: multi-query attention (one k and one v head beside
many q heads), grouped-query attention with fewer KV heads than ranks, or parts simply of
different widths (GPT-BigCode's ``split([embed, kv, kv])``, Phi-3's ``qkv[..., :q]``, Falcon's
per-head view sliced ``[:-2]`` / ``[[-2]]`` / ``[[-1]]``).  Written as one linear per part,
reading that part of the same weight, each part is placed on its own (the q part column-parallel
by heads, k and v whole where their heads are fewer than the ranks), and the weight is held in
``pieces`` (``placements.Shard``): exactly the same math, found from shapes alone::

    y = linear(x, W, b)                            y_q = linear(x, W[0:64],  b[0:64])
    q, k, v = split_with_sizes(y, [64, 16, 16])    y_k = linear(x, W[64:80], b[64:80])
                                             ->    y_v = linear(x, W[80:96], b[80:96])
    v4 = view(y, [B, S, 6, 16])                    q = view(y_q, [B, S, 4, 16])
    q = v4[:, :, :-2];  k = v4[:, :, [-2]]         k = view(y_k, [B, S, 1, 16])

The rewrite applies when every reader of ``y`` takes one contiguous run of its output features
(a split along them, a slice, or -- through a view splitting them into ``(n, d)`` -- a split, a
slice, a one-element index or a select along ``n``; read through a bias add or an unsqueeze first), the
runs partition the features, they are not the equal split the chunk layout already shards whole
(GPT-2's ``split(y, 768)``), and all parts flow into one attention op (q, k and v: a fused
projection feeding other mixers, a Mamba or linear-attention in-projection, is left to their rules).
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .patterns import get_attr, linear_bias, linear_weight, param_of, size_hint

__all__ = ["split_fused_linears"]

aten = torch.ops.aten

# Matches the views that split the output features into (n, d) before the parts are taken.
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# Matches ops that split the output features into runs, with the equal-split forms the chunk
# layout handles (left alone when they are the only reader).
_SPLITS = (aten.split_with_sizes.default, aten.split.Tensor)


def _norm_range(start, stop, n: int) -> tuple[int, int] | None:
    if not all(isinstance(v, int) or v is None for v in (start, stop)):
        return None
    a, b, step = slice(start, stop).indices(n)
    return (a, b) if step == 1 and a < b else None


def _const_index(gm: GraphModule, idx) -> int | None:
    """The value of a one-element constant index tensor (``x[..., [-2], :]``: a lifted constant)."""
    while isinstance(idx, Node) and idx.op == "call_function" and idx.target in (
            aten.lift_fresh_copy.default, aten.clone.default, aten.detach.default):
        idx = idx.args[0]
    if not isinstance(idx, Node) or idx.op != "get_attr":
        return None
    t = get_attr(gm, idx.target)
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype not in (torch.int64, torch.int32):
        return None
    return int(t.reshape(()).item())


def _last(node: Node, dim) -> bool:
    nd = len(node.meta["val"].shape)
    return isinstance(dim, int) and dim % nd == nd - 1


def _reads(gm: GraphModule, y: Node, n: int):
    """``[(reader, (start, stop), how)]`` for every reader of ``y``'s ``n`` output features, or None.

    ``how`` says how the reader is rebuilt from its part ``y_i``: the ops (target, further arguments)
    applied to it in order -- none when it *is* the part, a view, an unsqueeze the readers read through."""
    out = []
    for u in y.users:
        if u.op != "call_function":
            return None
        nd = len(y.meta["val"].shape)
        bias = u.args[1] if u.target == aten.add.Tensor and len(u.args) == 2 and not u.kwargs else None
        if (isinstance(bias, Node) and bias.op == "get_attr" and u.args[0] is y
                and tuple(size_hint(s) for s in bias.meta["val"].shape) == (n,)):  # Falcon's x @ W.T + b
            inner = _reads(gm, u, n)
            if inner is None:
                return None
            out += [(reader, r, [(u.target, (_Part(bias),))] + how) for reader, r, how in inner]
        elif u.target == aten.unsqueeze.default and u.args[1] % (nd + 1) != nd:  # GPT-BigCode: y[:, None] first
            inner = _reads(gm, u, n)
            if inner is None:
                return None
            out += [(reader, r, [(u.target, (u.args[1],))] + how) for reader, r, how in inner]
        elif u.target in _SPLITS and _last(y, u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)):
            edge = 0
            items = {g.args[1]: g for g in u.users if g.target is operator.getitem}
            if len(items) != len(u.users):
                return None
            for i, piece in enumerate(u.meta["val"]):
                size = size_hint(piece.shape[-1])
                if size == 0:
                    return None  # an empty part (Mamba-2's d_mlp = 0): left as it is
                if i in items:
                    out.append((items[i], (edge, edge + size), []))
                edge += size
        elif u.target == aten.slice.Tensor and _last(y, u.args[1] if len(u.args) > 1 else 0) and (
                len(u.args) < 5 or u.args[4] == 1):
            r = _norm_range(u.args[2] if len(u.args) > 2 else None, u.args[3] if len(u.args) > 3 else None, n)
            if r is None:
                return None
            out.append((u, r, []))
        elif u.target in _VIEWS:
            shp = [size_hint(s) for s in u.meta["val"].shape]
            yshp = [size_hint(s) for s in y.meta["val"].shape]
            if len(shp) != len(yshp) + 1 or shp[:-2] != yshp[:-1] or shp[-2] * shp[-1] != n:
                return None
            heads, d = shp[-2], shp[-1]
            sizes = list(u.args[1])
            for h in u.users:
                if h.op != "call_function":
                    return None
                nd = len(shp)
                if h.target == aten.slice.Tensor and h.args[1] % nd == nd - 2 and (len(h.args) < 5 or h.args[4] == 1):
                    r = _norm_range(h.args[2] if len(h.args) > 2 else None, h.args[3] if len(h.args) > 3 else None,
                                    heads)
                    if r is None:
                        return None
                    out.append((h, (r[0] * d, r[1] * d), [(aten.view.default, (sizes[:-2] + [r[1] - r[0], sizes[-1]],))]))
                elif h.target in _SPLITS and (h.args[2] if len(h.args) > 2 else h.kwargs.get("dim", 0)) % nd == nd - 2:
                    items = {g.args[1]: g for g in h.users if g.target is operator.getitem}  # Falcon's [H, 1, 1]
                    if len(items) != len(h.users):
                        return None
                    edge = 0
                    for i, piece in enumerate(h.meta["val"]):
                        k = size_hint(piece.shape[-2])
                        if k == 0:
                            return None
                        if i in items:
                            out.append((items[i], (edge * d, (edge + k) * d),
                                        [(aten.view.default, (sizes[:-2] + [k, sizes[-1]],))]))
                        edge += k
                elif h.target == aten.select.int and h.args[1] % nd == nd - 2 and isinstance(h.args[2], int):
                    i = h.args[2] % heads
                    out.append((h, (i * d, (i + 1) * d), [(aten.view.default, (sizes[:-2] + [sizes[-1]],))]))
                elif (h.target == aten.index.Tensor and len(h.args[1]) == nd - 1
                      and all(i is None for i in h.args[1][:-1])):
                    i = _const_index(gm, h.args[1][-1])
                    if i is None:
                        return None
                    i %= heads
                    out.append((h, (i * d, (i + 1) * d), [(aten.view.default, (sizes[:-2] + [1, sizes[-1]],))]))
                else:
                    return None
        else:
            return None
    return out


class _Part:
    """A 1-D parameter read by a part only as its part (a bias added after the linear)."""

    def __init__(self, param: Node):
        self.param = param


def _worth_splitting(y: Node, reads: list, n: int) -> bool:
    runs = sorted({r for _, r, _ in reads})
    edge = 0
    for a, b in runs:
        if a != edge:
            return False  # overlapping parts, or features no one reads
        edge = b
    if edge != n or len(runs) < 2:
        return False
    equal = len({b - a for a, b in runs}) == 1
    only_split = len({reader.args[0] for reader, _, _ in reads if reader.target is operator.getitem}) == 1 and all(
        reader.target is operator.getitem for reader, _, _ in reads)
    return not (equal and only_split)


# Matches the attention ops whose inputs the parts must all be (q, k and v of one attention).
_ATTENTION = (aten.scaled_dot_product_attention.default,)
_REACH = 400  # nodes searched from a part for its attention (rotary, repeat_kv and casts are a few dozen)


def _one_attention(reads: list) -> bool:
    """Do all parts flow into one attention op?  The rewrite is for q, k and v: a fused projection
    feeding other mixers (a Mamba in-projection, a linear-attention one) is left to their rules."""
    common = None
    for run in sorted({r for _, r, _ in reads}):
        seen, todo, found = set(), [reader for reader, r, _ in reads if r == run], set()
        while todo and len(seen) < _REACH:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.target in _ATTENTION:
                found.add(n)
                continue
            todo.extend(n.users)
        common = found if common is None else common & found
        if not common:
            return False
    return True


def _fake(target, args, kwargs):
    return target(*map_arg(args, lambda a: a.meta["val"]), **map_arg(kwargs, lambda a: a.meta["val"]))


def _add(graph, target, args, meta: dict, kwargs=None) -> Node:
    node = graph.call_function(target, tuple(args), kwargs or {})
    node.meta = {**meta, "val": _fake(target, args, kwargs or {})}
    return node


def split_fused_linears(gm: GraphModule) -> bool:
    """Rewrite ``gm`` in place (see the module docstring); True if it changed."""
    modified = False
    for node in list(gm.graph.nodes):
        found = linear_weight(node)
        if found is None:
            continue
        sig, w, w_out, _ = found
        n = size_hint(node.meta["val"].shape[-1])
        b = linear_bias(node, sig)
        if param_of(node.args[sig.w])[0] is not w or (b is not None and (
                not isinstance(b, Node) or b.op != "get_attr" or len(b.meta["val"].shape) != 1)):
            continue
        reads = _reads(gm, node, n)
        if not reads or not _worth_splitting(node, reads, n) or not _one_attention(reads):
            continue
        chain = []  # the permutations the linear reads the weight through, outermost first
        x = node.args[sig.w]
        while x is not w:
            chain.append(x)
            x = x.args[0]
        parts = {}
        anchor = node
        for a, e in sorted({r for _, r, _ in reads}):
            with gm.graph.inserting_after(anchor):
                wp = _add(gm.graph, aten.slice.Tensor, (w, w_out, a, e), w.meta)
                anchor = wp
            for c in reversed(chain):
                with gm.graph.inserting_after(anchor):
                    wp = _add(gm.graph, c.target, (wp, *c.args[1:]), c.meta, c.kwargs)
                    anchor = wp
            args = list(node.args)
            args[sig.w] = wp
            if b is not None:
                with gm.graph.inserting_after(anchor):
                    bp = _add(gm.graph, aten.slice.Tensor, (b, 0, a, e), b.meta)
                    anchor = bp
                args[sig.bias] = bp
            with gm.graph.inserting_after(anchor):
                parts[(a, e)] = anchor = _add(gm.graph, node.target, args, node.meta, node.kwargs)
        dead = []
        for reader, r, how in reads:
            part = parts[r]
            for target, more in how:
                with gm.graph.inserting_before(reader):
                    more = tuple(_add(gm.graph, aten.slice.Tensor, (m.param, 0, *r), m.param.meta)
                                 if isinstance(m, _Part) else m for m in more)
                    part = _add(gm.graph, target, (part, *more), reader.meta)
            reader.replace_all_uses_with(part)
            dead.append(reader)
        for reader in dead:
            _erase_upward(gm, reader, stop=node)
        gm.graph.erase_node(node)
        for c in chain:  # the whole weight's transpose, now read by no one
            if not c.users:
                gm.graph.erase_node(c)
        modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
    return modified


def _erase_upward(gm: GraphModule, node: Node, *, stop: Node) -> None:
    """Erase ``node`` and then its inputs that no longer have readers, up to ``stop`` (kept: erased last)."""
    if node is stop or node.users:
        return
    inputs = [x for x in node.all_input_nodes]
    gm.graph.erase_node(node)
    for x in inputs:
        if x is not stop and not x.users and x.op == "call_function":
            _erase_upward(gm, x, stop=stop)
