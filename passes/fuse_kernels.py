"""fuse_kernels: swap the activation epilogues of column-parallel linears for ``csrc/`` kernels.

    h = linear(x, W, b); y = gelu(h)             ->  h = linear(x, W); y = bias_gelu(h, b)
    (gelu as aten.gelu, or written out: 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))))
    y = silu(g) * u                              ->  y = silu_mul(g, u)

Matched on the dataflow (the ops and their constants), never on names.  Runs only with
``ctx.kernels`` and the kernels compiled for the run device (``LoweringContext.kernel_for``,
which records each swap in the plan's ``fusions``); otherwise the graph is left as it is.
The replacements call ``autotp.ops``, which runs the kernel eagerly and the composite under
``torch.compile`` (Inductor fuses that itself).
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from autotp.ops import bias_gelu, silu_mul
from autotp.runtime import ColumnLinear

from .base import LoweringContext, PassResult

aten = torch.ops.aten

_TANH_K = math.sqrt(2.0 / math.pi)


def _call(n, *targets) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in targets


def _const(a, value: float) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a - value) <= 1e-6 * abs(value)


def _with_const(n, targets: tuple, value: float) -> Node | None:
    """``x`` when ``n`` is ``op(x, value)`` or ``op(value, x)`` for one of ``targets`` (no keywords: alpha 1)."""
    if _call(n, *targets) and len(n.args) == 2 and not n.kwargs:
        a, b = n.args
        if _const(b, value) and isinstance(a, Node):
            return a
        if _const(a, value) and isinstance(b, Node):
            return b
    return None


def _scaled(n, value: float) -> Node | None:
    return _with_const(n, (aten.mul.Tensor, aten.mul.Scalar), value)


def _added(n, value: float) -> Node | None:
    return _with_const(n, (aten.add.Tensor, aten.add.Scalar), value)


def _gelu_tanh_written_out(out: Node) -> tuple[Node, list[Node]] | None:
    """``(v, inner nodes)`` when ``out`` is ``0.5 v (1 + tanh(k (v + 0.044715 v^3)))`` spelled in aten ops."""
    if not _call(out, aten.mul.Tensor) or len(out.args) != 2 or out.kwargs:
        return None
    for half, one_plus in (out.args, out.args[::-1]):
        v = _scaled(half, 0.5)
        t = _added(one_plus, 1.0)
        if v is None or not _call(t, aten.tanh.default):
            continue
        inner = _scaled(t.args[0], _TANH_K)
        if not _call(inner, aten.add.Tensor) or len(inner.args) != 2 or inner.kwargs:
            continue
        for lin, cubic in (inner.args, inner.args[::-1]):
            p = _scaled(cubic, 0.044715)
            if lin is v and _call(p, aten.pow.Tensor_Scalar) and p.args[0] is v and _const(p.args[1], 3.0):
                return v, [half, p, cubic, inner, t.args[0], t, one_plus]
    return None


def _gelu(out: Node) -> tuple[Node, str, list[Node]] | None:
    """``(input, approximate, nodes to drop)`` when ``out`` computes gelu of one input."""
    if _call(out, aten.gelu.default):
        approximate = out.kwargs.get("approximate", out.args[1] if len(out.args) > 1 else "none")
        return out.args[0], approximate, []
    found = _gelu_tanh_written_out(out)
    if found is not None:
        return found[0], "tanh", found[1]
    return None


def _take_bias(gm: GraphModule, v: Node, inside: set) -> Node | None:
    """Move the bias of the linear producing ``v`` (directly or through one view) out of it, and return it;
    ``None`` (nothing changed) when ``v`` is not such a linear's only output path."""
    if any(u not in inside for u in v.users):
        return None
    h = v
    if _call(v, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        h = v.args[0]
        if len(h.users) != 1:
            return None
    width = v.meta.get("val").shape[-1] if isinstance(v.meta.get("val"), torch.Tensor) else None
    if h.op == "call_module" and isinstance(gm.get_submodule(h.target), ColumnLinear) and len(h.args) == 3:
        b = h.args[2]
        if b is not None:
            h.args = (h.args[0], h.args[1], None)
        return b
    if _call(h, aten.addmm.default) and not h.kwargs and len(h.args) == 3:
        b, x, w = h.args
        bval = b.meta.get("val") if isinstance(b, Node) else None
        if bval is None or bval.dim() != 1 or bval.shape[0] != width:
            return None
        h.target, h.args = aten.mm.default, (x, w)
        return b
    if _call(h, aten.linear.default) and len(h.args) == 3 and h.args[2] is not None and not h.kwargs:
        b = h.args[2]
        h.args = h.args[:2]
        return b
    return None


def fuse_kernels(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    if not ctx.kernels:
        return PassResult(gm, False)
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        found = _gelu(node)
        if found is not None:
            v, approximate, dropped = found
            inside = set(dropped) | {node}
            if any(u not in inside for d in dropped for u in d.users):
                continue  # an intermediate of the written-out gelu is read elsewhere
            if not ctx.kernel_for("bias_gelu", node, f"approximate={approximate}"):
                return PassResult(gm, modified)
            b = _take_bias(gm, v, inside)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(bias_gelu, (v, b, approximate))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            for d in [node, *reversed(dropped)]:
                gm.graph.erase_node(d)
            modified = True
            continue
        if _call(node, aten.mul.Tensor) and len(node.args) == 2 and not node.kwargs:
            for s, up in (node.args, node.args[::-1]):
                if not (_call(s, aten.silu.default) and len(s.users) == 1 and isinstance(up, Node)):
                    continue
                g = s.args[0]
                gv, uv = g.meta.get("val"), up.meta.get("val")
                if not (isinstance(gv, torch.Tensor) and isinstance(uv, torch.Tensor) and gv.shape == uv.shape
                        and gv.dtype == uv.dtype):
                    continue
                if not ctx.kernel_for("silu_mul", node):
                    return PassResult(gm, modified)
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(silu_mul, (g, up))
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                gm.graph.erase_node(s)
                modified = True
                break
    return PassResult(gm, modified)
