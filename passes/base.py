"""Pass plumbing: the result type and a runner whose errors name the pass."""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch.fx import GraphModule


class PassResult(NamedTuple):
    graph_module: GraphModule
    modified: bool


class PassError(RuntimeError):
    pass


def nodes_with_role(gm: GraphModule, analysis, role: str) -> list[tuple[int, object]]:
    """``(position, node)`` of every node the analysis gave ``role``; a snapshot, so the pass may edit the graph."""
    return [(i, n) for i, n in enumerate(list(gm.graph.nodes))
            if (d := analysis.decisions.get(n)) is not None and d.role == role]


def replace_with_module(gm: GraphModule, node, name: str, module, args: tuple):
    """Swap ``node`` for a ``call_module`` of ``module`` (registered as ``name``) on ``args``."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def run_passes(gm: GraphModule, passes: list[Callable[..., PassResult]], **kwargs) -> GraphModule:
    """Run ``passes`` in order; a failure names the pass, the passes before it, and chains the cause."""
    done: list[str] = []
    for p in passes:
        try:
            gm = p(gm, **kwargs).graph_module
        except Exception as e:  # re-raised with context
            raise PassError(f"autotp pass {p.__name__} failed (after {done or 'no passes'}): {e}") from e
        done.append(p.__name__)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
