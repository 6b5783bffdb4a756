"""lower_vocab_embedding: look ids up in this rank's slice of the vocabulary.

    h = embedding(E, ids)     ->   h_P = VocabParallelEmbedding[start_r, rows](E_r, ids)

The output is a partial sum (zero rows for ids outside the slice); the
all-reduce that makes it whole is inserted where the analysis put it.
"""
from __future__ import annotations

import math

from torch.fx import GraphModule

from autotp.runtime import VocabParallelEmbedding

from .base import PassResult


def lower_vocab_embedding(gm: GraphModule, *, analysis, rank: int, world_size: int, **_) -> PassResult:
    modified = False
    for i, node in enumerate(list(gm.graph.nodes)):
        dec = analysis.decisions.get(node)
        if dec is None or dec.role != "vocab":
            continue
        w, ids = node.args[:2]
        vocab = int(w.meta["val"].shape[0])
        rows = math.ceil(vocab / world_size)
        padding_idx = node.args[2] if len(node.args) > 2 else -1
        name = f"autotp_vocab_embedding_{i}"
        gm.add_submodule(name, VocabParallelEmbedding(rank * rows, rows, padding_idx))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (w, ids))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    return PassResult(gm, modified)
