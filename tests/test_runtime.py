"""Runtime behaviour on real ranks: torchrun end to end, bad input caught with a clear error."""
from __future__ import annotations

import os
import subprocess
import sys

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
