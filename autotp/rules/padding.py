"""What the padding of an uneven shard holds after each op, so it is never a silent error.

A dim of size ``N`` sharded over ``W`` ranks with ``N % W != 0`` is padded: each rank holds
``ceil(N / W)`` slots and the last ones are padding.  A column-parallel linear's padded
output slots are exactly 0 (its padded weight rows and bias entries are zero), and so is a
replicated operand's slice (``LocalSlice`` pads with zeros).  The padding is inert at a
row-parallel linear -- its padded weight rows are zero -- only while it stays **0**: a
nonzero padded activation would give the padded weight rows a gradient (and the optimizer
would make them nonzero), and a non-finite one gives ``0 * inf = NaN`` forward and back.

So every padded value carries one of three states, ordered by how bad they are::

    ZERO    every padded slot is 0                    (a row-parallel linear may read it)
    FINITE  finite, maybe nonzero; finite derivative  (may only be gathered: the gather drops it)
    BAD     may be inf / NaN, or its derivative may   (refused: the rule raises Unsupported)

and the tables below say what each pointwise op makes of them.  Replicated tensor operands
are assumed finite; Python numbers are checked.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.fx import Node

from ..patterns import op_arg

aten = torch.ops.aten

ZERO, FINITE, BAD = 0, 1, 2
NAMES = {ZERO: "zero", FINITE: "finite", BAD: "possibly non-finite"}

# Matches unary ops with f(0) = 0 and a finite derivative: ZERO stays ZERO, FINITE stays FINITE.
KEEPS_ZERO = {
    aten.alias, aten.clone, aten.contiguous, aten.detach, aten.to, aten._to_copy, aten.type_as,
    aten.lift_fresh_copy, aten.relu, aten.relu_, aten.gelu, aten.gelu_, aten.silu, aten.tanh, aten.sin,
    aten.neg, aten.abs, aten.erf, aten.sign, aten.floor, aten.ceil, aten.round, aten.square, aten.expm1,
    aten.elu, aten.mish, aten.hardswish, aten.dropout, aten.native_dropout, aten.leaky_relu, aten.zeros_like,
}
# Matches unary ops that map 0 (and any finite value) to a finite value, with a finite derivative.
STAYS_FINITE = {
    aten.exp, aten.sigmoid, aten.cos, aten.softplus, aten.hardsigmoid, aten.ones_like, aten.logical_not,
    aten.bitwise_not, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.__and__, aten.__or__,
}


def _number_state(v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Number):
        return BAD
    return ZERO if v == 0 else FINITE if math.isfinite(v) else BAD


def pointwise_state(node: Node, contrib: dict[Node, int], along: set[Node]) -> int:
    """The padded slots' state after pointwise ``node``.

    ``contrib``: each tensor operand's state at the padded slots (a padded shard's own state,
    ``ZERO`` for a replicated operand sliced with zero padding, ``FINITE`` for one that
    broadcasts along the sharded dim); ``along``: the operands that vary along the sharded dim
    (padded shards and sliced operands), whose padded slots are their own.
    """
    op = getattr(node.target, "overloadpacket", None)
    args = node.args

    def state(a) -> int:
        if a is None:
            return ZERO
        return contrib.get(a, FINITE) if isinstance(a, Node) else _number_state(a)

    x = state(args[0]) if args else BAD
    if op in KEEPS_ZERO:
        return x
    if op in STAYS_FINITE:
        return max(FINITE, x)
    if op in (aten.add, aten.sub, aten.add_, aten.maximum, aten.minimum):
        return max(state(a) for a in args[:2])
    if op in (aten.mul, aten.mul_):
        states = [state(a) for a in args[:2]]
        return BAD if BAD in states else min(states)
    if op == aten.div:
        den = args[1]
        if isinstance(den, Node) and den in along:
            return BAD  # the padding of the denominator is (or may be) 0
        return max(x, state(den)) if state(den) == BAD else x
    if op == aten.pow:
        e = args[1]
        if isinstance(e, numbers.Number) and not isinstance(e, bool) and isinstance(args[0], Node):
            return x if e >= 1 else FINITE if e == 0 else BAD  # x^e with e < 1: infinite slope at 0
        return BAD
    if op in (aten.clamp, aten.hardtanh):
        lo, hi = (op_arg(node, "min"), op_arg(node, "max")) if op == aten.clamp else (
            op_arg(node, "min_val", -1.0), op_arg(node, "max_val", 1.0))
        if BAD in (x, state(lo), state(hi)):
            return BAD
        keeps = all(b is None or (isinstance(b, numbers.Number) and (b <= 0 if i == 0 else b >= 0))
                    for i, b in enumerate((lo, hi)))
        return x if keeps else FINITE
    if op == aten.masked_fill:
        v = state(op_arg(node, "value"))
        return x if v == ZERO else max(x, v, FINITE)
    if op in (aten.full_like, aten.fill):
        return state(op_arg(node, "fill_value" if op == aten.full_like else "value"))
    if op == aten.where:
        return max(state(a) for a in args[1:3])
    return BAD  # not known to keep padding finite: log, rsqrt, reciprocal, sqrt, empty_like, ...
