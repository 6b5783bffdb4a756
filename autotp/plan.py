"""Plan: what is sharded and which collectives run -- the record lowering applies.

``build_plan`` turns an ``Analysis`` into a ``Plan`` once; lowering (``passes/``)
reads nothing else, so what the plan says is what runs.  A plan is computed in
one process, before any rank exists, and is typed data:

* ``parameters``: ``{name: ParamPlan}`` -- placement (a ``Placement``), global and
  local shape, dtype, role (``column`` / ``row`` / ``vocab`` / ``sharded`` / ``replicated``);
* ``nodes``: ``{node name: NodePlan}`` -- every analyzed node's placement, role and
  the local data its lowering needs;
* ``steps``: ``[Step]`` -- every redistribution lowering inserts, one graph node each,
  named as lowering will name it;
* ``collectives``: ``[Collective]`` -- every collective one forward and one backward
  issue at run time, in order: the steps' collectives (from ``runtime.REDISTRIBUTIONS``)
  and those inside lowered ops (a row-parallel linear's all-reduce before its bias, the
  vocab-parallel cross-entropy's two); ``tests/test_plan_contract.py`` checks this list
  against what ``CommDebugMode`` counts on every model case.  Two checks run once and are
  not listed: ranks agreeing on the plan at ``shard`` time and on the inputs at the first
  call (two small all-reduces each);
* ``outputs``: the placement each flat output is returned with;
* ``memory`` and ``replicated`` (layers left whole, and why);
* ``graph``: ``[GraphNode]`` -- the captured graph as plain data (op, inputs, shape, dtype,
  module path, transformer block), what the pictures of ``Plan.dump`` draw.

``summary()`` is a text table; ``to_json()`` is a view of the same data::

    {"world_size": int,
     "parameters": {name: {"placement": "R" | "P" | "S(d)" | "S(d,chunks=k)", "global_shape": [int],
                           "local_shape": [int], "role": str, "dtype": str}},
     "collectives": [{"op": "all_reduce" | "all_gather", "reduce": "sum" | "max" | null,
                      "phase": "forward" | "backward", "kind": str | null, "change": "P -> R" | ...,
                      "at": node, "consumers": [node], "shape": [int | str], "local_shape": [int | str],
                      "dtype": str, "bytes": int, "why": str}],
     "memory": {"param_bytes_per_rank": int, "param_bytes_total": int, "param_bytes_replicated": int},
     "replicated": {parameter: why}}

``shape`` is the logical (global) value's, ``local_shape`` what each rank sends; a
dynamic dim is its symbol's name (``"s0"``), and ``bytes`` counts it at the example size.

``dump(dir)`` writes ``plan.json`` (a superset of ``to_json``, with a ``schema_version``;
schema in ``autotp/report.py``), ``graph.dot`` / ``graph.svg`` and ``plan.html``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .loss import vocab_ce_collectives
from .patterns import block_of, linear_weight
from .patterns import size_hint as _size_hint
from .placements import Placement, Replicate, Shard, local_size
from .runtime import REDISTRIBUTIONS

__all__ = ["Plan", "ParamPlan", "NodePlan", "Step", "Collective", "GraphNode", "build_plan"]


@dataclass
class ParamPlan:
    """A parameter (or buffer) as sharded: ``name`` as the user's model names it, ``target``
    the attribute of the captured graph that holds it (the same unless a wrapper added a prefix)."""

    name: str
    target: str
    placement: Placement
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    dtype: torch.dtype
    role: str

    def to_dict(self) -> dict:
        return {"placement": repr(self.placement), "global_shape": list(self.global_shape),
                "local_shape": list(self.local_shape), "role": self.role, "dtype": _dtype_str(self.dtype)}


@dataclass(frozen=True)
class NodePlan:
    """One node's decision: its output placement (a list for a split), why, its role
    (``column`` / ``row`` / ``vocab`` / ``vocab_ce``) and local data its lowering
    needs (``size_dim``: the shape entry to make local; ``split_dim``; ``local_arg``: the argument
    holding the sharded dim's global size, a convolution's ``groups``)."""

    placement: Any
    why: str
    role: str | None = None
    local_args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """A redistribution lowering inserts: the module ``REDISTRIBUTIONS[kind]`` builds, as node ``name``.

    It reads ``reads`` (the value ``src``, or the previous step of a chain such as P -> R -> S)
    and replaces ``src`` in ``consumers``.  (A row-parallel linear's bias needs no step of its
    own: it joins the partial sum on rank 0, ``to_partial``.)
    """

    name: str
    kind: str
    src: str
    reads: str
    consumers: tuple[str, ...]
    frm: Placement
    to: Placement
    global_size: int = 0  # the gathered dim's global size (an all-gather trims padding to it)


@dataclass(frozen=True)
class Collective:
    op: str
    phase: str
    kind: str | None
    frm: Placement | None
    to: Placement | None
    at: str
    consumers: tuple[str, ...]
    shape: tuple
    local_shape: tuple
    dtype: torch.dtype
    bytes: int
    why: str
    reduce: str = "sum"

    @property
    def change(self) -> str:
        return f"{self.frm} -> {self.to}" if self.frm is not None else "inside the op"

    def to_dict(self) -> dict:
        return {"op": self.op, "reduce": self.reduce, "phase": self.phase, "kind": self.kind, "change": self.change,
                "at": self.at, "consumers": list(self.consumers), "shape": list(self.shape),
                "local_shape": list(self.local_shape), "dtype": _dtype_str(self.dtype), "bytes": self.bytes,
                "why": self.why}


@dataclass(frozen=True)
class GraphNode:
    """One node of the captured graph as the plan's pictures draw it: ``op`` the fx opcode,
    ``target`` the aten op (``aten.linear.default``) or the attribute / input read, ``inputs``
    the nodes it reads, ``module`` the innermost module path that made it (``nn_module_stack``),
    ``block`` the transformer block (``patterns.block_of``)."""

    name: str
    op: str
    target: str
    inputs: tuple[str, ...]
    shape: tuple | None
    dtype: str | None
    module: str | None
    block: str | None


@dataclass
class Plan:
    world_size: int
    parameters: dict[str, ParamPlan]
    collectives: list[Collective]
    memory: dict[str, int]
    replicated: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, NodePlan] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    outputs: list = field(default_factory=list)
    graph: list[GraphNode] = field(default_factory=list)
    fusions: list[dict] = field(default_factory=list)  # lowering's kernel swaps (LoweringContext.fused)
    # sequence parallelism: {"nodes": the values on a sequence shard, "kept": {node: why it stayed as it was}}
    sequence: dict = field(default_factory=dict)

    def node(self, n) -> NodePlan | None:
        """The decision for fx node ``n`` (``None`` for nodes lowering added)."""
        return self.nodes.get(n.name)

    def fingerprint(self) -> int:
        """A 63-bit hash of what ranks must agree on: every collective (op, phase, shapes, dtype, in
        order) and every parameter's placement and shapes."""
        text = repr([(c.op, c.reduce, c.phase, c.shape, c.local_shape, str(c.dtype)) for c in self.collectives]
                    + [(n, repr(p.placement), p.global_shape, p.local_shape) for n, p in self.parameters.items()])
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1

    def counts(self, phase: str = "forward") -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.collectives:
            if c.phase == phase:
                out[c.op] = out.get(c.op, 0) + 1
        return out

    def to_json(self, **kw) -> str:
        return json.dumps({
            "world_size": self.world_size,
            "parameters": {n: p.to_dict() for n, p in self.parameters.items()},
            "collectives": [c.to_dict() for c in self.collectives],
            "memory": self.memory,
            "replicated": self.replicated,
            **({"sequence": self.sequence} if self.sequence else {}),
        }, **kw)

    def dump(self, directory, *, expand: bool = False) -> dict[str, str]:
        """Write ``plan.json``, ``graph.dot``, ``graph.svg`` (when Graphviz's ``dot`` is installed)
        and ``plan.html`` (one self-contained page) into ``directory``; identical transformer
        blocks are drawn once, "x N", unless ``expand``.  Returns ``{file: path}`` of what was
        written (and ``"note"`` when a file was skipped).  See ``autotp/report.py``."""
        from .report import dump_plan

        return dump_plan(self, directory, expand=expand)

    def summary(self) -> str:
        lines = [f"autotp plan: world_size={self.world_size}"]
        w = max([len(n) for n in self.parameters] + [9])
        lines.append(f"{'parameter':<{w}}  {'placement':<14} {'global':>14} {'local':>14}  role")
        for name, p in self.parameters.items():
            lines.append(f"{name:<{w}}  {repr(p.placement):<14} {_shape_str(p.global_shape):>14} "
                         f"{_shape_str(p.local_shape):>14}  {p.role}")
        for phase in ("forward", "backward"):
            cs = [c for c in self.collectives if c.phase == phase]
            counts = ", ".join(f"{k} x{v}" for k, v in sorted(self.counts(phase).items())) or "none"
            total = sum(c.bytes for c in cs)
            lines.append(f"collectives per {phase}: {counts} ({total / 2**20:.2f} MiB)")
        for c in self.collectives:
            if c.phase == "forward":
                lines.append(f"  {c.op:<10} {_shape_str(c.shape):>16} {_dtype_str(c.dtype):<8} at {c.at}")
        m = self.memory
        lines.append(f"parameter bytes per rank: {m['param_bytes_per_rank']:,} of {m['param_bytes_total']:,} "
                     f"({m['param_bytes_per_rank'] / max(m['param_bytes_total'], 1):.1%}; "
                     f"{m['param_bytes_replicated']:,} replicated)")
        if self.fusions:
            kinds: dict[str, int] = {}
            for f in self.fusions:
                kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
            lines.append("fused kernels (this rank's lowering): " + ", ".join(f"{k} x{v}" for k, v in kinds.items()))
        if self.sequence:
            kept = self.sequence["kept"]
            lines.append(f"sequence-parallel: {len(self.sequence['nodes'])} values between blocks on a sequence shard"
                         + (f"; {len(kept)} at a region's edge left as they were:" if kept else ""))
            lines += [f"  {name}: {why}" for name, why in kept.items()]
        if self.replicated:
            lines.append("left replicated:")
            for name, why in self.replicated.items():
                lines.append(f"  {name}: {why}")
        return "\n".join(lines)


