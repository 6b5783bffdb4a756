"""The public entry points: ``autotp.plan`` and ``autotp.shard``."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

import autotp.passes as P

from .analyze import Analysis, analyze
from .capture import capture, drop_unused_attributes
from .plan import Plan, build_plan
from .runtime import resolve_group
from .samehost import enable_same_host_collectives


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """Options of ``shard`` / ``plan``.

    Attributes:
        strict: raise instead of replicating a layer that cannot be sharded
            (e.g. ``num_heads (6) is not divisible by world_size (4)``).
        dynamic: let batch and sequence length vary between calls (the first two dims of
            every tensor input); otherwise the sharded module accepts the example shapes only.
        check_inputs: on the first call, verify every rank got the same inputs (2 small
            all-reduces); differing inputs silently corrupt results in every TP library.
        gather_outputs: gather sharded outputs (the logits) so every rank returns the whole
            value. ``False`` returns this rank's vocab slice instead -- for training loops that
            only read the loss, it saves the ``[batch, seq, vocab]`` all-gather.
        activation_checkpointing: recompute each transformer block (each element of a module
            list) in backward instead of storing its activations.
        same_host_collectives: when every rank runs on this host (CPU ranks, gloo), take the
            forward all-reduces and all-gathers through shared memory (``autotp.samehost``):
            microseconds instead of gloo's ~1 ms each. Ignored where it does not apply.
    """

    strict: bool = False
    dynamic: bool = False
    check_inputs: bool = True
    gather_outputs: bool = True
    activation_checkpointing: bool = False
    same_host_collectives: bool = False


def _analyze(model, world_size, example_inputs, example_kwargs, config: ShardConfig):
    t0 = time.perf_counter()
    gm = capture(model, example_inputs, example_kwargs, dynamic=config.dynamic)
    t1 = time.perf_counter()
    seeds = P.find_linear_seeds(gm, world_size=world_size)
    vocab = P.find_vocab_embeddings(gm, world_size=world_size)
    analysis = analyze(gm, world_size, column_seeds=seeds, vocab_seeds=vocab, strict=config.strict,
                       gather_outputs=config.gather_outputs)
    t2 = time.perf_counter()
    return gm, analysis, {"capture_s": t1 - t0, "analyze_s": t2 - t1}


def plan(model: nn.Module, world_size: int, example_inputs: tuple = (), example_kwargs: dict | None = None,
         *, config: ShardConfig | None = None) -> Plan:
    """Decide how ``model`` would be sharded over ``world_size`` ranks, in this process.

    Args:
        model: any ``nn.Module`` (parameters may be on the ``meta`` device).
        world_size: number of tensor-parallel ranks.
        example_inputs / example_kwargs: one call's inputs.

    Returns:
        A ``Plan``; ``print(plan.summary())`` shows each parameter's placement, the
        collectives per forward/backward and the parameter bytes per rank.

    Example::

        >>> p = autotp.plan(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)), 2, (torch.randn(4, 8),))
        >>> p.counts("forward")
        {'all_reduce': 1}
    """
    config = config or ShardConfig()
    _, analysis, _ = _analyze(model, world_size, example_inputs, example_kwargs, config)
    return build_plan(analysis)


class ShardedModule(nn.Module):
    """One rank's module: holds only its shards, runs the lowered graph, returns replicated outputs."""

    def __init__(self, graph_module, plan: Plan, analysis: Analysis | None, *, rank: int, world_size: int, group,
                 config: ShardConfig, timings: dict):
        super().__init__()
        self.module = graph_module
        self.plan = plan
        self.rank, self.world_size, self.group = rank, world_size, group
        self.config = config
        self.timings = timings
        self._inputs_checked = not config.check_inputs or world_size == 1

    def train(self, mode: bool = True) -> "ShardedModule":
        """Set training mode (dropout on or off). The exported graph module refuses ``train()``
        itself, so the flag is set on every submodule directly."""
        for m in self.modules():
            m.training = mode
        return self

    def forward(self, *args, **kwargs):
        if not self._inputs_checked:
            check_same_inputs(args, kwargs, self.group)
            self._inputs_checked = True
        try:
            return self.module(*args, **kwargs)
        except (RuntimeError, AssertionError) as e:  # export's shape guard raises either, by version
            if "Guard failed" not in str(e):
                raise
            shapes = [tuple(x.shape) for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            raise ValueError(
                f"the sharded module was captured for other input shapes ({e}); got tensor inputs of shapes "
                f"{shapes}. Pass dynamic=True to autotp.shard to accept other batch sizes and sequence lengths, "
                "or shard with example inputs of this shape"
            ) from e


def check_same_inputs(args, kwargs, group) -> None:
    """Raise if ranks were given different inputs (one MAX and one MIN all-reduce of a fingerprint)."""
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    if not leaves:
        return
    fp = torch.stack([x.detach().double().sum() * 1.0 + x.numel() for x in leaves]).cpu()
    if dist.get_backend(group) == "nccl":
        fp = fp.cuda()
    hi, lo = fp.clone(), fp.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    if not torch.equal(hi, lo):
        bad = [i for i in range(len(leaves)) if hi[i] != lo[i]]
        raise ValueError(
            f"ranks were given different inputs (tensor input(s) {bad} differ between ranks). Every rank "
            "must see the same inputs: seed before making random inputs (torch.manual_seed) or broadcast them"
        )


def lower(gm, analysis: Analysis, *, rank: int, world_size: int, group, config: ShardConfig, load=None,
          shared: dict | None = None):
    """Run the lowering pipeline on an analyzed graph: this rank's module (see ``passes/``)."""
    ctx = dict(analysis=analysis, rank=rank, world_size=world_size, group=group, load=load, shared=shared)
    gm = P.run_passes(gm, [P.drop_metadata_asserts, P.localize_shapes, P.insert_redistributions, P.lower_row_bias,
                           P.lower_vocab_embedding, P.lower_vocab_cross_entropy, P.lower_dropout,
                           P.fuse_column_backward, P.shard_parameters], **ctx)
    if config.activation_checkpointing:
        gm = P.run_passes(gm, [P.checkpoint_blocks], **ctx)
    drop_unused_attributes(gm)  # nothing the rank's graph no longer reads stays resident
    return gm


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
        config / options: a ``ShardConfig``, or its fields as keywords (``strict=True``...).
        load: optional ``load(name, dim, index, pad)`` returning a parameter's local slice.

    Returns:
        A ``ShardedModule``: call it like ``model``; its outputs are whole and identical on
        every rank. ``.plan`` holds the plan it applied.
    """
    config = config or ShardConfig(**options)
    group, world, rank = resolve_group(world_size, group)
    if config.same_host_collectives:
        enable_same_host_collectives(group)
    gm, analysis, timings = _analyze(model, world, example_inputs, example_kwargs, config)
    t0 = time.perf_counter()
    the_plan = build_plan(analysis)
    gm = lower(gm, analysis, rank=rank, world_size=world, group=group, config=config, load=load)
    timings["lower_s"] = time.perf_counter() - t0
    sharded = ShardedModule(gm, the_plan, analysis, rank=rank, world_size=world, group=group, config=config,
                            timings=timings)
    return sharded.train(model.training)  # start in the mode the model was in
