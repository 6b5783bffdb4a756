"""What ``Plan.dump(dir)`` (and ``AUTOTP_DUMP=dir``) writes, and the schema of ``plan.json``.

* ``plan.json`` -- ``plan_document(plan)``: the plan's typed content, ``SCHEMA`` below
  (a JSON Schema, checked by ``validate``);
* ``graph.dot`` and, when Graphviz's ``dot`` is installed, ``graph.svg`` -- nodes coloured by
  placement, collectives drawn as red octagons, clustered by transformer block, identical
  blocks drawn once "x N" (``autotp/render.py``);
* ``plan.html`` -- one self-contained page (no network): per-block table, the graph, a memory
  bar per rank, collective byte totals, a search box.

Byte counts are at the example inputs' sizes.  ``message_bytes`` is what one rank sends in a
collective (its ``local_shape``), ``bytes`` the whole logical value.  Activation bytes count
every tensor an op of the forward materializes (inputs included, views not) at one rank's
local shape: ``activation_bytes`` all of them (an upper bound: what a backward could keep),
``activation_peak_bytes`` the most alive at once in graph order, each freed after its last
reader (an inference forward).  Ranks hold equal local shapes (uneven dims are padded).  In
the plan of a dynamic capture a dynamic dim is its symbol's name (``"s0"``) in shapes; the
byte counts of this file take it as 1 (``Plan.collectives[].bytes``: at the example size).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

from .graph import VIEW_OPS, block_hashes, blocks, identical_blocks, nbytes, planned_graph, replication_path

__all__ = ["SCHEMA", "SCHEMA_VERSION", "plan_document", "validate", "dump_plan", "dump_if_asked"]

SCHEMA_VERSION = 2  # 2: reduce_scatter collectives and the "sequence" record (sequence parallelism)

_INT = {"type": "integer", "minimum": 0}
_SHAPE = {"type": "array", "items": {"type": ["integer", "string"]}}
_STR_OR_NULL = {"type": ["string", "null"]}
_PHASES = {"type": "string", "enum": ["forward", "backward"]}
_OPS = {"type": "string", "enum": ["all_reduce", "all_gather", "reduce_scatter"]}


def _obj(required: dict, optional: dict | None = None) -> dict:
    return {"type": "object", "required": sorted(required), "properties": {**required, **(optional or {})},
            "additionalProperties": False}


SCHEMA = _obj({
    "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
    "world_size": {"type": "integer", "minimum": 1},
    "example_inputs": {"type": "array", "items": _obj({"name": {"type": "string"}, "shape": _SHAPE,
                                                        "dtype": {"type": "string"}})},
    "parameters": {"type": "object", "additionalProperties": _obj({
        "placement": {"type": "string"}, "global_shape": _SHAPE, "local_shape": _SHAPE,
        "role": {"type": "string", "enum": ["column", "row", "vocab", "sharded", "replicated"]},
        "dtype": {"type": "string"}, "bytes": _INT, "local_bytes": _INT, "block": _STR_OR_NULL})},
    "collectives": {"type": "array", "items": _obj({
        "op": _OPS, "reduce": {"type": "string", "enum": ["sum", "max"]}, "phase": _PHASES,
        "kind": _STR_OR_NULL, "change": {"type": "string"}, "at": {"type": "string"},
        "consumers": {"type": "array", "items": {"type": "string"}}, "shape": _SHAPE, "local_shape": _SHAPE,
        "dtype": {"type": "string"}, "bytes": _INT, "message_bytes": _INT, "why": {"type": "string"},
        "block": _STR_OR_NULL})},
    "collective_totals": {"type": "array", "items": _obj({"op": _OPS, "phase": _PHASES, "count": _INT,
                                                          "message_bytes": _INT})},
    "memory": _obj({
        "param_bytes_per_rank": _INT, "param_bytes_total": _INT, "param_bytes_replicated": _INT,
        "per_rank": {"type": "array", "items": _obj({"rank": _INT, "param_bytes": _INT, "activation_bytes": _INT,
                                                     "activation_peak_bytes": _INT})},
        "unsharded": _obj({"param_bytes": _INT, "activation_bytes": _INT, "activation_peak_bytes": _INT})}),
    "blocks": {"type": "array", "items": _obj({
        "name": {"type": "string"}, "hash": {"type": "string"}, "same_as": _STR_OR_NULL, "nodes": _INT,
        "parameters": {"type": "array", "items": {"type": "string"}}, "param_bytes_per_rank": _INT,
        "collectives": _obj({"forward": _INT, "backward": _INT}), "collective_message_bytes": _INT})},
    "replicated": {"type": "array", "items": _obj({"parameter": {"type": "string"}, "why": {"type": "string"},
                                                   "path": {"type": "array", "items": {"type": "string"}}})},
}, {
    # what this rank's lowering swapped for csrc/ kernels (empty before lowering: ``autotp.plan``)
    "fusions": {"type": "array", "items": _obj({"kind": {"type": "string"}, "at": {"type": "string"},
                                                "detail": {"type": "string"}})},
    # ShardConfig(sequence_parallel=True): the values on a sequence shard, and why those at a region's edge are not
    "sequence": _obj({"nodes": {"type": "array", "items": {"type": "string"}},
                      "kept": {"type": "object", "additionalProperties": {"type": "string"}}}),
})
"""``plan.json``'s schema (JSON Schema: ``type``, ``properties``, ``required``, ``additionalProperties``,
``items``, ``enum``, ``minimum``), checked by ``validate``.  ``blocks[].same_as`` names the first
block of identical structure (``graph.block_hash``); ``replicated[].path`` is
``graph.replication_path``.  Bump ``SCHEMA_VERSION`` on any change a reader would notice."""

_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool,
          "null": type(None)}


def validate(doc, schema: dict = SCHEMA, path: str = "$") -> list[str]:
    """Every place ``doc`` breaks ``schema``, as ``"$.memory.per_rank[0].rank: ..."`` lines ([] when valid)."""
    errors = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = any(isinstance(doc, _TYPES[t]) and not (t in ("integer", "number") and isinstance(doc, bool))
                 for t in types)
        if not ok:
            return [f"{path}: expected {' or '.join(types)}, got {type(doc).__name__} {doc!r:.60}"]
    if "enum" in schema and doc not in schema["enum"]:
        errors.append(f"{path}: {doc!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(doc, (int, float)) and doc < schema["minimum"]:
        errors.append(f"{path}: {doc} is below the minimum {schema['minimum']}")
    if isinstance(doc, dict):
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in doc]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for k, v in doc.items():
            if k in props:
                errors += validate(v, props[k], f"{path}.{k}")
            elif extra is False:
                errors.append(f"{path}: unexpected key {k!r}")
            elif isinstance(extra, dict):
                errors += validate(v, extra, f"{path}.{k}")
    if isinstance(doc, list) and "items" in schema:
        for i, v in enumerate(doc):
            errors += validate(v, schema["items"], f"{path}[{i}]")
    return errors


def _activations(g, world_sharded: bool) -> tuple[int, int]:
    """(sum, peak) of the bytes the forward's tensors hold (see the module docstring)."""
    key = "local_bytes" if world_sharded else "bytes"
    order = [n for n, d in g.nodes(data=True) if d["kind"] in ("input", "op", "output")]
    position = {n: i for i, n in enumerate(order)}
    sizes, last = {}, {}
    for n in order:
        d = g.nodes[n]
        if not d["shape"] or (d["op"] in VIEW_OPS and not _own_output(g, n, d)):
            continue
        sizes[n] = d[key]
        users = [position[u] for u in _value_readers(g, n) if u in position]
        last[n] = max(users, default=position[n])
    total = sum(sizes.values())
    alive = peak = 0
    frees: dict[int, int] = {}
    for i, n in enumerate(order):
        alive += sizes.get(n, 0)
        if n in sizes:
            frees[last[n]] = frees.get(last[n], 0) + sizes[n]
        peak = max(peak, alive)
        alive -= frees.pop(i, 0)
    return total, peak