def _shape_str(s) -> str:
    return "x".join(str(v) for v in s)


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dim(s):
    """A dim as an int, or a dynamic dim as its symbol's name."""
    if isinstance(s, int):
        return s
    known = s.node.maybe_as_int() if isinstance(s, torch.SymInt) else int(s)
    return int(known) if known is not None else str(s)


def _shape(val) -> tuple:
    return tuple(_dim(s) for s in val.shape)


def _local(shape: tuple, val, pl: Placement, world: int) -> tuple:
    if not isinstance(pl, Shard):
        return shape
    out = list(shape)
    out[pl.dim] = local_size(_size_hint(val.shape[pl.dim]), world, pl.chunks, pl.pieces)
    return tuple(out)


def _nbytes(shape, dtype: torch.dtype) -> int:
    return int(math.prod(_size_hint(s) for s in shape)) * dtype.itemsize


def _steps(analysis) -> list[Step]:
    """One step per distinct (value, chain of changes) prefix: q, k and v of one attention read
    one ``copy`` of the normed input, so its gradient is all-reduced once."""
    chains: dict[tuple, list] = {}
    for red in analysis.redistributions:
        chains.setdefault((red.src, red.consumer), []).append(red)
    made: dict[tuple, dict] = {}
    for (src, consumer), chain in chains.items():
        key, reads = (src,), src.name
        for red in chain:
            key = key + ((red.kind, red.to),)
            if key not in made:
                size = int(_size_hint(src.meta["val"].shape[red.frm.dim])) if isinstance(red.frm, Shard) else 0
                made[key] = dict(name=f"autotp_{red.kind}_{len(made)}", kind=red.kind, src=src.name, reads=reads,
                                 consumers=[], frm=red.frm, to=red.to, global_size=size)
            reads = made[key]["name"]
        made[key]["consumers"].append(consumer.name)
    return [Step(**{**s, "consumers": tuple(s["consumers"])}) for s in made.values()]


