"""localize_shapes: rewrite shape constants that name a sharded dim's global size.

    view(x_S, [B, S, 12, 64])     ->   view(x_S, [B, S, 12 / n, 64])
    split(qkv_S, 768, dim=2)      ->   split(qkv_S, 768 / n, dim=2)
    expand(k_S, [B, 2, 4, S, D])  ->   expand(k_S, [B, 2 / n, 4, S, D])
    conv1d(x_S, w_S, b_S, .., groups=128)  ->   conv1d(x_S, w_S, b_S, .., groups=128 / n)

Only the entry of the sharded output dim changes; ``-1`` and symbolic sizes stay.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from autotp.placements import local_size

from .base import LoweringContext, PassResult

aten = torch.ops.aten


def localize_shapes(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    modified = False
    world_size = ctx.world_size
    for node in gm.graph.nodes:
        dec = ctx.plan.node(node)
        if dec is None or not dec.local_args:
            continue
        if "size_dim" in dec.local_args:
            d = dec.local_args["size_dim"]
            sizes = list(node.args[1])
            if isinstance(sizes[d], int) and sizes[d] != -1:
                sizes[d] = local_size(sizes[d], world_size, dec.placement.chunks)
                node.args = (node.args[0], sizes, *node.args[2:])
                modified = True
        elif "unflatten_index" in dec.local_args:  # unflatten(x, dim, sizes): the sharded entry of sizes
            i = dec.local_args["unflatten_index"]
            sizes = list(node.args[2])
            if isinstance(sizes[i], int) and sizes[i] != -1:
                sizes[i] = local_size(sizes[i], world_size, dec.placement.chunks)
                node.args = (node.args[0], node.args[1], sizes, *node.args[3:])
                modified = True
        elif "local_arg" in dec.local_args:  # one argument is the sharded dim's global size (conv groups)
            i = dec.local_args["local_arg"]
            args = list(node.args)
            args[i] = local_size(args[i], world_size, dec.placement.chunks)
            node.args = tuple(args)
            modified = True
        elif "split_dim" in dec.local_args:
            size = node.args[1]
            if node.target.overloadpacket == aten.chunk:
                continue
            new = [s // world_size for s in size] if isinstance(size, (list, tuple)) else size // world_size
            node.args = (node.args[0], new, *node.args[2:])
            modified = True
    return PassResult(gm, modified)
