"""The planned graph as a networkx ``DiGraph``: what the dumps draw and the report tabulates.

``planned_graph(plan)`` builds it from the plan alone (``Plan.graph``, ``Plan.nodes``,
``Plan.steps``, ``Plan.collectives``)::

    input_ids ──▶ embedding ──▶ ... ──▶ addmm (row, P) ──▶ [all_reduce P -> R] ──▶ add ──▶ ...
                     ▲                    ▲
          transformer.wte.weight   h.0.attn.c_proj.weight (S(0))

Node attributes: ``kind`` (``input`` / ``parameter`` / ``op`` / ``output`` / ``collective``),
``op``, ``shape``, ``local_shape`` (one rank's), ``dtype``, ``placement`` (``"R"``, ``"S(1)"``,
``"P"``; ``None`` where the analysis decided nothing), ``role``, ``why``, ``module`` (the
``nn_module_stack`` path), ``block``, ``bytes`` / ``local_bytes``.  Every redistribution step
is a node of its own between the value it reads and its consumers (``redistribution``:
``all_reduce`` / ``all_gather`` / ``copy`` / ``slice``; ``forward_op`` / ``backward_op``:
the collective each phase issues, ``None`` for none); a collective inside a lowered op
(the vocab-parallel cross-entropy's) hangs off that op.

What networkx is used for: ``blocks`` groups nodes by transformer block, ``block_hash`` is
the Weisfeiler-Lehman hash of a block's subgraph labelled by op, shapes and placements
(never by names), so ``identical_blocks`` finds the repeated layers, and
``replication_path`` answers "why is this parameter replicated" with the dataflow path
from it to the op that could not keep its shard.
"""
from __future__ import annotations

import math
import re
import warnings

import networkx as nx

from .placements import Partial, Replicate, Shard, local_size
from .runtime import REDISTRIBUTIONS

__all__ = ["planned_graph", "blocks", "block_hash", "block_hashes", "identical_blocks", "replication_path", "placement_kind",
           "local_shape", "nbytes", "VIEW_OPS"]

# Matches ops whose output aliases their input (no new memory): not counted as activations.
VIEW_OPS = frozenset(f"aten.{op}" for op in (
    "view.default", "_unsafe_view.default", "reshape.default", "permute.default", "transpose.int", "t.default",
    "expand.default", "slice.Tensor", "select.int", "unsqueeze.default", "squeeze.dim", "squeeze.default",
    "alias.default", "split.Tensor", "split_with_sizes.default", "unbind.int", "detach.default",
    "as_strided.default", "unflatten.int", "flatten.using_ints", "numpy_T.default")) | {"getitem"}

_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
                "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}


def placement_kind(pl) -> str | None:
    """``"shard"``, ``"partial"``, ``"replicate"`` or ``None`` (a split's list: its first tensor's)."""
    if isinstance(pl, (list, tuple)):
        pl = next((p for p in pl if p is not None), None)
    return {Shard: "shard", Partial: "partial", Replicate: "replicate"}.get(type(pl))


def _first(pl):
    return next((p for p in pl if p is not None), None) if isinstance(pl, (list, tuple)) else pl


def _dim_hint(d) -> int:
    """A dim as an int; a dynamic dim (its symbol's name) counts as 1."""
    return d if isinstance(d, int) else 1


def local_shape(shape, pl, world: int):
    """One rank's shape of a value of ``shape`` placed ``pl`` (padded up where uneven)."""
    pl = _first(pl)
    if shape is None or not isinstance(pl, Shard):
        return shape
    out = list(shape)
    d = pl.dim % len(out)
    if isinstance(out[d], int):
        out[d] = local_size(out[d], world, pl.chunks, pl.pieces)
    return tuple(out)


def nbytes(shape, dtype: str | None) -> int:
    if shape is None or dtype is None:
        return 0
    return int(math.prod(_dim_hint(d) for d in shape)) * _DTYPE_BYTES.get(dtype, 4)


def planned_graph(plan) -> nx.DiGraph:
    """The plan's dataflow graph with one node per value and one per redistribution (see the module docstring)."""
    if not plan.graph and (plan.steps or plan.nodes):
        raise ValueError("this plan carries no graph (Plan.graph is empty: made by hand or by an older autotp); "
                         "make it again with autotp.plan to draw it")
    g = nx.DiGraph(world_size=plan.world_size)
    world = plan.world_size
    by_target = {p.target: p for p in plan.parameters.values()}
    for n in plan.graph:
        decision = plan.nodes.get(n.name)
        pl = decision.placement if decision is not None else None
        kind = {"placeholder": "input", "get_attr": "parameter", "output": "output"}.get(n.op, "op")
        param = by_target.get(n.target) if kind == "parameter" else None
        if param is not None:
            pl = param.placement
        local = local_shape(n.shape, pl, world)
        g.add_node(n.name, kind=kind, op=n.target if kind == "op" else n.op, target=n.target, shape=n.shape, local_shape=local, dtype=n.dtype,
                   placement=_repr(pl), placement_kind=placement_kind(pl),
                   role=(param.role if param is not None else decision.role if decision is not None else None),
                   why=decision.why if decision is not None else None, module=n.module, block=n.block,
                   parameter=param.name if param is not None else None,
                   bytes=nbytes(n.shape, n.dtype), local_bytes=nbytes(local, n.dtype))
        for x in n.inputs:
            g.add_edge(x, n.name)
    # a parameter belongs to the block of its users when they all are in one
    for name, data in g.nodes(data=True):
        if data["kind"] == "parameter" and data["block"] is None:
            users = {g.nodes[u]["block"] for u in g.successors(name)}
            if len(users) == 1:
                data["block"] = users.pop()
    _add_collectives(g, plan)
    return g


