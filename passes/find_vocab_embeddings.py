"""find_vocab_embeddings: token embeddings become vocab-parallel.

    h = embedding(E[V, H], ids)          # ids flow from a user input
 -> h = all_reduce(masked_embedding(E_r[V/n, H], ids - start_r))

An embedding qualifies when its ids come from a user input (through views or
casts only: position ids computed with ``arange`` do not) and its table is a
vocabulary -- at least as many rows as columns -- or is shared with a linear
(a tied LM head).  Small tables such as BERT's token types stay replicated:
splitting them would cost an all-reduce for no memory.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from autotp.rules import linear_weight

aten = torch.ops.aten

# Matches ops through which ids stay "the user's ids".
_ID_PASSTHROUGH = {aten.view.default, aten.reshape.default, aten.to.dtype, aten.to.dtype_layout,
                   aten._to_copy.default, aten.contiguous.default, aten.clone.default, aten.alias.default}


def _from_user_input(x) -> bool:
    while isinstance(x, Node):
        if x.op == "placeholder":
            return True
        if x.op == "call_function" and x.target in _ID_PASSTHROUGH:
            x = x.args[0]
            continue
        return False
    return False


def find_vocab_embeddings(gm: GraphModule, *, world_size: int) -> list[Node]:
    shared = {linear_weight(n)[1].target for n in gm.graph.nodes if linear_weight(n) is not None}
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.embedding.default:
            continue
        w, ids = node.args[:2]
        if not (isinstance(w, Node) and w.op == "get_attr") or not _from_user_input(ids):
            continue
        rows, cols = w.meta["val"].shape
        if rows >= world_size and (rows >= cols or w.target in shared):
            out.append(node)
    return out
