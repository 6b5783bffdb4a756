"""How a sharded module's tensors are stored: the layout shared by ``autotp.checkpoint`` and ``autotp.hf_export``.

See ``autotp/checkpoint.py`` for the table of placements and their stored forms.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .placements import Placement, Shard, pad_zeros, shard_index, take_shard
from .plan import ParamPlan


def _stored_shape(global_shape: list[int], pl: Placement) -> list[int]:
    """Shape a tensor is stored with: the global shape, dim d split into (P, N/P) for ``S(d, chunks=P)``."""
    if isinstance(pl, Shard) and pl.chunks > 1:
        d, n = pl.dim, global_shape[pl.dim]
        return [*global_shape[:d], pl.chunks, n // pl.chunks, *global_shape[d + 1:]]
    return list(global_shape)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


class _Layout:
    """Where this rank's tensors sit in the TP group: rank, world size, the 1-D mesh DTensors live on."""

    def __init__(self, sharded, device: torch.device):
        self.rank, self.world = sharded.rank, sharded.world_size
        self.group = sharded.group
        self.device = device
        self._mesh = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            self._mesh = DeviceMesh.from_group(self.group or dist.group.WORLD, self.device.type)
        return self._mesh

    def to_stored(self, local: torch.Tensor, pl: Placement, global_shape: list[int]):
        """This rank's local tensor -> what DCP saves (a DTensor over the TP mesh, or a plain tensor)."""
        if not isinstance(pl, Shard):
            return local
        d, n = pl.dim, global_shape[pl.dim]
        shape = _stored_shape(global_shape, pl)
        if pl.chunks == 1:
            index, _ = shard_index(n, self.world, self.rank)
            piece = local.narrow(d, 0, len(index))  # padding is not part of the tensor
            dim = d
        else:
            lshape = list(local.shape)
            piece = local.reshape([*lshape[:d], pl.chunks, lshape[d] // pl.chunks, *lshape[d + 1:]])
            dim = d + 1  # (..., chunk, block, ...): rank r holds block r of every chunk
        if not self.distributed:
            return piece.reshape(shape)
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor import Shard as DShard

        return DTensor.from_local(piece, self.mesh, [DShard(dim)], run_check=False, shape=torch.Size(shape),
                                  stride=_contiguous_stride(shape))

    def from_stored(self, stored, pl: Placement, local_shape: list[int]) -> torch.Tensor:
        """Inverse of ``to_stored``: this rank's local tensor, zero padding re-added."""
        from torch.distributed.tensor import DTensor

        t = stored.to_local() if isinstance(stored, DTensor) else stored
        if not isinstance(pl, Shard):
            return t
        if pl.chunks > 1:
            return t.reshape(local_shape)  # (..., P, block, ...) -> (..., P * block, ...)
        return pad_zeros(t, pl.dim, local_shape[pl.dim] - t.shape[pl.dim])

    def cut(self, full: torch.Tensor, pl: Placement) -> torch.Tensor:
        """This rank's local tensor cut from the global one (where the stored form changed)."""
        if not isinstance(pl, Shard):
            return full
        return take_shard(full, pl.dim, *shard_index(full.shape[pl.dim], self.world, self.rank, pl.chunks))


def _entries(sharded) -> dict[str, tuple[torch.Tensor, ParamPlan]]:
    """``{name: (local tensor, plan entry)}`` for every tensor of the plan that the rank's module holds."""
    out = {}
    for name, info in sharded.plan.parameters.items():
        t = sharded.module
        for part in name.split("."):
            t = getattr(t, part, None)
        if not isinstance(t, torch.Tensor):
            continue  # dropped from the rank's graph (never read)
        assert list(t.shape) == list(info.local_shape), (name, list(t.shape), info.local_shape)
        out[name] = (t, info)
    return out


def _device(entries) -> torch.device:
    for t, _ in entries.values():
        return t.device
    return torch.device("cpu")


def _few(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")
