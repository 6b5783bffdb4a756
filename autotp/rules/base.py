"""The vocabulary of the placement rules: ``Decision``, ``Unsupported`` and what a rule may ask (``Ctx``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

from ..patterns import size_hint, tensor_inputs
from ..placements import Partial, Placement, Replicate, Shard
from .padding import BAD, FINITE, NAMES, ZERO, pointwise_state

aten = torch.ops.aten

R = Replicate()
P = Partial()


class Unsupported(Exception):
    """A rule cannot keep a sharded input sharded.

    ``chunk_factor``: when the failure is only that the shard's chunk layout is
    too coarse (e.g. a fused QKV output split in 3), the factor by which the
    seeds' ``chunks`` must be multiplied for the rule to succeed.
    """

    def __init__(self, reason: str, chunk_factor: int | None = None, culprits: list | None = None):
        super().__init__(reason)
        self.reason = reason
        self.chunk_factor = chunk_factor
        self.culprits = culprits  # the inputs whose shard is at fault (default: every sharded input)


@dataclass
class Decision:
    out: Placement | list[Placement] | None
    inputs: dict[Node, Placement] = field(default_factory=dict)
    why: str = ""
    role: str | None = None  # "column" | "row" | "vocab" for linear / embedding nodes
    local_args: dict[str, Any] = field(default_factory=dict)  # data for the lowering
    pad: int | None = None  # the padding's state (``rules.padding``) if not the worst of the shard inputs'


class Ctx:
    """What a rule may ask about the graph being analyzed."""

    def __init__(self, world_size: int, placements: dict[Node, Any]):
        self.world_size = world_size
        self.placements = placements
        self.column_seeds: dict[Node, int] = {}  # active column seeds -> chunks
        self.vocab_seeds: set[Node] = set()
        self.reduced: set[Node] = set()  # partial sums with several users: all-reduced once, at the source
        self.gather_outputs = True
        self.strict = False
        self.input_placements: dict[int, Placement] = {}  # flat input position -> declared placement
        self.local_outputs: frozenset[int] = frozenset()  # flat output positions left as each rank's shard
        self.pad_state: dict[Node, int] = {}  # padded shards whose padding is not (known to be) zero
        # sequence shards whose padded rows copy a real row (``autotp.sequence``): no op makes them
        # non-finite, so the padding checks do not apply to them
        self.real_padding: set[Node] = set()

    def pl(self, x: Any) -> Placement | None:
        """Placement of an argument; ``None`` for parameters (placed on demand) and non-tensors."""
        if not isinstance(x, Node):
            return None
        if x in self.reduced:
            return R
        return self.placements.get(x)

    @staticmethod
    def shape(x: Node) -> tuple[int, ...]:
        val = x.meta.get("val")
        return tuple(size_hint(s) for s in val.shape)

    def padded(self, x: Node, p: Shard) -> bool:
        return self.shape(x)[p.dim] % (self.world_size * p.chunks) != 0

    def pad_of(self, x: Node) -> int:
        """The state of ``x``'s padding (``rules.padding``): ``ZERO`` unless an op made it otherwise."""
        return self.pad_state.get(x, ZERO)

    def padding_of(self, x: Node, p: Shard) -> str:
        """``"size N over W ranks"`` for error messages."""
        return f"size {self.shape(x)[p.dim]} over {self.world_size} ranks"


def _norm(d: int, nd: int) -> int:
    return d % nd if nd else 0


# --------------------------------------------------------------------------- default

def rule_replicated(ctx: Ctx, node: Node) -> Decision:
    """No rule: every input must be replicated; shards cannot pass."""
    ins = {}
    for x in tensor_inputs(node):
        p = ctx.pl(x)
        if isinstance(p, Shard) or isinstance(p, list):
            raise Unsupported(f"no placement rule for {node.target} on a sharded input")
        ins[x] = R
    return Decision(R, ins, why="replicated (no sharded input)")


# --------------------------------------------------------------------------- pointwise

