"""The compiler pipeline: the one place that knows the order of the stages.

    capture  ->  seeds + analyze  ->  plan  ->  lower  ->  run

1. **capture** (``capture.export_graph``, the only ``torch.export`` call): a model, or a
   generation step wrapping one, becomes an ATen-level fx graph.
2. **analyze** (``analyze.analyze``): seeds from dataflow (column linears, vocab
   embeddings), placements propagated by ``rules``, demoted to a fixpoint -- after
   ``split_linears.split_fused_linears`` gave each part of a fused weight split
   unevenly its own linear.
3. **plan** (``plan.build_plan``): the typed ``Plan`` -- parameters, per-node decisions,
   redistribution steps and every collective.  ``autotp.plan`` stops here, in one process.
4. **lower** (``passes/``, in ``LOWERING`` order): each pass applies its part of the plan
   to this rank's graph, given a ``LoweringContext`` (plan, rank, communicator, seed, loader).
5. **run**: ``api.ShardedModule`` (or a generation model's steps) calls the lowered graph.

Entry points call these stages and nothing else: ``shard`` / ``plan`` (``api.py``)
through ``compile_model`` / ``plan_model``; ``shard_for_generation`` / ``plan_generation``
(``generation.py``) through ``plan_graph`` and ``lower_graph`` on their step graphs;
``from_pretrained`` and ``parallelize`` through ``shard_for_generation``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.fx import GraphModule

import autotp.passes as P

from .analyze import analyze
from .capture import capture, drop_unused_attributes
from .config import ShardConfig
from .placements import Placement
from .plan import Plan, build_plan
from .groups import max_and_min, resolve_group
from .runtime import Communicator
from .kernels import enabled as kernels_enabled
from .samehost import enable_same_host_collectives
from .split_linears import split_fused_linears

__all__ = ["Ranks", "join_ranks", "plan_graph", "check_plans_agree", "lower_graph", "lowering_context", "plan_model",
           "compile_model", "compiled", "run_device", "LOWERING"]

SAME_HOST_TIMEOUT_S = 60.0  # the same-host transport's wait when ShardConfig.timeout_s is None

# The lowering passes in the order they run: shapes and collectives first (they read the
# graph as analyzed), then the ops that become modules and the kernel epilogues, then the
# parameters; last, the fusion of an all-reduce with the norm after it (it reads the
# finished collectives).
LOWERING = [P.drop_metadata_asserts, P.localize_shapes, P.insert_redistributions, P.scale_partial_means,
            P.lower_vocab_embedding, P.lower_vocab_cross_entropy, P.lower_dropout, P.fuse_column_backward,
            P.fuse_kernels, P.shard_parameters, P.retarget_device, P.fuse_allreduce_norm]


@dataclass(frozen=True)
class Ranks:
    """The tensor-parallel group this process is one rank of, and the communicator its collectives use."""

    group: object
    world_size: int
    rank: int
    comm: Communicator
    device: torch.device | None = None  # where this rank runs (None: where the model's tensors are)


def join_ranks(world_size: int | None, group, config: ShardConfig) -> Ranks:
    """Resolve the process group (initialising it from torchrun's environment if needed), check
    ``world_size`` against it, and build the communicator (same-host transport where enabled)."""
    group, world, rank = resolve_group(world_size, group)
    device = run_device(config, group)
    same_host = None
    if config.same_host_collectives:
        same_host = enable_same_host_collectives(group, timeout_s=config.timeout_s or SAME_HOST_TIMEOUT_S)
    return Ranks(group, world, rank, Communicator(group, same_host, timeout_s=config.timeout_s), device)


def run_device(config: ShardConfig, group) -> torch.device | None:
    """``ShardConfig.device``; else this rank's GPU on NCCL ranks (the collectives need CUDA tensors);
    else ``None``: the model runs where its tensors are."""
    if config.device is not None:
        device = torch.device(config.device)
        if device.type == "cuda" and device.index is None:  # "cuda": this rank's current GPU
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def plan_graph(gm: GraphModule, world_size: int, config: ShardConfig, *,
               input_placements: dict[int, Placement] | None = None, local_outputs=frozenset(),
               param_names: dict[str, str] | None = None) -> Plan:
    """Stages 2-3 on a captured graph: seeds, analysis, plan.

    ``input_placements`` / ``local_outputs``: see ``analyze``; ``param_names``: graph
    attribute -> the name the plan (and a ``load`` callback) uses."""
    split_fused_linears(gm)  # in place: lowering reads the graph the analysis saw
    analysis = analyze(gm, world_size, strict=config.strict, gather_outputs=config.gather_outputs,
                       input_placements=input_placements, local_outputs=local_outputs,
                       sequence_parallel=config.sequence_parallel)
    return build_plan(analysis, param_names, recompute_blocks=config.activation_checkpointing,
                      regather=config.sequence_parallel and not config.compile)


def check_plans_agree(plans: dict[str, Plan], ranks: Ranks) -> None:
    """Raise on every rank if the ranks derived different plans (one MAX and one MIN all-reduce).

    A model that traces differently per rank (Python control flow on the rank, a config or
    input that differs) would otherwise issue different collectives and deadlock later."""
    if ranks.world_size == 1:
        return
    hi, lo = max_and_min(torch.tensor([p.fingerprint() for p in plans.values()], dtype=torch.int64), ranks.group)
    if not torch.equal(hi, lo):
        names = [n for n, a, b in zip(plans, hi.tolist(), lo.tolist()) if a != b]
        mine_counts = {n: (plans[n].counts("forward"), len(plans[n].parameters)) for n in names}
        raise ValueError(
            f"the ranks derived different plans for {', '.join(names)} (this is rank {ranks.rank}: collectives per "
            f"forward and parameter count {mine_counts}): the model must trace the same on every rank -- no "
            "Python control flow on the rank, the same config, and the same example inputs everywhere")


def lowering_context(plan: Plan, ranks: Ranks, config: ShardConfig, *, load=None, shared=None) -> P.LoweringContext:
    seed = config.seed if config.seed is not None else torch.initial_seed()
    return P.LoweringContext(plan=plan, rank=ranks.rank, world_size=ranks.world_size, comm=ranks.comm, seed=seed,
                             device=ranks.device, kernels=kernels_enabled(config.kernels),
                             load=load, shared=shared)


def lower_graph(gm: GraphModule, ctx: P.LoweringContext, config: ShardConfig) -> GraphModule:
    """Stage 4: this rank's graph, with its shards, local shapes and collectives."""
    gm = P.run_passes(gm, LOWERING, ctx)
    if config.activation_checkpointing:
        gm = P.run_passes(gm, [P.checkpoint_blocks], ctx)
    drop_unused_attributes(gm)  # nothing the rank's graph no longer reads stays resident
    return gm


def compiled(gm: GraphModule, config: ShardConfig, *, dynamic: bool | None = None, mode: str | None = None) -> nn.Module:
    """``gm`` under ``torch.compile(fullgraph=True)`` when ``config.compile``, else ``gm`` itself."""
    if not config.compile:
        return gm
    return torch.compile(gm, fullgraph=True, dynamic=dynamic, mode=mode)


def plan_model(model: nn.Module, world_size: int, config: ShardConfig, example_inputs: tuple,
               example_kwargs: dict | None) -> tuple[GraphModule, Plan, dict]:
    """Stages 1-3 on a model: ``(captured graph, plan, timings)``."""
    t0 = time.perf_counter()
    blocks = {}
    gm = capture(model, example_inputs, example_kwargs, dynamic=config.dynamic, regions=config.reuse_blocks,
                 progress=lambda n, traced: blocks.update(blocks=n, blocks_traced=traced))
    t1 = time.perf_counter()
    the_plan = plan_graph(gm, world_size, config)
    return gm, the_plan, {"capture_s": t1 - t0, "analyze_s": time.perf_counter() - t1, **blocks}


def compile_model(model: nn.Module, ranks: Ranks, config: ShardConfig, example_inputs: tuple,
                  example_kwargs: dict | None, *, load=None) -> tuple[GraphModule, Plan, dict]:
    """Stages 1-4 on a model: ``(this rank's graph, plan, timings)``."""
    gm, the_plan, timings = plan_model(model, ranks.world_size, config, example_inputs, example_kwargs)
    check_plans_agree({"forward": the_plan}, ranks)
    t0 = time.perf_counter()
    gm = lower_graph(gm, lowering_context(the_plan, ranks, config, load=load), config)
    timings["lower_s"] = time.perf_counter() - t0
    return gm, the_plan, timings
