"""insert_redistributions: put the plan's placement changes into the graph.

    y = row_linear(x_S, W_r)          y = row_linear(x_S, W_r)
    z = layer_norm(y, ...)      ->    autotp_all_reduce_0 = AllReduce(y)          # P -> R
                                      z = layer_norm(autotp_all_reduce_0, ...)

One node per plan ``Step`` (named as the plan names it), built from its
``runtime.REDISTRIBUTIONS`` row and shared by every consumer the step lists: q,
k and v of one attention read one ``CopyToRegion`` of the normed input, so the
backward all-reduces its gradient once.
"""
from __future__ import annotations

from torch.fx import GraphModule

from autotp.runtime import REDISTRIBUTIONS

from .base import LoweringContext, PassResult


def insert_redistributions(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    nodes = {n.name: n for n in gm.graph.nodes}
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    modified = False
    for step in ctx.plan.steps:
        reads, src = nodes[step.reads], nodes[step.src]
        module = REDISTRIBUTIONS[step.kind].build(step.frm, step.to, step.global_size, ctx.comm)
        gm.add_submodule(step.name, module)
        # after every placeholder: inputs must stay the graph's leading nodes
        with gm.graph.inserting_after(last_input if reads.op == "placeholder" else reads):
            new = gm.graph.call_module(step.name, (reads,))
        new.meta["val"] = src.meta.get("val")
        nodes[step.name] = new
        for consumer in step.consumers:
            nodes[consumer].replace_input_with(src, new)
        modified = True
    return PassResult(gm, modified)