# Matches pointwise ops through which a partial sum stays a partial sum, with how many leading
# tensor operands they sum: add and sub (a replicated operand joins on rank 0) and copies; add in
# place too, where its output is the only reader of the tensor it writes.
# Deliberately not mul-by-replicated or casts: those are linear too, but delaying the
# all-reduce past them only moves it, and a value that then forks (RMSNorm's
# ``x * rsqrt(mean(x^2))``) would be reduced twice.
# Dropout too: a partial sum is not sharded, so every rank draws the same mask from the shared
# generator (``passes/lower_dropout.py``), and ``sum_r m * p_r = m * sum_r p_r``.
PARTIAL_LINEAR = {aten.add: 2, aten.add_: 2, aten.sub: 2, aten.alias: 1, aten.clone: 1, aten.contiguous: 1, aten.dropout: 1}


def _partial_ok(node: Node, parts: list[Node], tins: list[Node]) -> bool:
    """Is ``node`` a sum (or copy) of tensors, at least one of them a partial sum?

    Then the result is a partial sum too: ``P + P -> P``, and ``P + R -> P`` where rank 0
    alone adds the replicated operand (the analysis asks for it as ``P``: ``OneRankShare``).
    ``P + 1.0`` is not: every rank would add the number to its partial sum, and the
    all-reduce would count it world-size times."""
    n = PARTIAL_LINEAR.get(getattr(node.target, "overloadpacket", None))
    if n is None:
        return False
    if node.target.overloadpacket == aten.add_ and len(node.args[0].users) != 1:
        return False  # in place: only where no one else reads the tensor it writes (Falcon's branch sum)
    operands = list(node.args[:n]) + [node.kwargs[k] for k in ("other",) if k in node.kwargs]
    return (len(operands) == n and all(isinstance(a, Node) and a in tins for a in operands)
            and set(operands) == set(tins))


def rule_pointwise(ctx: Ctx, node: Node) -> Decision:
    """Elementwise ops with broadcasting.

    S(d) op S(d) -> S(d) (same chunks); S(d) op R -> S(d), slicing R locally when it
    is full-size along d (free) and passing it through when it broadcasts there.
    P op P -> P and P op R -> P (R added on rank 0 only) for add/sub, and copies; anything
    else with a P input (P + 1.0, P * P, P / R, relu(P) ...) all-reduces it first.  On a padded shard the op must keep
    the padding finite (``rules.padding``), or the rule refuses.
    """
    tins = tensor_inputs(node)
    out_nd = len(ctx.shape(node))
    pls = {x: ctx.pl(x) for x in tins}
    shards = {x: p for x, p in pls.items() if isinstance(p, Shard)}
    parts = [x for x, p in pls.items() if isinstance(p, Partial)]
    if not shards and parts:
        if _partial_ok(node, parts, tins):
            joins = "" if len(parts) == len(tins) else "; replicated operand added on rank 0 only"
            return Decision(P, {x: P for x in tins}, why="sum of partial sums" + joins)
        return Decision(R, {x: R for x in tins}, why="needs the full value: all-reduce")
    if not shards:
        return Decision(R, {x: R for x in tins}, why="replicated")
    # Align every shard to the output's dims (broadcasting adds leading dims).
    out_pl = None
    for x, p in shards.items():
        q = Shard(p.dim + out_nd - len(ctx.shape(x)), p.chunks)
        if out_pl is None:
            out_pl = q
        elif q != out_pl:
            raise Unsupported(f"operands sharded differently: {out_pl} vs {q}")
    ins: dict[Node, Placement] = {}
    for x in tins:
        if x in shards:
            ins[x] = shards[x]
            continue
        shp = ctx.shape(x)
        d = out_pl.dim - (out_nd - len(shp))
        if d >= 0 and shp[d] != 1:
            ins[x] = Shard(d, out_pl.chunks)  # full-size replicated operand: take our slice (free)
        else:
            ins[x] = R  # broadcasts along the sharded dim
    padded = [x for x, p in shards.items() if ctx.padded(x, p) and x not in ctx.real_padding]
    if not padded:
        return Decision(out_pl, ins, why="pointwise on the shard")
    along = {x for x, p in ins.items() if isinstance(p, Shard)}
    # a sliced operand's padding is zero unless it is computed from a parameter that maps 0 elsewhere
    contrib = {x: ctx.pad_of(x) if x in shards or x in along else FINITE for x in tins}
    state = pointwise_state(node, contrib, along)
    if state == BAD:
        x = padded[0]
        raise Unsupported(f"{node.target} would make the padding of an uneven shard ({ctx.padding_of(x, shards[x])})"
                          f" {NAMES[BAD]}", culprits=padded)
    return Decision(out_pl, ins, why="pointwise on the shard", pad=state)