def _own_output(g, n, d) -> bool:
    """A ``getitem`` of an op with several outputs (not of a split) is memory of its own."""
    return d["op"] == "getitem" and not any(g.nodes[p]["op"] in VIEW_OPS for p in g.predecessors(n))


def _value_readers(g, n):
    """The ops that read ``n``'s storage: through views and redistribution nodes."""
    out, todo, seen = [], list(g.successors(n)), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        d = g.nodes[u]
        out.append(u)
        if d["kind"] == "collective" or d["op"] in VIEW_OPS:
            todo.extend(g.successors(u))
    return out


def plan_document(plan, g=None) -> dict:
    """``plan.json``'s content (``SCHEMA``); ``g``: ``graph.planned_graph(plan)`` if already built."""
    g = planned_graph(plan) if g is None else g
    param_block = {d["parameter"]: d["block"] for _, d in g.nodes(data=True) if d.get("parameter")}
    params = {}
    for name, p in plan.parameters.items():
        dtype = str(p.dtype).replace("torch.", "")
        params[name] = {**p.to_dict(), "bytes": nbytes(p.global_shape, dtype),
                        "local_bytes": nbytes(p.local_shape, dtype), "block": param_block.get(name)}
    collectives, totals = [], {}
    for c in plan.collectives:
        d = c.to_dict()
        d["message_bytes"] = nbytes(c.local_shape, d["dtype"])
        d["block"] = g.nodes[c.at]["block"] if c.at in g else None
        collectives.append(d)
        t = totals.setdefault((c.op, c.phase), {"op": c.op, "phase": c.phase, "count": 0, "message_bytes": 0})
        t["count"] += 1
        t["message_bytes"] += d["message_bytes"]
    act, peak = _activations(g, True)
    act1, peak1 = _activations(g, False)
    memory = dict(plan.memory)
    memory["per_rank"] = [{"rank": r, "param_bytes": plan.memory["param_bytes_per_rank"], "activation_bytes": act,
                           "activation_peak_bytes": peak} for r in range(plan.world_size)]
    memory["unsharded"] = {"param_bytes": plan.memory["param_bytes_total"], "activation_bytes": act1,
                           "activation_peak_bytes": peak1}
    return {
        "schema_version": SCHEMA_VERSION,
        "world_size": plan.world_size,
        "example_inputs": [{"name": n, "shape": list(d["shape"]), "dtype": d["dtype"]}
                           for n, d in g.nodes(data=True) if d["kind"] == "input" and d["shape"] is not None],
        "parameters": params,
        "collectives": collectives,
        "collective_totals": sorted(totals.values(), key=lambda t: (t["phase"] != "forward", t["op"])),
        "memory": memory,
        "blocks": _blocks(g, params, collectives),
        "replicated": [{"parameter": name, "why": why, "path": replication_path(g, name, why)}
                       for name, why in plan.replicated.items()],
        "fusions": [dict(f) for f in plan.fusions],
        **({"sequence": plan.sequence} if plan.sequence else {}),
    }


