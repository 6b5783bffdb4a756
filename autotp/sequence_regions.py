"""Sequence parallelism's placement pass: the regions between blocks on ``Shard(seq)`` (issue 15).

After the fixpoint, the values between a row-parallel output and the next column-parallel
input (residual adds, norms, dropouts) are replicated -- or partial sums, until the all-reduce
that makes them whole.  With ``ShardConfig(sequence_parallel=True)`` this pass re-places them
along the sequence, Megatron-LM's sequence parallelism (Korthikanti et al., 2022)::

    o = row_linear(..)      P                 o = row_linear(..)            P
    h = x + o               P                 h = x + reduce_scatter(o)     S(seq)
    n = layer_norm(all_reduce(h))  R   ->     n = layer_norm(h)             S(seq)
    q = col_linear(copy(n))  S(-1)            q = col_linear(gather(n))     S(-1)

In graph order, a replicated or partial node joins the region when one of its inputs is in
the region or is a partial sum, and its own placement rule -- offered those inputs on
``Shard(seq)`` (``seq``: the dim before the last, ``[batch, seq, hidden]``) -- keeps a
``Shard`` output and asks for no other placement of them.  So whatever the rules can keep
sharded stays sharded (position-wise ops: pointwise, norms over the hidden dim, dropout,
casts); attention over the sequence never joins (it is in the head-sharded region, and its
rule would refuse the shard).  Nothing is pattern-matched by name.

The placement changes at the region's edges (``analyze._edge``):

* a partial sum entering it: ``reduce_scatter`` (P -> S) instead of an all-reduce;
* a replicated value entering it (a position embedding): ``slice`` (local, free);
* a value leaving it into sharded compute: ``gather_to_region`` (S -> R: all-gather forward,
  reduce-scatter backward) instead of an all-gather; also through replicated ops that feed
  only sharded compute (GPT-2's ``view(-1, H)`` before its ``addmm``) -- ``fuse_exits``;
* into anything else: an all-gather (S -> R).

A partial sum read by several nodes (the residual stream) is reduce-scattered once at its
source when every reader joins; otherwise it stays all-reduced there, and the readers in the
region slice it.  A parameter the region reads (a norm's weight) gets a ``copy``: its gradient
sums every rank's sequence shard.  Uneven lengths are padded like uneven widths.
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from .copies import GradientPaths, grad_input
from .patterns import (grouped_weight, is_tensor_node, linear_weight, mutated_args, param_of, tensor_inputs,
                       write_visible)
from .placements import Partial, Replicate, Shard
from .rules import Ctx, Unsupported, rule_for
from .sequence import SequenceSlice  # noqa: F401  (importing it adds the region's kinds to REDISTRIBUTIONS)

R = Replicate()

__all__ = ["place_sequence_regions", "sequence_chain", "fuse_exits"]


def _seq_dim(x: Node) -> int | None:
    val = x.meta.get("val")
    return val.dim() - 2 if getattr(val, "dim", lambda: 0)() >= 2 else None


def _floating(x: Node) -> bool:
    val = x.meta.get("val")
    return is_tensor_node(x) and not isinstance(val, (list, tuple)) and val.dtype.is_floating_point


def place_sequence_regions(ctx: Ctx, gm: GraphModule, decisions: dict) -> tuple[dict[Node, Shard], dict[Node, str]]:
    """Re-place the regions between blocks on ``Shard(seq)`` (see the module docstring); returns
    each region node's placement, and why each node at a region's edge stayed as it was.  Updates
    ``decisions``, ``ctx.placements``, ``ctx.reduced`` and ``ctx.real_padding`` in place (a region
    value's padding copies a real row, so no padding state is tracked for it)."""
    pl = ctx.placements
    region: dict[Node, Shard] = {}
    kept: dict[Node, str] = {}
    ctx.real_padding = set()  # every value in the region, and every entry, pads by copying a real row
    for node in gm.graph.nodes:
        dec = decisions.get(node)
        if (node.op != "call_function" or dec is None or dec.role is not None or param_of(node) is not None
                or not (dec.out == R or isinstance(dec.out, Partial)) or not _floating(node)):
            continue
        if linear_weight(node) is not None or grouped_weight(node) is not None:
            if any(x in region for x in tensor_inputs(node)):
                kept[node] = ("a linear with a whole weight: it reads the gathered input the column-parallel linears "
                              "beside it read")
            continue
        offered = {}
        for x in tensor_inputs(node):
            if x in region:
                offered[x] = region[x]
            elif isinstance(pl.get(x), Partial) and _seq_dim(x) is not None:
                offered[x] = Shard(_seq_dim(x))  # reduce-scattered on entry
        if not offered or (isinstance(dec.out, Partial) and not any(x in region or x in ctx.reduced for x in offered)
                           and (len(offered) > 1 or any(x.meta["val"].dim() != node.meta["val"].dim() for x in offered)
                                or _sums_fresh_partials(ctx, decisions, node))):
            continue  # fresh partial sums stay partial through sums and reshapes: reduce-scattered once, after
        trial = _trial(ctx, node, offered, region)
        if isinstance(trial, str):
            kept[node] = trial
            continue
        region[node] = trial.out
        ctx.real_padding |= {node, *offered}
        trial.why = f"sequence-parallel: {trial.why}"
        decisions[node] = trial
        pl[node] = trial.out
        ctx.reduced.discard(node)
    for x in [x for x in ctx.reduced if any(u in region for u in x.users)]:
        readers = [u for u in x.users if (d := decisions.get(u)) is not None and x in d.inputs]
        if all(u in region for u in readers):
            ctx.reduced.discard(x)  # reduce-scattered once, at the source
    return region, kept


def _sums_fresh_partials(ctx: Ctx, decisions: dict, node: Node) -> bool:
    """Does partial ``node`` reach (through one-input ops that keep it partial) a sum with another
    partial sum not yet reduced?  (GPT-NeoX's parallel residual: ``dropout(attn) + dropout(mlp)``
    is reduce-scattered once, summed, not once per branch.)"""
    for u in node.users:
        if u in ctx.reduced or not isinstance(decisions.get(u) and decisions[u].out, Partial):
            continue
        ins = tensor_inputs(u)
        if sum(isinstance(ctx.placements.get(x), Partial) and x not in ctx.reduced for x in ins) > 1:
            return True
        if len(ins) == 1 and _sums_fresh_partials(ctx, decisions, u):
            return True
    return False


def _trial(ctx: Ctx, node: Node, offered: dict, region: dict):
    """The node's decision with ``offered`` placements on its inputs, if it keeps them and a
    ``Shard`` output; else why not."""
    pl = ctx.placements
    saved = {x: pl.get(x) for x in offered}
    real = ctx.real_padding
    ctx.real_padding = real | set(offered)
    saved_reduced = {x for x in offered if x in ctx.reduced}
    pl.update(offered)
    ctx.reduced.difference_update(saved_reduced)
    try:
        dec = rule_for(node)(ctx, node)
    except Unsupported as e:
        return f"not on a sequence shard: {e.reason}"
    except Exception as e:  # a rule's own failure on an unusual input: the node stays as it was
        return f"not on a sequence shard: its placement rule failed ({type(e).__name__}: {e})"
    finally:
        ctx.real_padding = real
        pl.update(saved)
        ctx.reduced.update(saved_reduced)
    out = dec.out
    if not isinstance(out, Shard) or out.chunks != 1 or out.pieces or dec.role is not None:
        return f"its rule places its output {out!r} ({dec.why}), not on a sequence shard"
    if any(dec.inputs.get(x, p) != p for x, p in offered.items()) or any(
            isinstance(p, Partial) for p in dec.inputs.values()):
        return f"its rule asks for its inputs otherwise ({dec.why})"
    if any(isinstance(p, Shard) and param_of(x) is not None for x, p in dec.inputs.items()):
        # (a parameter's shard pads with zeros, not with a copy of its last row: the padding checks would apply)
        return "it would shard a parameter along the sequence"
    if any(x not in region and write_visible(x, node) for x in mutated_args(node)):
        return "it writes in place into a tensor outside the region (the write would land in a copy)"
    return dec


def sequence_chain(a, x: Node, consumer: Node, chain: list) -> list:
    """The chain of placement changes on ``x -> consumer`` with the region's collectives fused:
    ``all_reduce + slice`` into it becomes ``reduce_scatter`` (``sequence_slice`` after a fork's
    all-reduce), a ``slice`` into it ``sequence_slice``, ``all_gather + copy`` out of it
    ``gather_to_region``."""
    if consumer in a.sequence and x not in a.sequence and chain and chain[-1][0] == "slice":
        if len(chain) == 2 and chain[0][0] == "all_reduce" and x not in a.reduced:
            return [("reduce_scatter", chain[0][1], chain[1][2])]
        return chain[:-1] + [("sequence_slice", R, chain[-1][2])]
    return chain


def fuse_exits(a) -> None:
    """Out of the region, ``all_gather + copy`` into sharded compute becomes ``gather_to_region``:
    all-gather forward, reduce-scatter backward (the gradient reaching it is each rank's partial
    sum).  So does an all-gather into replicated ops that feed only sharded compute (GPT-2's
    ``view(-1, H)`` before its column-parallel ``addmm``), the ``copy`` steps that ended those
    paths dropped.  Only where every exit of the value is such: if replicated compute also reads
    it (a linear kept whole, Llama's k/v projections at more ranks than KV heads), its gradient
    there is whole, not partial -- the value is all-gathered once and the copies stay."""
    paths = GradientPaths(a)
    exits: dict[Node, list] = {}
    for (src, consumer), chain in paths.chains.items():
        if src in a.sequence and consumer not in a.sequence and chain[0].kind == "all_gather":
            exits.setdefault(src, []).append(chain)
    fused, drop = [], set()
    for src, chains in exits.items():
        plan = []
        for chain in chains:
            c = chain[0].consumer
            if len(chain) == 2 and chain[1].kind == "copy":
                plan.append((chain[0], [chain[1]]))
            elif len(chain) == 1 and paths.into_sharded(c) and grad_input(a, c) is src:
                plan.append((chain[0], paths.copies_below(c)))
            else:
                break
        else:
            fused += [gather for gather, _ in plan]
            drop |= {id(c) for _, copies in plan for c in copies}
    for gather in fused:
        gather.kind = "gather_to_region"
    a.redistributions = [r for r in a.redistributions if id(r) not in drop]
