"""fuse_allreduce_norm: an all-reduce, the residual joining it and the norm after it become one op.

In the lowered graph a transformer block ends with its partial sum all-reduced and normed,
the residual having joined the partial sum on rank 0 (``OneRankShare``, R + P = P)::

    p = add(x, autotp_to_partial(r))        # optional: the residual joins on rank 0
    s = autotp_all_reduce(p)                # the next residual (other users of s read it)
    y = layer_norm(s, [C], w, b, eps)       # or rms_norm(s, [C], w, eps), or written out:
        t = to(s, float32); pow(t, 2) -> mean(-1, keepdim) -> add(eps) -> rsqrt -> mul(t, .)
        -> [to(dtype)] -> mul(w, .)         # Llama's RMSNorm

becomes ``s, y = autotp_allreduce_norm(x, r, w, b)`` (``samehost.AllReduceAddNorm``): on CPU
ranks with the C++ same-host transport it publishes ``x (+ r)`` into its shared slot, sums the
slots in rank order and norms each row in the same pass.  The matched nodes move into the
module as its composite twin, which runs where the fused op does not apply (autograd,
``torch.compile``, a dtype it does not take), so the fallback is the replaced graph itself.

Matched on the dataflow (node targets and edges), not on names.  Applies only when
``ctx.kernels`` is set, ``autotp._samehost`` was built, and the communicator has the C++
same-host transport; otherwise the graph is unchanged.  Each swap is recorded in the plan
(``Plan.fusions``, kind ``allreduce_add_norm``).
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autotp.kernels import extension as kernel_extension
from autotp.runtime import AllReduce, OneRankShare

from .base import LoweringContext, PassResult

aten = torch.ops.aten
_TO = (aten.to.dtype, aten._to_copy.default)


def _module(gm: GraphModule, node, cls) -> bool:
    return (isinstance(node, Node) and node.op == "call_module"
            and isinstance(gm.get_submodule(node.target), cls))


def _only_user(node: Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fn(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _val(node):
    return node.meta.get("val") if isinstance(node, Node) else None


def _float_to(node: Node) -> bool:
    """``node`` is a dtype cast to a floating dtype with nothing else changed."""
    if node.target is aten.to.dtype:
        return len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.dtype) \
            and node.args[1].is_floating_point
    return set(node.kwargs) <= {"dtype"} and len(node.args) == 1 and isinstance(node.kwargs.get("dtype"), torch.dtype)


def _match_layer_norm(s: Node, cols: int):
    """``layer_norm(s, [cols], w, b, eps)`` among ``s``'s users: ``(nodes, y, w, b, eps)``."""
    for u in s.users:
        if _fn(u, aten.layer_norm.default) and u.args[0] is s and not u.kwargs:
            shape, w = list(u.args[1]), u.args[2] if len(u.args) > 2 else None
            b = u.args[3] if len(u.args) > 3 else None
            eps = u.args[4] if len(u.args) > 4 else 1e-5
            if shape == [cols] and isinstance(w, Node) and isinstance(eps, float):
                return [u], u, w, b, eps
    return None


def _match_rms_norm(s: Node, cols: int):
    """``rms_norm(s, [cols], w, eps)`` among ``s``'s users."""
    for u in s.users:
        if _fn(u, aten.rms_norm.default) and u.args[0] is s and not u.kwargs:
            w = u.args[2] if len(u.args) > 2 else None
            eps = u.args[3] if len(u.args) > 3 else None
            if list(u.args[1]) == [cols] and isinstance(w, Node) and isinstance(eps, float):
                return [u], u, w, None, eps
    return None


def _match_written_rms(s: Node, cols: int):
    """The written-out RMSNorm on ``s`` (optionally through a float cast ``t``):
    ``mul(w, [to](mul(t, rsqrt(add(mean(pow(t, 2), [-1], True), eps)))))``."""
    bases = [s] + [u for u in s.users if _fn(u, *_TO) and u.args[0] is s and _float_to(u)]
    for t in bases:
        for p in t.users:
            if not (_fn(p, aten.pow.Tensor_Scalar) and p.args == (t, 2) and (m := _only_user(p))):
                continue
            if not (_fn(m, aten.mean.dim) and m.args[0] is p and list(m.args[1]) in ([-1], [len(_val(s).shape) - 1])
                    and (m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)) and (a := _only_user(m))):
                continue
            if not (_fn(a, aten.add.Tensor, aten.add.Scalar) and a.args[0] is m and isinstance(a.args[1], float)
                    and len(a.args) == 2 and not a.kwargs and (r := _only_user(a))):
                continue
            if not (_fn(r, aten.rsqrt.default) and (n := _only_user(r))):
                continue
            if not (_fn(n, aten.mul.Tensor) and set(n.args) == {t, r} and (nxt := _only_user(n))):
                continue
            chain = [p, m, a, r, n]
            if _fn(nxt, *_TO) and nxt.args[0] is n and _float_to(nxt):
                chain.append(nxt)
                nxt = _only_user(nxt)
            if not (_fn(nxt, aten.mul.Tensor) and len(nxt.args) == 2 and chain[-1] in nxt.args):
                continue
            w = nxt.args[0] if nxt.args[1] is chain[-1] else nxt.args[1]
            wv = _val(w)
            if wv is None and isinstance(w, Node) and w.op == "get_attr":
                wv = _attr(s.graph.owning_module, w.target)
            if not (isinstance(w, Node) and isinstance(wv, torch.Tensor) and tuple(wv.shape) == (cols,)):
                continue
            return ([t] if t is not s else []) + chain + [nxt], nxt, w, None, a.args[1]
    return None


