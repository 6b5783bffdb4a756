"""Why a weight stayed whole: a reason for every weight of two or more dims the analysis left
unsharded, for ``plan.replicated`` (``analyze`` calls it last, on its ``Analysis``)."""
from __future__ import annotations

import torch
from torch.fx import Node

from .patterns import embedding_table, linear_weight, param_of
from .placements import Shard

__all__ = ["explain_whole_weights"]


def _weight_users(w: Node) -> list[Node]:
    """The ops that read parameter ``w``, through the views that only reorder its dims."""
    out = []
    for u in w.users:
        if u.target is torch.ops.aten._assert_tensor_metadata.default:
            continue  # a metadata check reads nothing
        found = param_of(u) if u.op == "call_function" else None
        out += _weight_users(u) if found is not None and found[0] is w else [u]
    return out


def explain_whole_weights(a) -> None:
    """Give every weight of two or more dims that stays whole a reason in ``kept_whole`` (and so in
    ``plan.replicated``), unless a demoted seed already explains it: a reader learns what was not
    sharded, sharded exactly or not, without diffing parameter lists."""
    explained = set(a.kept_whole)
    for node in a.demoted:
        found = linear_weight(node)
        w = found[1] if found else (node.args[0] if node.args else None)
        if isinstance(w, Node):
            explained.add(w.target)
    for w in a.graph_module.graph.nodes:
        val = w.meta.get("val")
        if (w.op != "get_attr" or not isinstance(val, torch.Tensor) or val.dim() < 2 or w.target in explained
                or isinstance(a.param_placements.get(w.target), Shard)):
            continue
        why = []
        for u in _weight_users(w):
            found = linear_weight(u)
            if found is not None and found[1] is w:
                n_out = val.shape[found[2]]
                why.append(f"a linear with {n_out} output features, fewer than world_size ({a.world_size})"
                           if n_out < a.world_size else f"a linear ({u.name}) whose input and output stay whole")
            elif embedding_table(u) is w:
                why.append(f"an embedding lookup ({u.name}) not split by vocab (ids computed, not the user's, or "
                           "a table smaller than the vocabulary's)")
            else:
                why.append(f"read whole by {getattr(u.target, '__name__', u.target)} ({u.name}): no rule shards "
                           "a weight read this way")
        a.kept_whole[w.target] = "; ".join(dict.fromkeys(why)) or "not read by the captured graph"
