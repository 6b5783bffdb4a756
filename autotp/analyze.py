"""Placement analysis: seeds from dataflow patterns, propagation by per-op rules, fixpoint.

The analysis runs in rounds.  Each round propagates placements through the whole
graph in topological order, starting from

* every user input ``Replicate``;
* every *column seed* -- a linear whose weight is a 2-D parameter
  (``find_linear_seeds``) -- producing ``Shard(-1, chunks)``;
* every *vocab seed* -- an embedding looked up with user-provided ids
  (``find_vocab_embeddings``) -- producing ``Partial``.

Rules (``autotp.rules``) carry shards through pointwise ops, views, attention and
so on, and turn a shard on a linear's contracted dim into a row-parallel linear
(``Partial`` output).  Where a rule cannot keep a shard, the round records a
failure naming the seeds the shard came from; those seeds are demoted (or, when
only the chunk layout was too coarse, refined) and the next round starts.  A
round with no failure is the answer.  Seeds whose shard is *meant* to leave
the sharded region (the LM head: a vocab projection whose logits are returned)
are not demoted: the shard is gathered where it is first needed whole.

The result is an ``Analysis``: a decision per node (its placement, why, its
role) and the placement change on every edge that needs one, named by
``runtime.REDISTRIBUTIONS`` kind.  ``plan.build_plan`` turns it into the
``Plan`` -- the record lowering applies and users read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from .patterns import (embedding_table, from_user_input, get_attr, grouped_weight, is_tensor_node, linear_weight,
                       mutated_args, output_leaves, output_node, param_of, param_slice, param_view_keeps_zero,
                       tensor_inputs, write_visible)
from .copies import merge_copies
from .explain import explain_whole_weights
from .placements import Partial, Placement, Replicate, Shard
from .rules import Ctx, Decision, Unsupported, rule_for
from .rules.padding import FINITE, ZERO
from .runtime import REDISTRIBUTIONS, redistribution_chain
from .sequence_regions import fuse_exits, place_sequence_regions, sequence_chain

R = Replicate()
MAX_ROUNDS = 32


@dataclass
class Redistribution:
    """One placement change on the edge ``src -> consumer``; ``kind`` is a key of
    ``runtime.REDISTRIBUTIONS`` (``all_reduce`` P->R, ``all_gather`` S->R, ``slice`` R->S,
    ``copy`` R entering sharded compute).  An edge may need a chain of them (P->R->S)."""

    src: Node
    consumer: Node
    frm: Placement
    to: Placement
    kind: str


@dataclass
class Failure:
    node: Node
    origins: frozenset
    reason: str
    chunk_factor: int | None


@dataclass
class Analysis:
    graph_module: GraphModule
    world_size: int
    decisions: dict[Node, Decision]
    placements: dict[Node, Any]
    param_placements: dict[str, Placement]
    redistributions: list[Redistribution]
    column_seeds: dict[Node, int]
    vocab_seeds: set[Node]
    demoted: dict[Node, str] = field(default_factory=dict)
    needs_grad: set[Node] = field(default_factory=set)
    output_placements: list = field(default_factory=list)  # each flat output as returned
    kept_whole: dict[str, str] = field(default_factory=dict)  # parameter -> why it is held whole though sliced
    reduced: set[Node] = field(default_factory=set)  # partial sums all-reduced once, at their source (forks)
    sequence: dict[Node, Placement] = field(default_factory=dict)  # sequence-parallel regions (sequence_regions)
    sequence_kept: dict[Node, str] = field(default_factory=dict)  # at a region's edge, left as it was: why


def _is_floating(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _escape_ok(seed: Node, tied: set[str], at_output: bool) -> bool:
    """May this seed's shard leave the sharded region (gathered where first needed whole)?

    A weight shared with a vocab-parallel embedding (a tied LM head) may, anywhere; a
    widening projection (an untied LM head) may when its shard is gathered only to be
    returned.  Both are worth a gather for the memory they save; anything else is not.
    """
    found = linear_weight(seed)
    if found is None:
        return False
    _, w, w_out, w_in = found
    shape = w.meta["val"].shape
    return w.target in tied or (at_output and shape[w_out] > shape[w_in])


def _propagate(ctx: Ctx, gm: GraphModule, tied: set[str]):
    pl = ctx.placements
    pl.clear()
    decisions: dict[Node, Decision] = {}
    origins: dict[Node, frozenset] = {}
    failures: list[Failure] = []

    ctx.reduced.clear()
    ctx.pad_state.clear()

    def shard_origins(xs):
        out = frozenset()
        for x in xs:
            if isinstance(ctx.pl(x), (Shard, list)):
                out |= origins.get(x, frozenset())
        return out

    n_inputs = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            pl[node] = ctx.input_placements.get(n_inputs, R) if is_tensor_node(node) else None
            n_inputs += 1
            continue
        if node.op == "get_attr":
            pl[node] = None
            continue
        if node.op == "output":
            ins = {}
            for i, x in enumerate(pytree.tree_leaves(node.args[0])):
                if not is_tensor_node(x):
                    continue
                p = pl.get(x)
                local = i in ctx.local_outputs
                if isinstance(p, Shard) and not local:
                    bad = frozenset(o for o in origins.get(x, ()) if not _escape_ok(o, tied, at_output=True))
                    if bad:
                        failures.append(Failure(node, bad, "a sharded value reaches the output", None))
                if p is not None:
                    ins[x] = p if (isinstance(p, Shard) and (local or not ctx.gather_outputs)) else R
            decisions[node] = Decision(None, ins, why="outputs are replicated" if ctx.gather_outputs else
                                       "outputs: partial sums reduced, shards left local")
            continue
        if param_of(node) is not None:
            # computed from a parameter alone: placed where it is read, like the parameter itself
            # (the reader asks for a slice of the parameter, and each rank computes its slice)
            decisions[node] = Decision(None, {}, why="computed from a parameter alone: placed where it is read")
            pl[node] = None
            if not param_view_keeps_zero(node):
                ctx.pad_state[node] = FINITE  # exp(0) = 1: an uneven shard's zero padding becomes nonzero
            continue
        try:
            try:
                dec = rule_for(node)(ctx, node)
            except Unsupported:
                raise
            except Exception as crash:  # a rule's own bug must not become the user's: replicate, and say why
                if ctx.strict:
                    raise ValueError(f"strict=True and the placement rule for {node.format_node()} failed: "
                                     f"{type(crash).__name__}: {crash}") from crash
                raise Unsupported(f"the placement rule for {node.target} failed "
                                  f"({type(crash).__name__}: {crash})") from crash
            if any(ctx.pl(x) is not None and dec.inputs.get(x, ctx.pl(x)) != ctx.pl(x) and write_visible(x, node)
                   for x in mutated_args(node)):
                raise Unsupported("a tensor written in place would be redistributed (the write would land in a copy)")
        except Unsupported as e:
            tins = tensor_inputs(node)
            orig = shard_origins(e.culprits if e.culprits is not None else tins)
            bad = frozenset(o for o in orig if not _escape_ok(o, tied, at_output=False))
            if bad or e.chunk_factor:
                failures.append(Failure(node, bad if not e.chunk_factor else orig, e.reason, e.chunk_factor))
            vals = node.meta.get("val")
            out = [R] * len(vals) if isinstance(vals, (list, tuple)) else R
            dec = Decision(out, {x: R for x in tins}, why=f"replicated: {e.reason}")
        if dec.out is not None:  # (not a metadata check) a parameter a rule read without placing it: whole
            placed = {found[0] for y in dec.inputs if (found := param_of(y)) is not None}
            for x in tensor_inputs(node):
                if (found := param_of(x)) is not None and found[0] not in placed:
                    dec.inputs[x] = R
        decisions[node] = dec
        pl[node] = dec.out
        pad = dec.pad if dec.pad is not None else max(
            (ctx.pad_of(x) for x in tensor_inputs(node) if isinstance(ctx.pl(x), Shard)), default=ZERO)
        if pad != ZERO:
            ctx.pad_state[node] = pad
        if isinstance(dec.out, Partial) and len(node.users) > 1:
            ctx.reduced.add(node)  # forks: reduce once here rather than once per branch
        if dec.role == "column" or dec.role == "vocab":
            origins[node] = frozenset([node])
        else:
            origins[node] = shard_origins(tensor_inputs(node))
    return decisions, failures


def find_linear_seeds(gm: GraphModule, *, world_size: int) -> list[Node]:
    """Column-parallel candidates: every matmul with a 2-D parameter operand, found from dataflow::

        y = linear(x, W[out, in], b)        # nn.Linear
        y = addmm(b, x, W[in, out])         # HF Conv1D (GPT-2)
        y = mm(x, t(W)) / matmul(x, W)
        y = grouped_mm(x, W[E, in, out], offsets)  # every expert of a mixture

    The fixpoint keeps a candidate only if its shard flows to a row-parallel linear (or, for
    a vocab projection, to where the logits are needed whole).  Module names are never read.
    """
    seeds = []
    for node in gm.graph.nodes:
        found = linear_weight(node) or grouped_weight(node)  # a grouped matmul: every expert's linear
        if found is not None and found[1].meta["val"].shape[found[2]] >= world_size:
            seeds.append(node)
    return seeds


def find_vocab_embeddings(gm: GraphModule, *, world_size: int) -> list[Node]:
    """Vocab-parallel candidates: ``h = embedding(E[V, H], ids)`` with ids from a user input.

    Through views or casts only: position ids computed with ``arange`` do not qualify.  Of
    those, a table shared with a linear (a tied LM head) qualifies, and so does the
    vocabulary: the largest table looked up with user ids, with at least as many rows as
    columns.  Small tables (BERT's token types), or a position table when the caller passes
    position ids (as ``generate`` does), stay replicated: their all-reduce per call would
    cost more than the memory it saves.
    """
    shared = {lw[1].target for n in gm.graph.nodes if (lw := linear_weight(n)) is not None}
    found = []
    for node in gm.graph.nodes:
        w = embedding_table(node)
        if w is None or not from_user_input(node.args[1]):
            continue
        rows, cols = w.meta["val"].shape
        if rows >= world_size:
            found.append((node, w.target, rows, cols))
    largest = max((rows for _, _, rows, _ in found), default=0)
    return [node for node, target, rows, cols in found if target in shared or (rows == largest and rows >= cols)]


def analyze(gm: GraphModule, world_size: int, *, strict: bool = False, gather_outputs: bool = True,
            input_placements: dict[int, Placement] | None = None,
            local_outputs: set[int] | frozenset = frozenset(), sequence_parallel: bool = False) -> Analysis:
    """Seed, run the fixpoint and record the placement changes. See the module docstring.

    ``input_placements`` declares the placement of flat graph inputs by position (default
    ``Replicate``): a KV cache passed back in holds each rank's heads, ``Shard(1)``.
    ``local_outputs`` lists flat output positions returned as each rank's shard (the KV
    cache going out) rather than gathered.  ``sequence_parallel``: place the regions between
    blocks on ``Shard(seq)`` (``autotp.sequence_regions``).
    """
    ctx = Ctx(world_size, {})
    ctx.strict = strict
    ctx.gather_outputs = gather_outputs
    ctx.input_placements = dict(input_placements or {})
    ctx.local_outputs = frozenset(local_outputs)
    ctx.column_seeds = {s: 1 for s in find_linear_seeds(gm, world_size=world_size)}
    ctx.vocab_seeds = set(find_vocab_embeddings(gm, world_size=world_size))
    vocab_weights = {n.args[0].target for n in ctx.vocab_seeds}
    demoted: dict[Node, str] = {}
    ctx_kept: dict[str, str] = {}
    bumps: dict[Node, int] = {}
    for _ in range(MAX_ROUNDS):
        tied = {n.args[0].target for n in ctx.vocab_seeds} & vocab_weights
        decisions, failures = _propagate(ctx, gm, tied)
        if not failures:
            break
        for f in failures:
            if f.chunk_factor and all(o in ctx.column_seeds and bumps.get(o, 0) < 3 for o in f.origins) and f.origins:
                for o in f.origins:
                    ctx.column_seeds[o] *= f.chunk_factor
                    bumps[o] = bumps.get(o, 0) + 1
                continue
            for o in f.origins:
                if o in ctx.column_seeds or o in ctx.vocab_seeds:
                    demoted[o] = f"{f.reason} (at {f.node.name})"
                ctx.column_seeds.pop(o, None)
                ctx.vocab_seeds.discard(o)
    else:
        raise AssertionError("placement analysis did not converge")  # each round demotes or refines

    if strict and demoted:
        lines = "\n".join(f"  {n.name}: {why}" for n, why in demoted.items())
        raise ValueError(f"strict=True and these layers cannot be sharded:\n{lines}")

    for node in [n for n in demoted if grouped_weight(n) is not None]:  # named by their 3-D weight
        demoted_why = demoted.pop(node)
        if decisions[node].role is None:  # not row-parallel after all
            ctx_kept[grouped_weight(node)[1].target] = demoted_why
    region, region_kept = place_sequence_regions(ctx, gm, decisions) if sequence_parallel else ({}, {})
    analysis = Analysis(gm, world_size, decisions, dict(ctx.placements), {}, [], dict(ctx.column_seeds),
                        set(ctx.vocab_seeds), demoted, reduced=set(ctx.reduced), kept_whole=ctx_kept, sequence=region,
                        sequence_kept=region_kept)
    _record_redistributions(analysis)
    for r in analysis.redistributions:  # no round could avoid it (a declared input): refuse, never a lost write
        if r.src in mutated_args(r.consumer) and write_visible(r.src, r.consumer):
            raise ValueError(f"{r.consumer.format_node()} writes in place into {r.src.name}, which would need a "
                             f"{r.kind} ({r.frm} -> {r.to}): the write would land in a copy. Declare that input "
                             f"with the placement the write needs, or keep the model's cache dynamic")
    merge_copies(analysis)
    if region:
        fuse_exits(analysis)
    explain_whole_weights(analysis)
    out = output_node(gm)
    analysis.output_placements = [
        None if not is_tensor_node(x) else _as_returned(decisions[out].inputs.get(x, analysis.placements.get(x)))
        for x in output_leaves(gm)]
    return analysis


def _as_returned(p):
    return R if isinstance(p, Partial) else p


def _needs_grad(gm: GraphModule) -> set[Node]:
    """Nodes whose value requires grad in training: derived from a floating parameter that
    requires grad (the sharded module's parameters keep the model's ``requires_grad``)."""
    out: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = get_attr(gm, node.target)
            if _is_floating(node) and isinstance(t, torch.nn.Parameter) and t.requires_grad:
                out.add(node)
        elif node.op == "call_function" and any(x in out for x in node.all_input_nodes):
            val = node.meta.get("val")
            if _is_floating(node) or isinstance(val, (list, tuple)):
                out.add(node)
    return out


def _record_redistributions(a: Analysis) -> None:
    pl = a.placements
    a.needs_grad = _needs_grad(a.graph_module)
    requests: dict[Node, list[tuple[Node, Node, Placement]]] = {}
    for node, dec in a.decisions.items():
        out_sharded = isinstance(dec.out, (Shard, Partial)) or (
            isinstance(dec.out, list) and any(isinstance(p, (Shard, Partial)) for p in dec.out))
        for x, req in dec.inputs.items():
            found = param_of(x)
            if found is not None:
                base, perm = found
                if isinstance(req, Partial):
                    # a whole parameter joining a partial sum on rank 0 (a row bias): its gradient is
                    # the replicated gradient of the sum, so no ``copy`` (whose backward all-reduces)
                    a.redistributions.append(Redistribution(x, node, R, req, "to_partial"))
                    requests.setdefault(base, []).append((node, x, R, R, False))
                    continue
                assert not isinstance(req, Shard) or perm[req.dim] is not None, f"{node.name} shards a size-1 dim"
                base_req = Shard(perm[req.dim], req.chunks) if isinstance(req, Shard) else R
                requests.setdefault(base, []).append((node, x, base_req, req, out_sharded))
                continue
            act = pl.get(x)
            if act is None:
                continue
            _edge(a, x, node, act, req, out_sharded)
    for base, reqs in requests.items():
        wanted = {r[2] for r in reqs}
        parts = [param_slice(r[1]) for r in reqs]
        if any(parts):
            pieces = _pieces(base, reqs, parts, a.world_size)
            if pieces is not None:  # the parts of a fused weight, each placed as its linear wants
                a.param_placements[base.target] = pieces
                for node, x, base_req, _, out_sharded in reqs:
                    if base_req == R and out_sharded and _is_floating(x):
                        a.redistributions.append(Redistribution(x, node, R, R, "copy"))
                continue
            wanted = wanted | {R} if len(wanted) == 1 and isinstance(next(iter(wanted)), Shard) else wanted
        if len(wanted) == 1:
            a.param_placements[base.target] = wanted.pop()
            if a.param_placements[base.target] == R:
                for node, x, _, req, out_sharded in reqs:
                    if out_sharded and _is_floating(x):
                        a.redistributions.append(Redistribution(x, node, R, R, "copy"))
            continue
        # Used both whole and sharded (rare): keep it whole, slice where a shard is wanted.
        a.param_placements[base.target] = R
        a.kept_whole[base.target] = (f"wanted as {sorted(map(repr, wanted))} by different ops: held whole, sliced "
                                     "where a shard is needed (compute stays split, memory does not)")
        for node, x, _, req, out_sharded in reqs:
            _edge(a, x, node, R, req, out_sharded)


def _pieces(base: Node, reqs: list, parts: list, world: int) -> Shard | None:
    """The placement of a parameter read only in parts (``slice(W, d, a, b)``, one per linear of a split
    fused weight), each part sharded along ``d`` or whole: ``Shard(d, pieces=...)``, or ``None`` when the
    parts overlap, miss rows, are read along different dims or with other shards (then it is held whole)."""
    if not all(parts) or len({p[1] for p in parts}) != 1:
        return None
    d = parts[0][1]
    runs: dict[tuple[int, int], set] = {}
    for (_, _, base_req, _, _), (_, _, start, stop) in zip(reqs, parts):
        runs.setdefault((start, stop), set()).add(base_req)
    edge, pieces = 0, []
    for (start, stop), want in sorted(runs.items()):
        if start != edge or len(want) != 1:
            return None
        p = want.pop()
        if isinstance(p, Shard) and (p.dim != d or p.chunks != 1 or (stop - start) % world):
            return None
        pieces.append((stop - start, isinstance(p, Shard)))
        edge = stop
    if edge != base.meta["val"].shape[d] or not any(sharded for _, sharded in pieces):
        return None
    return Shard(d, pieces=tuple(pieces))


def _edge(a: Analysis, x: Node, node: Node, act: Placement, req: Placement, out_sharded: bool) -> None:
    if isinstance(act, Partial) and isinstance(req, Partial):
        if x not in a.reduced:
            return  # a partial sum read as one (add of partial sums)
        # A fork's partial sum is all-reduced once at its source (in place, its one reader): the
        # other branches read the reduced value, rank 0 adding it to their sums.
        act = Replicate()
        chain = [("all_reduce", Partial(), act)] + redistribution_chain(act, req)
    else:
        chain = redistribution_chain(act, req)
    if req == R and out_sharded and _is_floating(x) and (not chain or chain[-1][2] == R):
        # a replicated value enters sharded compute: its gradient is partial.  Also when it was made
        # whole just before (an all-reduce or all-gather straight into a column linear, with no norm
        # between): neither's backward sums the readers' partial gradients
        chain = chain + [("copy", R, R)]
    if a.sequence:
        chain = sequence_chain(a, x, node, chain)
    for kind, frm, to in chain:
        assert kind in REDISTRIBUTIONS, kind
        a.redistributions.append(Redistribution(x, node, frm, to, kind))
