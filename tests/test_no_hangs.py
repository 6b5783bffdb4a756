"""No hangs: a rank that dies or stalls mid-forward makes the others raise, naming the collective;
ranks that derived different plans are told so at ``shard`` time, before any forward.

The kill and stall cases need a harness of their own: ``run_ranks`` stops every rank as soon
as one fails, and here the surviving rank's error is the thing under test.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import autotp
from distributed import run_ranks


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))


def _survivor(rank, world, init_file, out, mode):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    options = {"timeout_s": 3.0, "check_inputs": False}
    if mode == "die_same_host":
        options["same_host_collectives"] = True
    sharded = autotp.shard(_mlp(), world, example_inputs=(x,), **options)
    if rank == 1:
        if mode == "stall":
            time.sleep(60)
        os._exit(3)  # dies mid-run, as the OOM killer would
    t0 = time.monotonic()
    try:
        with torch.no_grad():
            sharded(x)
        result = {"error": None}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    result["seconds"] = time.monotonic() - t0
    with open(out, "w") as f:
        json.dump(result, f)
    os._exit(0)


@pytest.mark.parametrize("mode", ["die", "stall", "die_same_host"])
def test_a_dead_or_stalled_rank_makes_the_others_raise(mode, tmp_path):
    ctx = mp.get_context("spawn")
    out = str(tmp_path / "rank0.json")
    procs = [ctx.Process(target=_survivor, args=(r, 2, str(tmp_path / "init"), out, mode)) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(120)
    alive = procs[0].is_alive()
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert not alive, "rank 0 hung"
    with open(out) as f:
        result = json.load(f)
    assert result["error"] is not None and result["error"].startswith("CollectiveError: autotp "), result
    if mode == "die_same_host":
        assert "rank(s) [1] did not arrive within 3 s" in result["error"], result
    else:
        assert "all_reduce (sum) of (4, 16)" in result["error"], result
    if mode == "stall":
        assert "within 3 s" in result["error"] and result["seconds"] < 30, result
    assert result["seconds"] < 30, result


class RankDependent(nn.Module):
    """Traces differently per rank: rank 1 has an extra column -> row block."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 16)
        self.c, self.d = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        if dist.get_rank() == 1:
            x = self.d(torch.relu(self.c(x)))
        return x


def _disagree(rank, world):
    torch.manual_seed(0)
    try:
        autotp.shard(RankDependent(), world, example_inputs=(torch.randn(4, 16),))
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_that_derive_different_plans_are_told_at_shard_time():
    for rank, msg in enumerate(run_ranks(_disagree, 2)):
        assert msg.startswith("the ranks derived different plans for forward"), msg
        assert f"this is rank {rank}" in msg and "no Python control flow on the rank" in msg, msg