def _collectives(analysis, steps: list[Step], recompute_blocks: bool, regather: bool = False) -> list[Collective]:
    world = analysis.world_size
    by_name = {n.name: n for n in analysis.graph_module.graph.nodes}
    order = {name: i for i, name in enumerate(by_name)}
    out = []
    for s in steps:
        src = by_name[s.src]
        val = src.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        kind = REDISTRIBUTIONS[s.kind]
        shape = _shape(val)
        phases = [("forward", kind.forward)]
        if src in analysis.needs_grad:
            phases.append(("backward", kind.backward))
        for phase, op in phases:
            if op is None:
                continue
            # what each rank sends: a gather (forward) sends its shard, a slice's backward its gradient slice
            sent = s.frm if (op == "all_gather" and phase == "forward") else s.to if op == "all_gather" else None
            why = f"{s.frm} -> {s.to}"
            out.append(Collective(op, phase, s.kind, s.frm, s.to, s.src, s.consumers, shape,
                                  _local(shape, val, sent, world) if sent is not None else shape,
                                  val.dtype, _nbytes(val.shape, val.dtype), why))
        if (regather and s.kind == "gather_to_region" and src in analysis.needs_grad
                and not (recompute_blocks and block_of(src) is not None)):
            out.append(Collective("all_gather", "backward", s.kind, s.frm, s.to, s.src, s.consumers, shape,
                                  _local(shape, val, s.frm, world), val.dtype, _nbytes(val.shape, val.dtype),
                                  f"{s.frm} -> {s.to} gathered again: the linears kept its sequence shard"))
    for node, dec in analysis.decisions.items():
        if dec.role != "vocab_ce":
            continue
        rows = node.args[0].meta["val"].shape[0]
        smoothing = (node.args[5] if len(node.args) > 5 else node.kwargs.get("label_smoothing", 0.0)) or 0.0
        for reduce, sizes, why in vocab_ce_collectives(rows, smoothing):
            shape = tuple(_dim(x) for x in sizes)
            out.append(Collective("all_reduce", "forward", None, None, None, node.name, (), shape, shape,
                                  torch.float32, _nbytes(sizes, torch.float32),
                                  f"vocab-parallel cross-entropy: {why}", reduce=reduce))
    if recompute_blocks:  # activation checkpointing: a block's forward collectives run again in backward
        out += [Collective(c.op, "backward", c.kind, c.frm, c.to, c.at, c.consumers, c.shape, c.local_shape, c.dtype,
                           c.bytes, f"{c.why} (recomputed: activation checkpointing)", c.reduce)
                for c in out if c.phase == "forward" and by_name[c.at] in analysis.needs_grad
                and block_of(by_name[c.at]) is not None]
    # forward in graph order; backward runs the graph in reverse
    out.sort(key=lambda c: (c.phase != "forward", order[c.at] * (1 if c.phase == "forward" else -1)))
    return out


