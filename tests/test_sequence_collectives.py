"""Sequence parallelism's collectives (issue 15; ``autotp/sequence.py``).

On 2 and 4 gloo ranks, with an uneven sequence (7 rows: padded, trimmed), eager and under
``torch.compile``, against the math done whole in each process:

* ``ReduceScatter``: partial sums ``x_r`` -> this rank's rows of ``sum_r x_r`` (the padding copies
  the last row); the gradient of ``sum(y_r * W_r)`` over the ranks reaches every ``x_r`` as the
  whole ``W``;
* ``SequenceSlice``: a replicated ``X`` -> this rank's rows (padded the same way); the gradient
  all-gathered;
* ``GatherToRegion``: sequence shards of ``X`` -> ``X`` on every rank; the gradient of
  ``sum_r sum(X * V_r)`` (each rank's part a partial sum, as in a column-parallel linear) reaches
  each shard as its rows of ``sum_r V_r``;

and each issues the collectives its ``REDISTRIBUTIONS`` row says, forward and backward.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks

SEQ = 7


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rows(t, rank, world, dim=1, edge=False):
    """Rank ``rank``'s rows of ``t`` along ``dim``, padded with zeros or (``edge``) copies of ``t``'s last row."""
    n = -(-t.shape[dim] // world)
    part = t.narrow(dim, min(rank * n, t.shape[dim]), max(0, min(n, t.shape[dim] - rank * n)))
    pad = list(t.shape)
    pad[dim] = n - part.shape[dim]
    last = t.narrow(dim, t.shape[dim] - 1, 1)
    return torch.cat([part, last.expand(pad) if edge else t.new_zeros(pad)], dim)


def _counts(comm) -> dict:
    return {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}


def _case(rank, world, compiled):
    from torch.distributed.tensor.debug import CommDebugMode

    from autotp.runtime import REDISTRIBUTIONS, Communicator
    from autotp.placements import Partial, Replicate, Shard
    from autotp import sequence  # noqa: F401  (adds the two kinds)

    comm = Communicator(None)
    rs = REDISTRIBUTIONS["reduce_scatter"].build(Partial(), Shard(1), SEQ, comm)
    sl = REDISTRIBUTIONS["sequence_slice"].build(Replicate(), Shard(1), SEQ, comm)
    gt = REDISTRIBUTIONS["gather_to_region"].build(Shard(1), Replicate(), SEQ, comm)
    parts = [_rand(10 + r, 2, SEQ, 5) for r in range(world)]  # every rank's partial sum
    w = _rand(99, 2, SEQ, 5)
    X = _rand(7, 2, SEQ, 5)
    vs = [_rand(20 + r, 2, SEQ, 5) for r in range(world)]

    def rs_loss(x):
        y = rs(x)
        return y, (y * _rows(w, rank, world)).sum()

    def gt_loss(x):
        y = gt(x)
        return y, (y * vs[rank]).sum()

    def sl_loss(x):
        y = sl(x)
        return y, (y * _rows(w, rank, world)).sum()

    if compiled:
        rs_loss, gt_loss = torch.compile(rs_loss, fullgraph=True), torch.compile(gt_loss, fullgraph=True)
        sl_loss = torch.compile(sl_loss, fullgraph=True)
    out = {}
    x = parts[rank].clone().requires_grad_()
    with CommDebugMode() if not compiled else _null() as c1:
        y, loss = rs_loss(x)
        loss.backward()
    out["rs"] = ((y - _rows(sum(parts), rank, world, edge=True)).abs().max().item(), (x.grad - w).abs().max().item())
    xr = X.clone().requires_grad_()
    with CommDebugMode() if not compiled else _null() as c3:
        y, loss = sl_loss(xr)
        loss.backward()
    out["sl"] = (torch.equal(y, _rows(X, rank, world, edge=True)), (xr.grad - w).abs().max().item())
    xs = _rows(X, rank, world).clone().requires_grad_()
    with CommDebugMode() if not compiled else _null() as c2:
        y, loss = gt_loss(xs)
        loss.backward()
    want_grad = _rows(sum(vs), rank, world)
    out["gt"] = (torch.equal(y, X), (xs.grad - want_grad).abs().max().item())
    if not compiled:
        out["counts"] = (_counts(c1), _counts(c2), _counts(c3))
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("world,compiled", [(2, False), (4, False), (2, True)],
                         ids=["tp2", "tp4", "tp2-compiled"])
def test_sequence_collectives(world, compiled):
    for rank, r in enumerate(run_ranks(_case, world, compiled)):
        assert r["rs"][0] < 1e-6, (rank, r)  # this rank's rows of the sum (the padding copies the last row)
        assert r["rs"][1] < 1e-6, (rank, r)  # d/dx_r of sum_r sum(y_r * W_r) = W
        assert r["gt"][0] and r["gt"][1] < 1e-5, (rank, r)
        assert r["sl"][0] and r["sl"][1] < 1e-6, (rank, r)  # rows (last row copied into the padding); grad gathered
        if not compiled:
            fwd_bwd_rs, fwd_bwd_gt, fwd_bwd_sl = r["counts"]
            assert fwd_bwd_sl == {"allgather_": 1}, fwd_bwd_sl
            assert fwd_bwd_rs == {"_reduce_scatter_base_": 1, "allgather_": 1}, fwd_bwd_rs
            assert fwd_bwd_gt == {"allgather_": 1, "_reduce_scatter_base_": 1}, fwd_bwd_gt
