"""lower_dropout: dropout that follows ``module.train()`` / ``.eval()`` and keeps ranks' RNG in step.

    y = dropout(x_R, p, train)   ->   y = TPDropout[p, sharded=False](x_R)   # default generator
    y = dropout(x_S, p, train)   ->   y = TPDropout[p, sharded=True](x_S)    # per-rank generator
    o = sdpa(q, k, v, mask, p)   ->   o = TPAttention[p, sharded](q, k, v, mask)

A replicated activation must get the same mask on every rank, so it draws from
the default generator, which every rank advances identically.  A sharded one
draws from a generator of its own per rank (Megatron's model-parallel RNG
tracker): drawing a local-sized mask from the default generator would leave the
ranks' default generators out of step, and every later replicated dropout would
differ across ranks -- silently.  Whether dropout is active follows the sharded
module's ``training`` flag, not the mode the model was captured in.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from autotp.placements import Shard
from autotp.runtime import TPAttention, TPDropout

from .base import LoweringContext, PassResult, replace_with_module

aten = torch.ops.aten
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def lower_dropout(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    modified = False
    seed = ctx.seed + 7919 * (ctx.rank + 1)  # this rank's own sequence (see the module docstring)
    for i, node in enumerate(list(gm.graph.nodes)):
        if node.op != "call_function" or node.target not in (aten.dropout.default, aten.scaled_dot_product_attention.default):
            continue
        dec = ctx.plan.node(node)
        sharded = dec is not None and isinstance(dec.placement, Shard)
        if node.target == aten.dropout.default:
            x, p = node.args[:2]
            module, args = TPDropout(float(p), sharded=sharded, seed=seed), (x,)
        else:
            bound = dict(zip(_SDPA_ARGS, node.args), **node.kwargs)
            p = float(bound.pop("dropout_p", 0.0))
            if p == 0.0:
                continue
            args = (bound.pop("query"), bound.pop("key"), bound.pop("value"), bound.pop("attn_mask", None))
            module = TPAttention(p, sharded=sharded, seed=seed, **bound)
        name = f"autotp_dropout_{i}"
        replace_with_module(gm, node, name, module, args)
        modified = True
    return PassResult(gm, modified)