def _blocks(g, params: dict, collectives: list) -> list[dict]:
    hashes = block_hashes(g)
    first = {b: group[0] for group in identical_blocks(g, hashes) for b in group}
    out = []
    for name, nodes in blocks(g).items():
        mine = [p for p, d in params.items() if d["block"] == name]
        cs = [c for c in collectives if c["block"] == name]
        out.append({"name": name, "hash": hashes[name], "same_as": first[name] if first[name] != name else None,
                    "nodes": len(nodes), "parameters": mine,
                    "param_bytes_per_rank": sum(params[p]["local_bytes"] for p in mine),
                    "collectives": {ph: sum(c["phase"] == ph for c in cs) for ph in ("forward", "backward")},
                    "collective_message_bytes": sum(c["message_bytes"] for c in cs)})
    return out


def dump_plan(plan, directory, *, expand: bool = False, dot_timeout_s: float = 120.0) -> dict[str, str]:
    """Write the files of the module docstring into ``directory`` (created); returns ``{file: path}``
    and ``"note"`` when ``graph.svg`` was skipped."""
    from .render import html_page, to_dot

    os.makedirs(directory, exist_ok=True)
    g = planned_graph(plan)
    doc = plan_document(plan, g)
    written = {}
    path = os.path.join(directory, "plan.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    written["plan.json"] = path
    path = os.path.join(directory, "graph.dot")
    with open(path, "w") as f:
        f.write(to_dot(g, doc, expand=expand))
    written["graph.dot"] = path
    svg = None
    dot = shutil.which("dot")
    if dot is None:
        written["note"] = ("graph.svg skipped: Graphviz's `dot` is not installed (Debian: apt-get install graphviz); "
                           "graph.dot is written")
    else:
        try:
            run = subprocess.run([dot, "-Tsvg", written["graph.dot"]], capture_output=True, text=True,
                                 timeout=dot_timeout_s)
            if run.returncode == 0:
                svg = run.stdout
                path = os.path.join(directory, "graph.svg")
                with open(path, "w") as f:
                    f.write(svg)
                written["graph.svg"] = path
            else:
                written["note"] = f"graph.svg skipped: dot failed: {run.stderr.strip().splitlines()[-1:]}"
        except subprocess.TimeoutExpired:
            written["note"] = f"graph.svg skipped: dot took over {dot_timeout_s:.0f} s (drop --expand)"
    path = os.path.join(directory, "plan.html")
    with open(path, "w") as f:
        f.write(html_page(doc, svg, note=written.get("note")))
    written["plan.html"] = path
    return written


def dump_if_asked(plan) -> dict[str, str] | None:
    """``Plan.dump`` into ``$AUTOTP_DUMP`` when that variable is set (``autotp.plan`` and, on rank 0,
    ``autotp.shard`` call this).  A dump that fails warns instead of raising: the model is sharded
    either way, and raising on one rank only would leave the others waiting in a collective."""
    directory = os.environ.get("AUTOTP_DUMP")
    if not directory:
        return None
    try:
        return dump_plan(plan, directory)
    except Exception as e:  # reported, never fatal (see above)
        import warnings

        warnings.warn(f"AUTOTP_DUMP={directory}: could not write the plan's dump ({type(e).__name__}: {e}); "
                      "unset AUTOTP_DUMP or point it at a writable directory", stacklevel=3)
        return None
