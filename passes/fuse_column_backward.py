"""fuse_column_backward: overlap a column-parallel linear's input-gradient all-reduce with its weight gradient.

    xc = CopyToRegion(x)                    y = ColumnLinear(x, W, b)
    y  = linear(xc, W, b)          ->       # backward: dX = g·W; all_reduce(dX) started async;
                                            #           dW = gᵀ·X, db = Σg computed meanwhile; wait

Megatron-LM's async gradient all-reduce.  Only where the copy feeds this one
linear: when q, k and v share one copy, their input gradients must be summed
before the all-reduce can start.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from autotp.patterns import linear_bias, linear_weight
from autotp.runtime import ColumnLinear, CopyToRegion

from .base import LoweringContext, PassResult, nodes_with_role, replace_with_module

aten = torch.ops.aten


def fuse_column_backward(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    modified = False
    for i, node in nodes_with_role(gm, ctx.plan, "column"):
        if node.target not in (aten.linear.default, aten.addmm.default):
            continue
        found = linear_weight(node)
        if found is None:  # its weight is a slice of a tensor kept whole (a tied weight also read whole)
            continue
        sig, w, _, _ = found
        copy = node.args[sig.x]
        if not (copy.op == "call_module" and isinstance(gm.get_submodule(copy.target), CopyToRegion)
                and len(copy.users) == 1 and node.args[sig.w] is w):
            continue
        b = linear_bias(node, sig)
        module = ColumnLinear(ctx.comm, weight_is_out_in=node.target == aten.linear.default)
        replace_with_module(gm, node, f"autotp_column_linear_{i}", module, (copy.args[0], w, b))
        gm.graph.erase_node(copy)
        modified = True
    return PassResult(gm, modified)
