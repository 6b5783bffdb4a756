"""Per-op placement rules.

A rule sees one fx node and the placements of its inputs and returns a
``Decision``: the placement of the node's output and the placement each tensor
input must have for the local computation to equal the global one.  Where an
input's actual placement differs from the required one, the analysis records a
redistribution (``P -> R`` all-reduce, ``S -> R`` all-gather, ``R -> S`` local
slice) that lowering later inserts -- so collectives appear only where a
placement changes.

A rule that cannot keep a ``Shard`` input sharded raises ``Unsupported``.  The
analysis then gathers that input (always correct) and, unless the gather is at
the graph's output, demotes the column-parallel seeds the shard came from, so
the next round of analysis keeps that region replicated instead.  Correctness
never depends on rule coverage; coverage buys speed and memory.

Rules are registered in tables keyed by aten overload packet (see the bottom of
this file; the rules live in ``base``, ``views`` and ``compute``): supporting a new op is adding
an entry, not a branch.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch.fx import Node

from ..patterns import GROUPED_OPS, op_name
from .base import PARTIAL_LINEAR, Ctx, Decision, Unsupported, rule_pointwise, rule_replicated
from .compute import (CONVOLUTIONS, REDUCTIONS, SCANS, rule_conv, rule_cross_entropy, rule_embedding, rule_ignore, rule_layer_norm,
                      rule_linear, rule_matmul, rule_baddbmm, rule_grouped_mm, rule_native_dropout, rule_reduce, rule_reduction, rule_scan,
                      rule_sdpa, rule_softmax, rule_sym_size)
from .views import (_dim_map_rule, _permute_dim, _squeeze_dim, _t_dim, _transpose_dim, _unsqueeze_dim,
                    reshape_shard, rule_cat, rule_expand, rule_flatten, rule_getitem, rule_index, rule_index_copy,
                    rule_select, rule_slice, rule_unflatten, rule_split, rule_tensor_split, rule_stack, rule_unbind,
                    rule_view, rule_view_as)

__all__ = ["Ctx", "Decision", "Unsupported", "RULES", "POINTWISE", "PARTIAL_LINEAR", "rule_for", "reshape_shard"]

aten = torch.ops.aten

# --------------------------------------------------------------------------- tables

# Matches elementwise ops (unary, binary with broadcasting, and their in-place / scalar forms).
POINTWISE = [
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.pow, aten.rsqrt, aten.sqrt, aten.exp, aten.log,
    aten.tanh, aten.sigmoid, aten.relu, aten.gelu, aten.silu, aten.erf, aten.abs, aten.sin, aten.cos,
    aten.where, aten.clamp, aten.minimum, aten.maximum, aten.dropout, aten.alias,
    aten.clone, aten.contiguous, aten.detach, aten.to, aten._to_copy, aten.lift_fresh_copy, aten.add_,
    aten.mul_, aten.masked_fill, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_not,
    aten.__and__, aten.__or__, aten.reciprocal, aten.square, aten.type_as,
    aten.leaky_relu, aten.hardtanh, aten.elu, aten.softplus, aten.mish, aten.hardswish, aten.hardsigmoid,
    aten.log1p, aten.expm1, aten.sign, aten.floor, aten.ceil, aten.round, aten.fill, aten.zeros_like,
    aten.ones_like, aten.full_like, aten.empty_like, aten.bitwise_not, aten.relu_, aten.gelu_,
]

RULES: dict[Any, Callable[[Ctx, Node], Decision]] = {op: rule_pointwise for op in POINTWISE}
RULES.update({
    aten.view: rule_view, aten.reshape: rule_view, aten._unsafe_view: rule_view, aten.flatten: rule_flatten,
    aten.unflatten: rule_unflatten,
    aten.expand: rule_expand, aten.broadcast_to: rule_expand, aten.index: rule_index,
    aten.index_copy: rule_index_copy, aten.index_copy_: rule_index_copy,
    aten.transpose: _dim_map_rule(_transpose_dim),
    aten.permute: _dim_map_rule(_permute_dim),
    aten.t: _dim_map_rule(_t_dim), aten.numpy_T: _dim_map_rule(_t_dim),
    aten.unsqueeze: _dim_map_rule(_unsqueeze_dim),
    aten.squeeze: _dim_map_rule(_squeeze_dim),
    aten.slice: rule_slice,
    aten.split: rule_split, aten.split_with_sizes: rule_split, aten.chunk: rule_split,
    aten.tensor_split: rule_tensor_split,
    aten.cat: rule_cat, aten.stack: rule_stack,
    aten.select: rule_select, aten.unbind: rule_unbind, aten.view_as: rule_view_as, aten.reshape_as: rule_view_as,
    aten.sum: rule_reduce, aten.mean: rule_reduce,
    **{op: rule_reduction for op in REDUCTIONS}, **{op: rule_scan for op in SCANS},
    **{op: rule_conv for op in CONVOLUTIONS},
    aten.native_dropout: rule_native_dropout,
    aten.softmax: rule_softmax, aten._softmax: rule_softmax, aten.log_softmax: rule_softmax,
    aten._log_softmax: rule_softmax,
    aten.layer_norm: rule_layer_norm,
    aten.scaled_dot_product_attention: rule_sdpa,
    aten.bmm: rule_matmul, aten.baddbmm: rule_baddbmm,
    aten.linear: rule_linear, aten.addmm: rule_linear, aten.mm: rule_linear, aten.matmul: rule_linear,
    aten.embedding: rule_embedding,
    aten.cross_entropy_loss: rule_cross_entropy,
    aten._assert_tensor_metadata: rule_ignore,
    "_guards_fn": rule_ignore,  # Matches torch.export's input-guard module call
    aten.sym_size: rule_sym_size,
    operator.getitem: rule_getitem,
})


# Matches ops of other libraries by qualified name (their packets exist only once those load).
RULES_BY_NAME: dict[str, Callable[[Ctx, Node], Decision]] = {name: rule_grouped_mm for name in GROUPED_OPS}


def rule_for(node: Node) -> Callable[[Ctx, Node], Decision]:
    key = getattr(node.target, "overloadpacket", node.target)
    rule = RULES.get(key)
    if rule is None:
        rule = RULES_BY_NAME.get(op_name(node), rule_replicated)
    return rule
