"""Where a replicated value's gradient is summed over the ranks: the ``copy`` steps, placed once.

A ``copy`` (R -> R into sharded compute) is the identity forward; its backward all-reduces the
value's gradient, partial because only the rank's shard of the compute contributed.  The
analysis asks for one on every edge where a replicated value enters sharded compute; this
module moves them up to where paths meet (``merge_copies``) and tells the sequence-parallel
pass which replicated values have only partial gradients (``GradientPaths.into_sharded``).
"""
from __future__ import annotations

from torch.fx import Node

from .patterns import output_leaves
from .placements import Replicate

R = Replicate()

__all__ = ["GradientPaths", "merge_copies", "grad_input"]


def grad_input(a, n: Node) -> Node | None:
    """The one input of ``n`` that needs a gradient, or ``None`` if not exactly one does."""
    ins = [x for x in n.all_input_nodes if x in a.needs_grad]
    return ins[0] if len(ins) == 1 else None


class GradientPaths:
    """Answers, for an ``Analysis`` whose redistributions are recorded: does all of a replicated
    node's gradient come from sharded compute, through ``copy`` steps (each rank's part of it)?"""

    def __init__(self, a):
        self.a = a
        self.chains: dict[tuple[Node, Node], list] = {}
        for red in a.redistributions:
            self.chains.setdefault((red.src, red.consumer), []).append(red)
        self.returned = {x for x in output_leaves(a.graph_module) if isinstance(x, Node)}
        self.memo: dict[Node, bool] = {}

    def is_copy(self, chain) -> bool:
        return len(chain) == 1 and chain[0].kind == "copy"

    def into_sharded(self, n: Node) -> bool:
        """Every reader of ``n`` reads it through a ``copy``, or is itself such a node with ``n`` its
        one input needing a gradient; ``n`` is replicated, needs a gradient and is not returned."""
        a, memo = self.a, self.memo
        if n not in memo:
            memo[n] = False  # (no cycles in a graph; guards re-entry)
            pl = a.placements.get(n)
            ok = (n.op == "call_function" and n in a.needs_grad and n not in self.returned
                  and (pl == R or (isinstance(pl, list) and all(p == R for p in pl))))
            for u in n.users if ok else ():
                dec = a.decisions.get(u)
                if dec is None or n not in dec.inputs and u.op != "output":
                    continue  # reads no values of n (a metadata check)
                chain = self.chains.get((n, u), [])
                if not (self.is_copy(chain) or (not chain and self.into_sharded(u) and grad_input(a, u) is n)):
                    ok = False
                    break
            memo[n] = ok
        return memo[n]

    def copies_below(self, n: Node) -> list:
        """The ``copy`` steps that end the gradient paths from ``into_sharded`` node ``n``."""
        out, stack, seen = [], [n], set()
        while stack:
            m = stack.pop()
            if m in seen:
                continue
            seen.add(m)
            for u in m.users:
                chain = self.chains.get((m, u), [])
                if self.is_copy(chain):
                    out.append(chain[0])
                elif not chain and u in self.memo and self.memo[u]:
                    stack.append(u)
        return out


def merge_copies(a) -> None:
    """One ``copy`` where several replicated values derived from one enter sharded compute.

    When a replicated value reaches sharded compute along several paths of replicated ops
    (Mamba's C, read once per time step; dt, B and C split from one all-reduced projection), a
    copy on each path all-reduces each path's gradient::

        y = all_reduce(x_proj(h_S))                 y = copy(all_reduce(x_proj(h_S)))
        dt, B, C = split(y)                 ->      dt, B, C = split(y)
        .. copy(C[:, 0]) .. copy(C[:, 1]) ..        .. C[:, 0] .. C[:, 1] ..

    The ops in between are the same on every rank, so their backward maps partial gradients to
    partial gradients: one copy where the paths meet all-reduces once.  Only through ops whose
    every reader is such a path or a copy (a gradient that is already whole, one from replicated
    compute, must not be summed over ranks) and with no other input needing a gradient (a norm
    weight's gradient would come out partial)."""
    paths = GradientPaths(a)
    groups: dict[tuple[Node, Node], list] = {}
    for (src, consumer), chain in paths.chains.items():
        if not paths.is_copy(chain):
            continue
        top = src
        while paths.into_sharded(top) and (p := grad_input(a, top)) is not None:
            if not paths.into_sharded(p):
                break
            top = p
        if top is src or not paths.into_sharded(top) or (p := grad_input(a, top)) is None:
            continue
        groups.setdefault((p, top), []).append(chain[0])
    for (p, top), copies in groups.items():
        if len({c.src for c in copies}) < 2:
            continue  # one path: nothing to save
        drop = {id(c) for c in copies}
        a.redistributions = [r for r in a.redistributions if id(r) not in drop]
        a.redistributions.append(type(copies[0])(p, top, R, R, "copy"))  # after the edge's own changes
