"""shard_parameters: give the rank's module its own parameters: slices of sharded ones, copies of the rest.

    W[out, in]  with S(0, chunks)   ->   W_r[out / n, in]   (a copy: the full tensor is not kept)
    b[out]      with R              ->   b.clone()
    W[96, in]   with S(0, pieces=64S+16R+16R)  ->  W_r[32 + 16 + 16, in]; its parts' slices made local

``ctx.load`` (optional) supplies a tensor without the full one in memory --
``load(name, dim, index, pad)`` returns a slice of a sharded parameter, and
``load(name, None, None, 0)`` a replicated one whole, ``name`` as the plan names
it -- for shard-on-load; by default the slice is cut from the tensor the module holds.

Each local tensor is made on ``ctx.device`` when one is set (one shard-sized copy, made
there: no rank copies a whole tensor to its device).

``ctx.shared`` (optional, a dict) lets several graphs captured from one model (a
generation model's prefill and decode steps) hold the *same* local tensors:
keyed by the original tensor, filled by the first graph, reused by the next.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from autotp.patterns import param_slice
from autotp.placements import Shard, placement_index, take_shard

from .base import LoweringContext, PassResult

aten = torch.ops.aten


def _owner(gm: nn.Module, target: str):
    *path, leaf = target.split(".")
    mod = gm
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


def shard_parameters(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    modified = False
    rank, world_size, load, shared = ctx.rank, ctx.world_size, ctx.load, ctx.shared
    device = ctx.device

    def own_copy(t: torch.Tensor) -> torch.Tensor:
        """``t`` as this rank's own tensor on the run device: one copy, made there directly."""
        return t.to(device, copy=True) if device is not None else t.clone()

    def here(t):
        return t.to(device) if device is not None and isinstance(t, torch.Tensor) else t
    for param in ctx.plan.parameters.values():
        target, pl = param.target, param.placement
        mod, leaf = _owner(gm, target)
        full = getattr(mod, leaf)
        if shared is not None and id(full) in shared:
            done_pl, local = shared[id(full)]
            if done_pl != pl:
                raise ValueError(f"parameter {param.name} was placed {done_pl} in one captured graph and {pl} in another")
            _set_shared(mod, leaf, local)
            modified = True
            continue
        key = id(full)
        if not isinstance(pl, Shard):
            own = here(load(param.name, None, None, 0)) if load is not None else None
            if own is not None:
                _set(mod, leaf, full, own)
            elif isinstance(full, torch.Tensor) and full.device.type == "meta":
                raise ValueError(
                    f"tensor {param.name} is on the meta device: autotp.shard needs real weights "
                    "(or a `load` callback / autotp.from_pretrained for shard-on-load)"
                )
            # a replicated tensor is copied too: the sharded module owns its parameters (their
            # .grad and optimizer updates never reach the user's model or another sharded copy)
            elif isinstance(full, torch.Tensor):
                with torch.no_grad():
                    own = own_copy(full.detach())
                _set(mod, leaf, full, own)
            if shared is not None:
                shared[key] = (pl, getattr(mod, leaf))
            continue
        index, pad = placement_index(pl, full.shape[pl.dim], world_size, rank)
        if load is not None:
            local = here(load(param.name, pl.dim, index, pad))
        elif full.device.type == "meta":
            raise ValueError(
                f"parameter {param.name} is on the meta device: autotp.shard needs real weights "
                "(or a `load` callback / autotp.from_pretrained for shard-on-load)"
            )
        else:
            with torch.no_grad():
                local = own_copy(take_shard(full, pl.dim, index, pad))
        _set(mod, leaf, full, local)
        if shared is not None:
            shared[key] = (pl, getattr(mod, leaf))
        modified = True
    modified |= _localize_parts(gm, ctx)
    return PassResult(gm, modified)


def _localize_parts(gm: GraphModule, ctx: LoweringContext) -> bool:
    """Point each ``slice(W, d, start, stop)`` of a parameter held in ``pieces`` at its part of the local tensor::

        W: S(0, pieces=64S+16R+16R), world 2      slice(W, 0, 64, 80)  ->  slice(W_r, 0, 32, 48)
    """
    pieced = {p.target: p.placement for p in ctx.plan.parameters.values()
              if isinstance(p.placement, Shard) and p.placement.pieces}
    modified = False
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in pieced:
            continue
        pl = pieced[node.target]
        runs, start, local = {}, 0, 0
        for n, sharded in pl.pieces:
            m = n // ctx.world_size if sharded else n
            runs[(start, start + n)] = (local, local + m)
            start, local = start + n, local + m
        for user in list(node.users):
            part = param_slice(user) if user.target == aten.slice.Tensor else None
            if part is not None and part[1] == pl.dim and part[2:] in runs:
                user.args = (node, pl.dim, *runs[part[2:]], *user.args[4:])
                modified = True
            elif user.target != aten._assert_tensor_metadata.default:
                raise ValueError(f"parameter {node.target} is held in pieces {pl} but {user.format_node()} reads it "
                                 "other than as one whole piece: its local tensor cannot be read that way")
    return modified


def _set_shared(mod: nn.Module, leaf: str, local) -> None:
    if isinstance(local, nn.Parameter):
        mod._buffers.pop(leaf, None)
        mod._parameters[leaf] = local
    elif leaf in mod._buffers or not hasattr(mod, leaf):
        mod._buffers[leaf] = local
    else:
        setattr(mod, leaf, local)


def _set(mod: nn.Module, leaf: str, old: torch.Tensor, new: torch.Tensor) -> None:
    if isinstance(old, nn.Parameter):
        setattr(mod, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
    elif leaf in mod._buffers:
        mod._buffers[leaf] = new
    else:
        setattr(mod, leaf, new)
