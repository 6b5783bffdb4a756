"""find_vocab_embeddings: token embeddings become vocab-parallel.

    h = embedding(E[V, H], ids)          # ids flow from a user input
 -> h = all_reduce(masked_embedding(E_r[V/n, H], ids - start_r))

An embedding qualifies when its ids come from a user input (through views or
casts only: position ids computed with ``arange`` do not) and its table is
shared with a linear (a tied LM head) or is the vocabulary: the largest table
looked up with user ids, with at least as many rows as columns.  Small tables
such as BERT's token types, or a position table when the caller passes
position ids (as ``generate`` does), stay replicated: their all-reduce per
call would cost more than the memory it saves.
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
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.embedding.default:
            continue
        w, ids = node.args[:2]
        if not (isinstance(w, Node) and w.op == "get_attr") or not _from_user_input(ids):
            continue
        rows, cols = w.meta["val"].shape
        if rows >= world_size:
            found.append((node, w.target, rows, cols))
    largest = max((rows for _, _, rows, _ in found), default=0)
    return [node for node, target, rows, cols in found if target in shared or (rows == largest and rows >= cols)]
