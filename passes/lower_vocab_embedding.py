"""lower_vocab_embedding: look ids up in this rank's slice of the vocabulary.

    h = embedding(E, ids)     ->   h_P = VocabParallelEmbedding[start_r, rows](E_r, ids)

The output is a partial sum (zero rows for ids outside the slice); the
all-reduce that makes it whole is inserted where the analysis put it.
"""
from __future__ import annotations

import math

from torch.fx import GraphModule

from autotp.runtime import VocabParallelEmbedding

from .base import LoweringContext, PassResult, nodes_with_role, replace_with_module


def lower_vocab_embedding(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    modified = False
    rank, world_size = ctx.rank, ctx.world_size
    for i, node in nodes_with_role(gm, ctx.plan, "vocab"):
        w, ids = node.args[:2]
        vocab = int(w.meta["val"].shape[0])
        rows = math.ceil(vocab / world_size)
        padding_idx = node.args[2] if len(node.args) > 2 else -1
        name = f"autotp_vocab_embedding_{i}"
        fused = ctx.kernel_for("vocab_embedding", node, "masked_embedding: range mask, lookup and zero rows in one pass")
        replace_with_module(gm, node, name, VocabParallelEmbedding(rank * rows, rows, padding_idx, fused=fused), (w, ids))
        modified = True
    return PassResult(gm, modified)
