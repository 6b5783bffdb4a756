"""Plan: what is sharded, which collectives run, how many bytes each rank holds.

Computed from the analysis alone (one process, no ranks), so a user can read it
before anything is sharded.  ``summary()`` is a text table; ``to_json()`` gives

* ``parameters``: ``{name: {placement, global_shape, local_shape, role}}``
* ``collectives``: ``[{op, phase, shape, dtype, bytes, at, why}]`` per forward
  (and per backward when training)
* ``memory``: ``{param_bytes_per_rank, param_bytes_total, param_bytes_replicated}``
* ``replicated``: layers the analysis left whole, and why.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from .placements import Replicate, Shard, local_size
from .rules import linear_weight


def _shape_str(s) -> str:
    return "x".join(str(int(v)) for v in s)


@dataclass
class Plan:
    world_size: int
    parameters: dict[str, dict]
    collectives: list[dict]
    memory: dict[str, int]
    replicated: dict[str, str] = field(default_factory=dict)
    analysis_rounds: int = 0

    def counts(self, phase: str = "forward") -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.collectives:
            if c["phase"] == phase:
                out[c["op"]] = out.get(c["op"], 0) + 1
        return out

    def to_json(self, **kw) -> str:
        return json.dumps({
            "world_size": self.world_size,
            "parameters": self.parameters,
            "collectives": self.collectives,
            "memory": self.memory,
            "replicated": self.replicated,
        }, **kw)

    def summary(self) -> str:
        lines = [f"autotp plan: world_size={self.world_size}"]
        w = max([len(n) for n in self.parameters] + [9])
        lines.append(f"{'parameter':<{w}}  {'placement':<14} {'global':>14} {'local':>14}  role")
        for name, p in self.parameters.items():
            lines.append(f"{name:<{w}}  {p['placement']:<14} {_shape_str(p['global_shape']):>14} "
                         f"{_shape_str(p['local_shape']):>14}  {p['role']}")
        for phase in ("forward", "backward"):
            cs = [c for c in self.collectives if c["phase"] == phase]
            counts = ", ".join(f"{k} x{v}" for k, v in sorted(self.counts(phase).items())) or "none"
            total = sum(c["bytes"] for c in cs)
            lines.append(f"collectives per {phase}: {counts} ({total / 2**20:.2f} MiB)")
        for c in self.collectives:
            if c["phase"] == "forward":
                lines.append(f"  {c['op']:<10} {_shape_str(c['shape']):>16} {c['dtype']:<8} at {c['at']}")
        m = self.memory
        lines.append(f"parameter bytes per rank: {m['param_bytes_per_rank']:,} of {m['param_bytes_total']:,} "
                     f"({m['param_bytes_per_rank'] / max(m['param_bytes_total'], 1):.1%}; "
                     f"{m['param_bytes_replicated']:,} replicated)")
        if self.replicated:
            lines.append("left replicated:")
            for name, why in self.replicated.items():
                lines.append(f"  {name}: {why}")
        return "\n".join(lines)


def _nbytes(shape, dtype) -> int:
    return int(math.prod(shape)) * torch.empty((), dtype=dtype).element_size()


def build_plan(analysis) -> Plan:
    gm, n = analysis.graph_module, analysis.world_size
    roles: dict[str, str] = {}
    for node, dec in analysis.decisions.items():
        if dec.role:
            found = linear_weight(node)
            w = found[1] if found else node.args[0]
            if w.op == "get_attr":
                roles.setdefault(w.target, dec.role.replace("row_bias", "row"))
    parameters: dict[str, dict] = {}
    per_rank = total = replicated = 0
    seen = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in seen:
            continue
        seen.add(node.target)
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        pl = analysis.param_placements.get(node.target, Replicate())
        shape = tuple(int(s) for s in val.shape)
        local = list(shape)
        if isinstance(pl, Shard):
            local[pl.dim] = local_size(shape[pl.dim], n, pl.chunks)
        nb, lb = _nbytes(shape, val.dtype), _nbytes(local, val.dtype)
        total += nb
        per_rank += lb
        if not isinstance(pl, Shard):
            replicated += nb
        parameters[node.target] = {"placement": repr(pl), "global_shape": list(shape), "local_shape": local,
                                   "role": roles.get(node.target, "replicated" if not isinstance(pl, Shard) else "sharded"),
                                   "dtype": str(val.dtype).replace("torch.", "")}
    collectives = []
    seen_edges = set()
    for red in analysis.redistributions:
        key = (red.src, red.kind, red.to, red.frm)
        if key in seen_edges:
            continue
        seen_edges.add(key)
        val = red.src.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        shape = [int(s) for s in val.shape]
        entry = lambda op, phase: {"op": op, "phase": phase, "shape": shape, "dtype": str(val.dtype).replace("torch.", ""),
                                   "bytes": _nbytes(shape, val.dtype), "at": red.src.name,
                                   "why": f"{red.frm} -> {red.to}"}
        grad = red.src in analysis.needs_grad
        if red.kind == "all_reduce":
            collectives.append(entry("all_reduce", "forward"))
        elif red.kind == "all_gather":
            collectives.append(entry("all_gather", "forward"))
        elif red.kind == "copy" and grad:
            collectives.append(entry("all_reduce", "backward"))
        elif red.kind == "slice" and grad:
            collectives.append(entry("all_gather", "backward"))
    for node, dec in analysis.decisions.items():
        if dec.role == "vocab_ce":
            rows = int(node.args[0].meta["val"].shape[0])
            dtype = "float32"
            smoothing = (node.args[5] if len(node.args) > 5 else node.kwargs.get("label_smoothing", 0.0)) or 0.0
            for shape, why in (([rows], "max of the logits"),
                               ([rows, 3 if smoothing else 2], "target logit + sum of exp")):
                collectives.append({"op": "all_reduce", "phase": "forward", "shape": shape, "dtype": dtype,
                                    "bytes": _nbytes(shape, torch.float32), "at": node.name,
                                    "why": f"vocab-parallel cross-entropy: {why}"})
        if dec.role == "row_bias":
            val = node.meta["val"]
            shape = [int(s) for s in val.shape]
            collectives.append({"op": "all_reduce", "phase": "forward", "shape": shape,
                                "dtype": str(val.dtype).replace("torch.", ""), "bytes": _nbytes(shape, val.dtype),
                                "at": node.name, "why": "P -> R (row-parallel output, before its bias)"})
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    names = {node.name: i for node, i in order.items()}
    collectives.sort(key=lambda c: (c["phase"] != "forward", names.get(c["at"], 0)))
    replicated_layers = {}
    for node, why in analysis.demoted.items():
        if analysis.decisions.get(node) is not None and analysis.decisions[node].role:
            continue  # demoted as a column seed, but ended up row-parallel (or vocab)
        found = linear_weight(node)
        name = found[1].target if found else (node.args[0].target if node.args and hasattr(node.args[0], "target") else node.name)
        replicated_layers[name] = why
    return Plan(n, parameters, collectives,
                {"param_bytes_per_rank": per_rank, "param_bytes_total": total, "param_bytes_replicated": replicated},
                replicated_layers, analysis.rounds)
