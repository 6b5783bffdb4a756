"""shard_parameters: give the rank's module its own parameters: slices of sharded ones, copies of the rest.

    W[out, in]  with S(0, chunks)   ->   W_r[out / n, in]   (a copy: the full tensor is not kept)
    b[out]      with R              ->   b.clone()

``load`` (optional) supplies a slice without the full tensor in memory --
``load(name, dim, index, pad)`` -- for shard-on-load; by default the slice is
cut from the tensor the module holds.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from autotp.placements import Shard, shard_index, take_shard

from .base import PassResult


def _owner(gm: nn.Module, target: str):
    *path, leaf = target.split(".")
    mod = gm
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


def shard_parameters(gm: GraphModule, *, analysis, rank: int, world_size: int, load=None, **_) -> PassResult:
    modified = False
    for target, pl in analysis.param_placements.items():
        mod, leaf = _owner(gm, target)
        full = getattr(mod, leaf)
        if not isinstance(pl, Shard):
            # a replicated tensor is copied too: the sharded module owns its parameters (their
            # .grad and optimizer updates never reach the user's model or another sharded copy)
            if isinstance(full, torch.Tensor) and full.device.type != "meta":
                with torch.no_grad():
                    own = full.detach().clone()
                _set(mod, leaf, full, own)
            continue
        index, pad = shard_index(full.shape[pl.dim], world_size, rank, pl.chunks)
        if load is not None:
            local = load(target, pl.dim, index, pad)
        elif full.device.type == "meta":
            raise ValueError(
                f"parameter {target} is on the meta device: autotp.shard needs real weights "
                "(or a `load` callback / autotp.from_pretrained for shard-on-load)"
            )
        else:
            with torch.no_grad():
                local = take_shard(full, pl.dim, index, pad).clone()
        _set(mod, leaf, full, local)
        modified = True
    return PassResult(gm, modified)


def _set(mod: nn.Module, leaf: str, old: torch.Tensor, new: torch.Tensor) -> None:
    if isinstance(old, nn.Parameter):
        setattr(mod, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
    elif leaf in mod._buffers:
        mod._buffers[leaf] = new
    else:
        setattr(mod, leaf, new)