def _repr(pl) -> str | None:
    if pl is None:
        return None
    if isinstance(pl, (list, tuple)):
        return "[" + ", ".join(repr(p) for p in pl) + "]"
    return repr(pl)


def _add_collectives(g: nx.DiGraph, plan) -> None:
    planned = {}
    for c in plan.collectives:
        planned.setdefault((c.at, c.kind, repr(c.frm), repr(c.to), c.phase), c)
    for s in plan.steps:
        src = g.nodes[s.src]
        consumers = list(s.consumers) or [u for u in g.successors(s.src) if u != s.name]
        red = REDISTRIBUTIONS[s.kind]
        fwd = planned.get((s.src, s.kind, repr(s.frm), repr(s.to), "forward"))
        bwd = planned.get((s.src, s.kind, repr(s.frm), repr(s.to), "backward"))
        block = src["block"]  # a redistribution belongs where the value it reads is made
        g.add_node(s.name, kind="collective", op=s.kind, redistribution=s.kind, forward_op=red.forward,
                   backward_op=red.backward if bwd is not None else None, change=f"{s.frm} -> {s.to}",
                   shape=src["shape"], local_shape=(fwd or bwd).local_shape if (fwd or bwd) else src["local_shape"],
                   dtype=src["dtype"], placement=repr(s.to), placement_kind=placement_kind(s.to), role=None,
                   why=fwd.why if fwd else bwd.why if bwd else f"{s.frm} -> {s.to}", module=src["module"],
                   block=block, parameter=None, bytes=src["bytes"],
                   local_bytes=nbytes(fwd.local_shape, src["dtype"]) if fwd else 0, inside=False)
        g.add_edge(s.reads, s.name)
        for c in consumers:
            if g.has_edge(s.src, c):
                g.remove_edge(s.src, c)
            g.add_edge(s.name, c)
    for i, c in enumerate(x for x in plan.collectives if x.kind is None and x.phase == "forward"):
        name = f"{c.at}_{c.op}_{i}"
        at = g.nodes[c.at]
        g.add_node(name, kind="collective", op=c.op, redistribution=None, forward_op=c.op, backward_op=None,
                   change="inside the op", shape=c.shape, local_shape=c.local_shape, dtype=at["dtype"],
                   placement="R", placement_kind="replicate", role=None, why=c.why, module=at["module"],
                   block=at["block"], parameter=None, bytes=c.bytes, local_bytes=c.bytes, inside=True)
        g.add_edge(c.at, name)


def blocks(g: nx.DiGraph) -> dict[str, list[str]]:
    """``{block: [node, ...]}`` in graph order, for the nodes that belong to a transformer block."""
    out: dict[str, list[str]] = {}
    for name, data in g.nodes(data=True):
        if data.get("block"):
            out.setdefault(data["block"], []).append(name)
    return out


def _label(data: dict) -> str:
    return "|".join(str(data.get(k)) for k in ("kind", "op", "shape", "local_shape", "dtype", "placement", "role",
                                               "forward_op", "backward_op"))


def block_hash(g: nx.DiGraph, nodes: list[str], iterations: int = 4) -> str:
    """The Weisfeiler-Lehman hash of the subgraph ``nodes`` induced in ``g``, nodes labelled by
    kind, op, shapes, dtype, placement and role (names and module paths are not read)."""
    sub = nx.DiGraph()
    for n in nodes:
        sub.add_node(n, label=_label(g.nodes[n]))
    sub.add_edges_from((a, b) for a, b in g.subgraph(nodes).edges)
    with warnings.catch_warnings():  # networkx 3.5 notes that directed hashes changed; ours are compared within one run
        warnings.simplefilter("ignore", UserWarning)
        return nx.weisfeiler_lehman_graph_hash(sub, node_attr="label", iterations=iterations)


def block_hashes(g: nx.DiGraph) -> dict[str, str]:
    """``{block: block_hash}`` for every transformer block, in graph order."""
    return {block: block_hash(g, nodes) for block, nodes in blocks(g).items()}


def identical_blocks(g: nx.DiGraph, hashes: dict[str, str] | None = None) -> list[list[str]]:
    """The transformer blocks grouped by ``block_hash`` (``hashes``: ``block_hashes(g)`` if already
    made), each group in graph order (a group of one: a block unlike any other); groups ordered
    by their first block."""
    groups: dict[str, list[str]] = {}
    for block, h in (block_hashes(g) if hashes is None else hashes).items():
        groups.setdefault(h, []).append(block)
    return list(groups.values())


_AT = re.compile(r"\(at ([A-Za-z0-9_]+)\)\s*$")


def replication_path(g: nx.DiGraph, parameter: str, why: str) -> list[str]:
    """The dataflow path from ``parameter`` to the op named in ``why`` (the analysis ends a
    demotion's reason with ``(at node)``): where its shard would have gone and could not be
    kept.  ``[]`` when the reason names no node or the node is not reachable."""
    found = _AT.search(why or "")
    start = next((n for n, d in g.nodes(data=True) if d.get("parameter") == parameter), None)
    if found is None or start is None or found.group(1) not in g:
        return []
    try:
        return nx.shortest_path(g, start, found.group(1))
    except nx.NetworkXNoPath:
        return []
