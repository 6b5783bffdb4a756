"""The public entry points ``autotp.plan`` and ``autotp.shard``, and the module ``shard`` returns.

Both run the stages of ``autotp.pipeline``; this file only checks arguments and wraps
the lowered graph.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .config import ShardConfig, resolve_config
from .sequence import regather_in_backward
from .pipeline import Ranks, compile_model, compiled, join_ranks, plan_model
from .plan import Plan
from .groups import check_inputs_once, check_same_inputs
from .report import dump_if_asked

__all__ = ["plan", "shard", "ShardedModule"]


def plan(model: nn.Module, world_size: int, *, example_inputs: tuple = (), example_kwargs: dict | None = None,
         config: ShardConfig | None = None, **options) -> Plan:
    """Decide how ``model`` would be sharded over ``world_size`` ranks, in this process.

    Args:
        model: any ``nn.Module`` (parameters may be on the ``meta`` device).
        world_size: number of tensor-parallel ranks.
        example_inputs / example_kwargs: one call's inputs.
        config / options: a ``ShardConfig``, or its fields as keywords (not both).

    Returns:
        A ``Plan``; ``print(plan.summary())`` shows each parameter's placement, the
        collectives per forward/backward and the parameter bytes per rank.

    Example::

        >>> p = autotp.plan(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)), 2,
        ...                 example_inputs=(torch.randn(4, 8),))
        >>> p.counts("forward")
        {'all_reduce': 1}
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    config = resolve_config(config, options)
    the_plan = plan_model(model, world_size, config, example_inputs, example_kwargs)[1]
    dump_if_asked(the_plan)  # AUTOTP_DUMP=dir
    return the_plan


class ShardedModule(nn.Module):
    """One rank's module: holds only its shards, runs the lowered graph, returns replicated outputs.

    Attributes: ``module`` (the lowered graph), ``plan``, ``config``, ``timings``, and the
    group this rank runs in: ``group``, ``rank``, ``world_size``, ``comm``.
    """

    def __init__(self, graph_module, plan: Plan, ranks: Ranks, *, config: ShardConfig, timings: dict):
        super().__init__()
        self.module = graph_module
        self.plan = plan
        self.group, self.rank, self.world_size, self.comm = ranks.group, ranks.rank, ranks.world_size, ranks.comm
        self.config = config
        self.timings = timings
        self._inputs_checked = not config.check_inputs or ranks.world_size == 1
        self._inputs_flag = torch.zeros((), dtype=torch.int32)  # the compiled check's: 1 once checked
        # what forward calls: the graph, or its torch.compile wrapper (ShardConfig.compile); a plain
        # attribute, so parameter names stay the graph's own
        object.__setattr__(self, "_run", compiled(graph_module, config, dynamic=config.dynamic or None))

    def train(self, mode: bool = True) -> "ShardedModule":
        """Set training mode (dropout on or off). The exported graph module refuses ``train()``
        itself, so the flag is set on every submodule directly."""
        for m in self.modules():
            m.training = mode
        return self

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # the collectives are traceable ops (traceable.py); no graph break
            if not self._inputs_checked:  # compiled before any eager call: the check is an op too
                tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
                check_inputs_once(self._inputs_flag, tensors, self.comm.name)
            return self.module(*args, **kwargs)
        if not self._inputs_checked:
            check_same_inputs(args, kwargs, self.group)
            self._inputs_checked = True
        try:
            if self.config.sequence_parallel and torch.is_grad_enabled() and not self.config.compile:
                with regather_in_backward():  # a column-parallel linear keeps its input's sequence shard
                    return self._run(*args, **kwargs)
            return self._run(*args, **kwargs)
        except (RuntimeError, AssertionError) as e:  # export's shape guard raises either, by version
            if "Guard failed" not in str(e):
                raise
            shapes = [tuple(x.shape) for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            raise ValueError(
                f"the sharded module was captured for other input shapes ({e}); got tensor inputs of shapes "
                f"{shapes}. Pass dynamic=True to autotp.shard to accept other batch sizes and sequence lengths, "
                "or shard with example inputs of this shape"
            ) from e


def shard(model: nn.Module, world_size: int | None = None, *, example_inputs: tuple = (),
          example_kwargs: dict | None = None, group=None, config: ShardConfig | None = None,
          load=None, **options) -> ShardedModule:
    """Shard ``model`` over the ranks of ``group`` and return this rank's module.

    Call it on every rank (under torchrun, or after ``init_process_group``); it
    initializes the default group from torchrun's environment when none exists.

    Args:
        model: any ``nn.Module``.
        world_size: the TP degree; must equal the group's size (checked).
        example_inputs / example_kwargs: one call's inputs, identical on every rank.
        group: the process group (default: the world).
        config / options: a ``ShardConfig``, or its fields as keywords (``strict=True``...), not both.
        load: optional ``load(name, dim, index, pad)`` returning a parameter's local slice.

    Returns:
        A ``ShardedModule``: call it like ``model``; its outputs are whole and identical on
        every rank. ``.plan`` holds the plan it applied.
    """
    config = resolve_config(config, options)
    ranks = join_ranks(world_size, group, config)
    gm, the_plan, timings = compile_model(model, ranks, config, example_inputs, example_kwargs, load=load)
    sharded = ShardedModule(gm, the_plan, ranks, config=config, timings=timings)
    if ranks.rank == 0:
        dump_if_asked(the_plan)  # AUTOTP_DUMP=dir
    return sharded.train(model.training)  # start in the mode the model was in
