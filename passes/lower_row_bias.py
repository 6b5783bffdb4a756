"""lower_row_bias: a row-parallel linear adds its bias once, after the all-reduce.

    y = linear(x_S, W_r, b)       ->   y = AllReduce(linear(x_S, W_r)) + b
    y = addmm(b, x_S, W_r)        ->   y = AllReduce(mm(x_S, W_r)) + b
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from autotp.placements import Partial, Replicate
from autotp.rules import linear_bias, linear_weight
from autotp.runtime import AllReduce

from .base import PassResult, nodes_with_role

aten = torch.ops.aten


def lower_row_bias(gm: GraphModule, *, analysis, group, **_) -> PassResult:
    modified = False
    for i, node in nodes_with_role(gm, analysis, "row_bias"):
        sig, w, _, _ = linear_weight(node)
        b = linear_bias(node, sig)
        x, wt = node.args[sig.x], node.args[sig.w]
        name = f"autotp_row_all_reduce_{i}"
        gm.add_submodule(name, AllReduce(group))
        with gm.graph.inserting_after(node):
            if node.target == aten.addmm.default:
                mm = gm.graph.call_function(aten.mm.default, (x, wt))
            else:
                mm = gm.graph.call_function(aten.linear.default, (x, wt))
        with gm.graph.inserting_after(mm):
            red = gm.graph.call_module(name, (mm,))
        with gm.graph.inserting_after(red):
            out = gm.graph.call_function(aten.add.Tensor, (red, b))
        for n in (mm, red, out):
            n.meta["val"] = node.meta.get("val")
        mm.meta["autotp"] = {"placement": Partial(), "why": "row-parallel matmul: partial sum"}
        red.meta["autotp"] = {"placement": Replicate(), "why": "all_reduce: P -> R (row-parallel output)"}
        out.meta["autotp"] = {"placement": Replicate(), "why": "row-parallel bias, added once"}
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        modified = True
    return PassResult(gm, modified)
