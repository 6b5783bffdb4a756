"""insert_redistributions: put the analysis' placement changes into the graph.

    y = row_linear(x_S, W_r)          y = row_linear(x_S, W_r)
    z = layer_norm(y, ...)      ->    y_R = AllReduce(y)              # P -> R
                                      z = layer_norm(y_R, ...)

One node per (value, chain of placement changes), shared by every consumer that
needs the same change: q, k and v of one attention read one ``CopyToRegion``
of the normed input, so the backward all-reduces its gradient once.
"""
from __future__ import annotations

from collections import defaultdict

from torch.fx import GraphModule, Node

from autotp.runtime import AllGather, AllReduce, CopyToRegion, LocalSlice

from .base import PassResult


def _module(red, src: Node, group):
    if red.kind == "all_reduce":
        return AllReduce(group)
    if red.kind == "copy":
        return CopyToRegion(group)
    if red.kind == "all_gather":
        return AllGather(red.frm.dim, red.frm.chunks, int(src.meta["val"].shape[red.frm.dim]), group)
    if red.kind == "slice":
        return LocalSlice(red.to.dim, red.to.chunks, group)
    raise AssertionError(red.kind)


def insert_redistributions(gm: GraphModule, *, analysis, group, **_) -> PassResult:
    chains: dict[tuple[Node, Node], list] = defaultdict(list)
    for red in analysis.redistributions:
        chains[(red.src, red.consumer)].append(red)
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    cache: dict[tuple, Node] = {}
    for (src, consumer), chain in chains.items():
        cur, key = src, (src,)
        for red in chain:
            key = key + ((red.kind, red.to),)
            if key not in cache:
                name = f"autotp_{red.kind}_{len(cache)}"
                gm.add_submodule(name, _module(red, cur if red.kind != "all_gather" else src, group))
                # after every placeholder: inputs must stay the graph's leading nodes
                with gm.graph.inserting_after(last_input if cur.op == "placeholder" else cur):
                    new = gm.graph.call_module(name, (cur,))
                new.meta["val"] = src.meta.get("val")
                new.meta["autotp"] = {"placement": red.to, "why": f"{red.kind}: {red.frm} -> {red.to}"}
                cache[key] = new
            cur = cache[key]
        consumer.replace_input_with(src, cur)
    return PassResult(gm, bool(cache))
