"""drop_metadata_asserts: remove ``_assert_tensor_metadata`` checks.

    _assert_tensor_metadata(x, dtype=f32, device=meta)   ->   (nothing)

Export records the capture-time device and dtype; after sharding (and when a
graph captured on ``meta`` runs on a real device) those asserts are stale.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from .base import PassResult


def drop_metadata_asserts(gm: GraphModule, **_) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
            modified = True
    return PassResult(gm, modified)
