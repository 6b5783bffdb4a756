"""find_linear_seeds: every matmul with a 2-D parameter operand is a column-parallel candidate.

    y = linear(x, W[out, in], b)        # nn.Linear
    y = addmm(b, x, W[in, out])         # HF Conv1D (GPT-2)
    y = mm(x, t(W)) / matmul(x, W)

The analysis keeps a candidate column-parallel only if the shard it produces
flows to a row-parallel linear (or, for a vocab projection, to where the
logits are needed whole); otherwise it demotes it.  Found from dataflow, so a
renamed module shards the same.
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from autotp.rules import linear_weight


def find_linear_seeds(gm: GraphModule, *, world_size: int) -> list[Node]:
    seeds = []
    for node in gm.graph.nodes:
        found = linear_weight(node)
        if found is None:
            continue
        _, w, w_out, _ = found
        if w.meta["val"].shape[w_out] >= world_size:
            seeds.append(node)
    return seeds
