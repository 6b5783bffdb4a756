"""checkpoint_blocks: recompute each transformer block in backward instead of keeping its activations.

    %h1 = ... ops of transformer.h.0 ...       %out = autotp_block_0(%h0, %w...)   # torch.utils.checkpoint
    %h2 = ... ops of transformer.h.1 ...  ->   %h2  = autotp_block_1(%out, ...)

A block is a maximal run of nodes whose ``nn_module_stack`` names the same element
of a module list (``transformer.h.3``, ``model.layers.3``); nodes autotp inserted
belong to the block of the node before them.  Each run is outlined into a
sub-graph called under non-reentrant ``torch.utils.checkpoint``; the whole block is
recomputed, its collectives included (as in Megatron-LM), and dropout masks are replayed
(the dropout modules' seed counters are rewound for the recomputation).
"""
from __future__ import annotations

import operator
from contextlib import contextmanager

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from autotp.patterns import block_of as _block_of

from .base import LoweringContext, PassResult


class CheckpointedBlock(nn.Module):
    """Runs ``block`` under ``torch.utils.checkpoint`` (non-reentrant), replaying dropout seeds."""

    def __init__(self, block: GraphModule, name: str):
        super().__init__()
        self.block = block
        self.name = name

    def forward(self, *args):
        if not (self.training and torch.is_grad_enabled()):
            return self.block(*args)
        seeded = [m for m in self.block.modules() if hasattr(m, "_calls")]
        start = [m._calls for m in seeded]

        @contextmanager
        def replay():
            saved = [m._calls for m in seeded]
            for m, c in zip(seeded, start):
                m._calls = c
            try:
                yield
            finally:
                for m, c in zip(seeded, saved):
                    m._calls = c

        @contextmanager
        def nothing():
            yield

        # early_stop=False: the whole block is recomputed, so every forward collective in it runs
        # again in backward, as the plan lists it (stopping early would skip the block's last
        # all-reduce, by a rule that depends on which tensors autograd happened to save)
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False, early_stop=False,
                                                 context_fn=lambda: (nothing(), replay()))


def _runs(gm: GraphModule) -> list[list[Node]]:
    runs: list[list[Node]] = []
    current, key = [], None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        k = _block_of(node) if "nn_module_stack" in node.meta else key  # inserted nodes join the block before
        if k != key or k is None:
            if key is not None and current:
                runs.append(current)
            current, key = [], k
        if k is not None:
            current.append(node)
    if key is not None and current:
        runs.append(current)
    return runs


def checkpoint_blocks(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    runs = _runs(gm)
    for i, run in enumerate(runs):
        inside = set(run)
        inputs: list[Node] = []
        for n in run:
            for x in n.all_input_nodes:
                if x not in inside and x not in inputs:
                    inputs.append(x)
        outputs = [n for n in run if any(u not in inside for u in n.users)]
        sub = Graph()
        env: dict[Node, Node] = {}
        for x in inputs:
            env[x] = sub.placeholder(f"in_{x.name}")
            env[x].meta = dict(x.meta)
        for n in run:
            env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(tuple(env[o] for o in outputs))
        block = GraphModule(gm, sub, class_name=f"Block{i}")
        name = f"autotp_block_{i}"
        gm.add_submodule(name, CheckpointedBlock(block, _block_of(run[0]) or name))
        with gm.graph.inserting_after(run[-1]):
            call = gm.graph.call_module(name, tuple(inputs))
        with gm.graph.inserting_after(call):
            for j, o in enumerate(outputs):
                get = gm.graph.call_function(operator.getitem, (call, j))
                get.meta = dict(o.meta)
                o.replace_all_uses_with(get, delete_user_cb=lambda u: u is not get and u not in inside)
        for n in reversed(run):
            gm.graph.erase_node(n)
    return PassResult(gm, bool(runs))