def _parameters(analysis, names: dict[str, str]) -> tuple[dict[str, ParamPlan], dict[str, int]]:
    gm, world = analysis.graph_module, analysis.world_size
    roles: dict[str, str] = {}
    for node, dec in analysis.decisions.items():
        if dec.role:
            found = linear_weight(node)
            w = found[1] if found else node.args[0]
            if w.op == "get_attr":
                roles.setdefault(w.target, dec.role)
    params: dict[str, ParamPlan] = {}
    per_rank = total = replicated = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr" or names.get(node.target, node.target) in params:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        pl = analysis.param_placements.get(node.target, Replicate())
        shape = tuple(int(s) for s in val.shape)
        local = _local(shape, val, pl, world)
        nb, lb = _nbytes(shape, val.dtype), _nbytes(local, val.dtype)
        total += nb
        per_rank += lb
        if not isinstance(pl, Shard):
            replicated += nb
        role = roles.get(node.target, "sharded" if isinstance(pl, Shard) else "replicated")
        name = names.get(node.target, node.target)
        params[name] = ParamPlan(name, node.target, pl, shape, local, val.dtype, role)
    return params, {"param_bytes_per_rank": per_rank, "param_bytes_total": total, "param_bytes_replicated": replicated}


def build_plan(analysis, param_names: dict[str, str] | None = None, *, recompute_blocks: bool = False,
               regather: bool = False) -> Plan:
    """The ``Plan`` of an ``Analysis`` (see the module docstring).

    ``param_names`` maps graph attributes to the names the plan reports (default: the same);
    ``recompute_blocks``: activation checkpointing will recompute each transformer block in
    backward, so the block's forward collectives are listed again there; ``regather``: a
    sequence-parallel gather's output is kept as its shard and gathered again in backward
    (``sequence.regather_in_backward``; eager only)."""
    params, memory = _parameters(analysis, param_names or {})
    by_target = {p.target: p for p in params.values()}
    steps = _steps(analysis)
    nodes = {n.name: NodePlan(d.out, d.why, d.role, dict(d.local_args)) for n, d in analysis.decisions.items()}
    for n in analysis.graph_module.graph.nodes:
        if n.op == "get_attr" and n.target in by_target:
            nodes[n.name] = NodePlan(by_target[n.target].placement, "parameter")
        elif n.op == "placeholder" and analysis.placements.get(n) is not None:
            nodes[n.name] = NodePlan(analysis.placements[n], "graph input")
    replicated_layers = {}
    for node, why in analysis.demoted.items():
        if analysis.decisions.get(node) is not None and analysis.decisions[node].role:
            continue  # demoted as a column seed, but ended up row-parallel (or vocab)
        found = linear_weight(node)
        name = found[1].target if found else (node.args[0].target if node.args and hasattr(node.args[0], "target")
                                              else node.name)
        replicated_layers[(param_names or {}).get(name, name)] = why
    for target, why in analysis.kept_whole.items():
        replicated_layers.setdefault((param_names or {}).get(target, target), why)
    sequence = {"nodes": [n.name for n in analysis.sequence],
                "kept": {n.name: why for n, why in analysis.sequence_kept.items()}} if analysis.sequence else {}
    return Plan(analysis.world_size, params, _collectives(analysis, steps, recompute_blocks, regather), memory,
                replicated_layers, nodes, steps, list(analysis.output_placements),
                _graph_nodes(analysis.graph_module), sequence=sequence)


def _graph_nodes(gm) -> list[GraphNode]:
    out = []
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        tensor = isinstance(val, torch.Tensor)
        stack = list((n.meta.get("nn_module_stack") or {}).values())
        module = (stack[-1][0] if isinstance(stack[-1], tuple) else str(stack[-1])) if stack else None
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        if n.op == "call_function" and hasattr(n.target, "_schema"):
            target = f"aten.{n.target.__name__}"  # (overload packet.overload: linear.default)
        out.append(GraphNode(n.name, n.op, target, tuple(x.name for x in n.all_input_nodes),
                             _shape(val) if tensor else None, _dtype_str(val.dtype) if tensor else None,
                             module, block_of(n)))
    return out
