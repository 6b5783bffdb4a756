"""lower_row_bias: a row-parallel linear adds its bias once, after the all-reduce.

    y = linear(x_S, W_r, b)       ->   y = AllReduce(linear(x_S, W_r)) + b
    y = addmm(b, x_S, W_r)        ->   y = AllReduce(mm(x_S, W_r)) + b

The all-reduce is the plan's ``Step`` with ``before_bias`` set for that linear.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from autotp.patterns import LINEAR_OPS, linear_bias
from autotp.runtime import REDISTRIBUTIONS

from .base import LoweringContext, PassResult

aten = torch.ops.aten


def lower_row_bias(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    nodes = {n.name: n for n in gm.graph.nodes}
    modified = False
    for step in ctx.plan.steps:
        if not step.before_bias:
            continue
        node = nodes[step.src]
        sig = LINEAR_OPS[node.target]  # its weight may be a slice by now (a tensor also read whole)
        b = linear_bias(node, sig)
        x, wt = node.args[sig.x], node.args[sig.w]
        gm.add_submodule(step.name, REDISTRIBUTIONS[step.kind].build(step.frm, step.to, 0, ctx.comm))
        with gm.graph.inserting_after(node):
            op = aten.mm.default if node.target == aten.addmm.default else aten.linear.default
            mm = gm.graph.call_function(op, (x, wt))
        with gm.graph.inserting_after(mm):
            red = gm.graph.call_module(step.name, (mm,))
        with gm.graph.inserting_after(red):
            out = gm.graph.call_function(aten.add.Tensor, (red, b))
        for n in (mm, red, out):
            n.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        modified = True
    return PassResult(gm, modified)
