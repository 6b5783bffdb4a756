"""scale_partial_means: a mean over a sharded dim becomes this rank's share of the mean.

    m = mean(x_S, [-1], keepdim)   ->   m = mul(mean(x_S, [-1], keepdim), 1 / world)   # P

Each rank's local mean is ``S_r / (N / world)``; scaled by ``1 / world`` it is ``S_r / N``, and
the ranks' values sum to the global mean: a partial sum (``rules.compute.rule_reduce``), all-reduced
where a whole value is needed -- a ``(.., 1)`` statistic, not the activation (RMSNorm over a
sharded width: OLMo-2's and OLMoE's q/k norms).  The analysis allows it only on unpadded shards.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from .base import LoweringContext, PassResult

aten = torch.ops.aten


def scale_partial_means(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        dec = ctx.plan.node(node)
        if dec is None or "partial_scale" not in dec.local_args or ctx.world_size == 1:
            continue
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(aten.mul.Tensor, (node, 1.0 / dec.local_args["partial_scale"]))
        scaled.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
        modified = True
    return PassResult(gm, modified)
