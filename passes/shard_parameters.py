"""shard_parameters: replace every sharded parameter (and buffer) by this rank's slice.

    W[out, in]  with S(0, chunks)   ->   W_r[out / n, in]   (a copy: the full tensor is not kept)

``load`` (optional) supplies a slice without the full tensor in memory --
``load(name, dim, index, pad)`` -- for shard-on-load; by default the slice is
cut from the tensor the module holds.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from autotp.placements import Shard, shard_index

from .base import PassResult


def _owner(gm: nn.Module, target: str):
    *path, leaf = target.split(".")
    mod = gm
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


def slice_tensor(t: torch.Tensor, dim: int, index: torch.Tensor, pad: int) -> torch.Tensor:
    if len(index) and bool((index[1:] - index[:-1] == 1).all()):
        out = t.narrow(dim, int(index[0]), len(index))
    else:
        out = t.index_select(dim, index.to(t.device))
    if pad:
        shape = list(out.shape)
        shape[dim] = pad
        out = torch.cat([out, out.new_zeros(shape)], dim=dim)
    return out.clone().contiguous()


def shard_parameters(gm: GraphModule, *, analysis, rank: int, world_size: int, load=None, **_) -> PassResult:
    modified = False
    for target, pl in analysis.param_placements.items():
        if not isinstance(pl, Shard):
            continue
        mod, leaf = _owner(gm, target)
        full = getattr(mod, leaf)
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
                local = slice_tensor(full, pl.dim, index, pad)
        if isinstance(full, nn.Parameter):
            local = nn.Parameter(local, requires_grad=full.requires_grad)
            setattr(mod, leaf, local)
        elif leaf in mod._buffers:
            mod._buffers[leaf] = local
        else:
            setattr(mod, leaf, local)
        modified = True
    return PassResult(gm, modified)
