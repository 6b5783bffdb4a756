"""drop_metadata_asserts: remove ``_assert_tensor_metadata`` checks.

    _assert_tensor_metadata(x, dtype=f32, device=meta)   ->   (nothing)

    _guards_fn(ids, past_k_S)                             ->   (nothing)

Export records the capture-time device and dtype; after sharding (and when a
graph captured on ``meta`` runs on a real device) those asserts are stale.  So
are export's input guards where an input is a shard (a KV cache passed back in):
they check global sizes.  A guard call that reads replicated inputs only stays.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from autotp.placements import Shard

from .base import LoweringContext, PassResult


def drop_metadata_asserts(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        stale = node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default
        if node.op == "call_module" and node.target == "_guards_fn":
            stale = any(isinstance(getattr(ctx.plan.node(x), "placement", None), Shard) for x in node.all_input_nodes)
        if stale:
            gm.graph.erase_node(node)
            modified = True
    return PassResult(gm, modified)
