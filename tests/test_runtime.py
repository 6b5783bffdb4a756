"""Runtime behaviour on real ranks: torchrun end to end, bad input caught with a clear error."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_example_matches_unsharded():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           os.path.join(ROOT, "examples", "shard_gpt2.py"), "--layers", "2", "--hidden", "64", "--heads", "4",
           "--vocab", "1001", "--seq", "16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: sharded output equals the unsharded model on every rank" in proc.stdout
    assert "collectives per forward: all_gather x1, all_reduce x5" in proc.stdout


def _different_inputs(rank, world):
    import autotp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 8) + rank  # the classic mistake: unseeded / per-rank inputs
    sharded = autotp.shard(model, world, example_inputs=(x,))
    try:
        sharded(x)
    except ValueError as e:
        return str(e)
    return "no error"


def test_different_inputs_per_rank_is_an_error():
    for msg in run_ranks(_different_inputs, 2):
        assert "ranks were given different inputs" in msg and "seed" in msg


def _wrong_world_size(rank, world):
    import autotp

    try:
        autotp.shard(nn.Linear(4, 4), 4, example_inputs=(torch.randn(2, 4),))
    except ValueError as e:
        return str(e)
    return "no error"


def test_world_size_disagreeing_with_group_is_an_error():
    for msg in run_ranks(_wrong_world_size, 2):
        assert "world_size (4) disagrees with the process group, which has 2 ranks" in msg


def _dynamic_shapes(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import LlamaConfig, LlamaForCausalLM

    import autotp

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=128, num_hidden_layers=2, vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 8))
    kw = {"use_cache": False}
    errs = []
    dyn = autotp.shard(model, world, example_inputs=(ids,), example_kwargs=kw, dynamic=True)
    static = autotp.shard(model, world, example_inputs=(ids,), example_kwargs=kw)
    with torch.no_grad():
        for b, s in [(2, 8), (3, 5), (1, 17)]:
            x = torch.randint(0, 128, (b, s))
            errs.append((dyn(x, **kw).logits - model(x, **kw).logits).abs().max().item())
        static(ids, **kw)
        try:
            static(torch.randint(0, 128, (3, 8)), **kw)
            msg = "no error"
        except ValueError as e:
            msg = str(e)
    return errs, msg


def test_dynamic_batch_and_sequence():
    for errs, msg in run_ranks(_dynamic_shapes, 2):
        assert max(errs) <= 1e-5, errs
        assert "Pass dynamic=True" in msg and "(3, 8)" in msg


def _gather_round_trip(rank, world):
    """``traceable.gather`` over gloo (no same-host transport) puts every rank's ``local_slice`` of a
    whole tensor back together exactly -- outermost and innermost dims, leading dims of size 1,
    padded and chunked shards, bf16 -- and counts one collective per gather."""
    from torch.distributed.tensor.debug import CommDebugMode

    from autotp.runtime import Communicator
    from autotp.traceable import gather, local_slice

    comm = Communicator()
    bad, issued, seen = [], [], []
    cases = [((8 * world, 3), 0, 1, None), ((1, 1, 16 * world), 2, 1, None), ((3, 5, 8 * world), -1, 1, None),
             ((3, 5, 8 * world - 5), 2, 1, None), ((2, 6 * world, 4), 1, 3, None), ((4, 2 * world), 1, 2, torch.bfloat16)]
    for shape, dim, chunks, dtype in cases:
        whole = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 7 + shape[-1]))
        whole = whole.to(dtype) if dtype is not None else whole
        mine = local_slice(whole, dim, chunks, rank, world).contiguous()
        before = comm.issued
        with CommDebugMode() as mode:  # what c10d ran: one collective, visible to the counters tests use
            got = gather(mine, dim, chunks, whole.shape[dim], comm)
        issued.append(comm.issued - before)
        seen.append(sum(mode.get_comm_counts().values()))
        if got.shape != whole.shape or not torch.equal(got, whole):
            bad.append((shape, dim, chunks))
    return bad, issued, seen


@pytest.mark.parametrize("world", [2, 4])
def test_gather_writes_the_global_layout(world):
    for bad, issued, seen in run_ranks(_gather_round_trip, world):
        assert bad == [], bad
        assert issued == [1] * 6 and seen == [1] * 6, (issued, seen)
