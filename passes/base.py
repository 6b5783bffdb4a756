"""Pass plumbing: the typed lowering context, the result type, and a runner whose errors name the pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch.fx import GraphModule

from autotp.plan import Plan
from autotp.runtime import Communicator


class PassResult(NamedTuple):
    graph_module: GraphModule
    modified: bool


class PassError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoweringContext:
    """What a lowering pass may read: the plan it applies and this rank's facts.

    Attributes:
        plan: the ``Plan`` of the graph being lowered (placements, roles, redistribution steps).
        rank / world_size: this rank in the tensor-parallel group.
        comm: the communicator every collective module of this model is built with.
        seed: base of this rank's dropout generators (``ShardConfig.seed``, or
            ``torch.initial_seed()`` when the model was sharded).
        load: optional ``load(name, dim, index, pad)`` giving a parameter's local slice
            (shard-on-load); ``None`` cuts slices from the tensors the graph holds.
        shared: optional dict shared by the graphs of one model (a generation model's
            prefill and decode steps) so they hold the same local tensors.
        device: the device this rank runs on (``ShardConfig.device`` resolved); ``None``
            leaves every tensor and device constant where capture put it.
        kernels: fusion passes may swap patterns for ``csrc/`` kernels (``ShardConfig.kernels``
            and ``AUTOTP_KERNELS``); each records what it swapped with ``fused``.
    """

    plan: Plan
    rank: int
    world_size: int
    comm: Communicator
    seed: int
    load: Callable | None = None
    shared: dict | None = None
    device: torch.device | None = None
    kernels: bool = False

    def kernel_for(self, kind: str, node, detail: str = "") -> bool:
        """Whether a pass may use a ``csrc/`` kernel here (``kernels`` on, and compiled for the run
        device); when so, records the fusion ``kind`` at ``node`` in the plan."""
        from autotp.ops import supports
        if not (self.kernels and supports(self.device)):
            return False
        self.fused(kind, node, detail)
        return True

    def fused(self, kind: str, node, detail: str = "") -> None:
        """Record in the plan that lowering swapped ``node``'s pattern for the fused ``kind``."""
        self.plan.fusions.append({"kind": kind, "at": getattr(node, "name", str(node)), "detail": detail})


def nodes_with_role(gm: GraphModule, plan: Plan, role: str) -> list[tuple[int, object]]:
    """``(position, node)`` of every node the plan gives ``role``; a snapshot, so the pass may edit the graph."""
    return [(i, n) for i, n in enumerate(list(gm.graph.nodes))
            if (d := plan.node(n)) is not None and d.role == role]


def replace_with_module(gm: GraphModule, node, name: str, module, args: tuple):
    """Swap ``node`` for a ``call_module`` of ``module`` (registered as ``name``) on ``args``."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def run_passes(gm: GraphModule, passes: list[Callable[[GraphModule, LoweringContext], PassResult]],
               ctx: LoweringContext) -> GraphModule:
    """Run ``passes`` in order; a failure names the pass, the passes before it, and chains the cause."""
    done: list[str] = []
    for p in passes:
        try:
            gm = p(gm, ctx).graph_module
        except ValueError as e:  # the user's to fix (a tensor on meta, a checkpoint that does not fit): keep its type
            raise ValueError(f"{e} [autotp pass {p.__name__}]") from e
        except Exception as e:  # our own failure: re-raised with context
            raise PassError(f"autotp pass {p.__name__} failed (after {done or 'no passes'}): {e}") from e
        done.append(p.__name__)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