def _attr(gm, target: str):
    try:
        obj = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj
    except AttributeError:
        return None


def _defined_before(node, anchor: Node, order: dict) -> bool:
    return not isinstance(node, Node) or order[node] < order[anchor]


def fuse_allreduce_norm(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    same_host = getattr(ctx.comm, "same_host", None)
    if (not ctx.kernels or ctx.world_size == 1 or same_host is None or not getattr(same_host, "compiled", False)
            or kernel_extension("samehost") is None):
        return PassResult(gm, False)
    from autotp.samehost import AllReduceAddNorm

    modified = False
    for ar in [n for n in gm.graph.nodes if _module(gm, n, AllReduce)]:
        sv = _val(ar)
        if not isinstance(sv, torch.Tensor) or sv.dim() == 0 or not sv.dtype.is_floating_point:
            continue
        cols = sv.shape[-1]
        if not isinstance(cols, int):
            continue
        found = _match_layer_norm(ar, cols) or _match_rms_norm(ar, cols) or _match_written_rms(ar, cols)
        if found is None:
            continue
        norm_nodes, y, w, b, eps = found
        rms = norm_nodes[-1].target is not aten.layer_norm.default
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        if not all(_defined_before(v, ar, order) for v in (w, b)):
            continue
        # the residual joining the partial sum on rank 0: p = add(x, OneRankShare(r)), p read only here
        x, r, share = ar.args[0], None, None
        if (_fn(x, aten.add.Tensor) and len(x.args) == 2 and not x.kwargs and _only_user(x) is ar
                and sum(_module(gm, a, OneRankShare) for a in x.args) == 1):
            share = next(a for a in x.args if _module(gm, a, OneRankShare))
            other = x.args[1] if x.args[0] is share else x.args[0]
            xv, rv = _val(other), _val(share)
            if (isinstance(xv, torch.Tensor) and isinstance(rv, torch.Tensor) and xv.shape == sv.shape
                    and rv.shape == sv.shape and xv.dtype == rv.dtype == sv.dtype):
                add, x, r = x, other, share.args[0]
            else:
                share = None
        join = share is not None
        pattern = ([share] if join and len(share.users) == 1 else []) + ([add] if join else []) + [ar] + norm_nodes
        known = set(pattern) | {v for v in (x, r, w, b, share) if isinstance(v, Node)}
        if any(a not in known for n in pattern for a in n.all_input_nodes):
            continue  # the pattern reads something else (a symbolic size): leave it alone

        # the composite twin: the matched nodes, copied into a graph of (x, r, w, b) -> (s, y)
        sub = torch.fx.Graph()
        env = {}
        for name, v in (("x", x), ("r", r), ("w", w), ("b", b)):
            ph = sub.placeholder(name)
            if isinstance(v, Node):
                env[v] = ph
                ph.meta.update(v.meta)
        if join and share not in pattern:
            env[share] = sub.call_module(share.target, (env[r],))
        for n in pattern:
            env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output((env[ar], env[y]))
        roots = {n.target: gm.get_submodule(n.target) for n in pattern + ([share] if join else [])
                 if n.op == "call_module"}
        composite = GraphModule(roots, sub, class_name="AllReduceNormComposite")

        name = f"autotp_allreduce_norm_{len(ctx.plan.fusions)}"
        gm.add_submodule(name, AllReduceAddNorm(ctx.comm, composite, rms=rms, eps=float(eps), join=join))
        with gm.graph.inserting_before(ar):
            fused = gm.graph.call_module(name, (x, r, w, b))
            s_new = gm.graph.call_function(operator.getitem, (fused, 0))
            y_new = gm.graph.call_function(operator.getitem, (fused, 1))
        s_new.meta.update(ar.meta)
        y_new.meta.update(y.meta)
        fused.meta["val"] = (ar.meta.get("val"), y.meta.get("val"))
        y.replace_all_uses_with(y_new)
        inner = set(pattern)
        ar.replace_all_uses_with(s_new, delete_user_cb=lambda u: u not in inner)
        # a float cast of s that other nodes read as well (Llama's to(s, float32)) is kept for them
        for t in norm_nodes:
            if _fn(t, *_TO) and t.args[0] is ar and any(u not in inner for u in t.users):
                with gm.graph.inserting_after(y_new):
                    kept = gm.graph.node_copy(t, lambda a: s_new if a is ar else a)
                t.replace_all_uses_with(kept, delete_user_cb=lambda u: u not in inner)
        for n in reversed(pattern):
            if not n.users:
                gm.graph.erase_node(n)
        ctx.fused("allreduce_add_norm", ar,
                  f"{'rms_norm' if rms else 'layer_norm'} over {cols}{' + residual on rank 0' if join else ''}")
        modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
