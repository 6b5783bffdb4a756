"""2-D parallelism: data x tensor on a 2 x 2 ``DeviceMesh`` of 4 gloo ranks.

autotp shards over the mesh's ``tp`` axis; FSDP2 (``fully_shard``) or DDP replicates
over ``dp``.  Each data-parallel group trains on its own half of the batch; after one
step every rank's gradient (its tensor-parallel shard, whole over ``dp``) equals the
single-process model's gradient on the whole batch, cut the way the plan shards it.
A checkpoint (model and optimizer) saved at 2 x 2 loads at 1 x 4.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import run_ranks_once


def _model():
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, num_hidden_layers=2,
        vocab_size=101))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 101, (4, 8), generator=g)  # 2 rows per data-parallel group


def _loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _narrow(t, placement, world, rank):
    from autotp.placements import Shard, placement_index, take_shard

    if not isinstance(placement, Shard):
        return t
    return take_shard(t, placement.dim, *placement_index(placement, t.shape[placement.dim], world, rank))


def _two_d(rank: int, world: int, wrapper: str, ckpt: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import autotp

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
    ids = _batch()
    mine = ids[2 * dp: 2 * dp + 2]

    reference = _model()
    _loss(reference(ids, use_cache=False).logits, ids).backward()

    model = _model()
    sharded = autotp.shard(model, 2, group=mesh["tp"].get_group(), example_inputs=(mine,),
                           example_kwargs={"use_cache": False})
    sharded.train()
    if wrapper == "fsdp":
        from torch.distributed.fsdp import fully_shard

        trained = fully_shard(sharded, mesh=mesh["dp"])
    else:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(sharded, process_group=mesh["dp"].get_group())
    before = sharded.comm.issued
    _loss(trained(mine, use_cache=False).logits, mine).backward()
    tp_collectives = sharded.comm.issued - before

    ref = dict(reference.named_parameters())
    worst, checked = 0.0, 0
    for name, p in sharded.module.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2: a DTensor over dp
        want = _narrow(ref[name].grad, sharded.plan.parameters[name].placement, 2, tp)
        worst = max(worst, (grad - want).abs().max().item() / max(1e-6, want.abs().max().item()))
        checked += 1
    out = {"worst": worst, "checked": checked, "tp_collectives": tp_collectives,
           "planned": sum(sharded.plan.counts("forward").values()) + sum(sharded.plan.counts("backward").values())}
    out["ckpt"], out["ckpt_opt"] = _save_2x2_load_1x4(sharded, trained, reference, dp, ckpt, wrapper)
    dist.barrier()
    return out


def _save_2x2_load_1x4(sharded, trained, reference, dp: int, ckpt: str, wrapper: str) -> tuple[float, float]:
    """One SGD-with-momentum step at 2 x 2, checkpointed (model and optimizer); loaded into a 1 x 4
    sharding.  Returns the loaded model's logits error and its optimizer state's (the momentum
    buffer) error against the single-process model after the same step.  (SGD: its update is linear
    in the gradient, so rounding stays rounding; Adam's first step divides by |g|.)"""
    import torch.distributed as dist

    import autotp

    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5, momentum=0.9)
    optimizer.step()
    if wrapper == "fsdp" or dp == 0:  # FSDP2: every rank (gathered over dp, replica 0 writes); DDP: one replica
        autotp.checkpoint.save(ckpt, sharded, optimizer, step=1)
    dist.barrier()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    ref_opt.step()
    probe = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(7))
    four = autotp.shard(_model(), 4, example_inputs=(probe,), example_kwargs={"use_cache": False})
    opt4 = torch.optim.SGD(four.parameters(), lr=0.5, momentum=0.9)
    info = autotp.checkpoint.load(ckpt, four, opt4)
    assert info["world_size"] == 2 and info["step"] == 1, info
    with torch.no_grad():
        got = four(probe, use_cache=False).logits
        want = reference(probe, use_cache=False).logits
    ref = dict(reference.named_parameters())
    rank = dist.get_rank()
    opt_err = max((opt4.state[p]["momentum_buffer"] - _narrow(ref_opt.state[ref[n]]["momentum_buffer"],
                                                               four.plan.parameters[n].placement, 4, rank)).abs().max().item()
                  / max(1e-12, ref_opt.state[ref[n]]["momentum_buffer"].abs().max().item())
                  for n, p in four.module.named_parameters())
    return (got - want).abs().max().item() / want.abs().max().item(), opt_err


@pytest.mark.parametrize("wrapper", ["fsdp", "ddp"])
def test_data_by_tensor_parallel_gradients_equal_the_single_process_model(wrapper, tmp_path):
    for r in run_ranks_once(_two_d, 4, wrapper, str(tmp_path / "ckpt")):
        assert r["checked"] > 0
        assert r["worst"] < 1e-5, r
        assert r["tp_collectives"] == r["planned"], r  # the TP group's collectives, as planned
        assert r["ckpt"] < 1e-5 and r["ckpt_opt"] < 1e-5, r  # saved at 2 x 2, loaded at 1 x 4


@pytest.mark.parametrize("wrapper", ["fsdp", "ddp"])
def test_train_2d_example_under_torchrun(wrapper):
    """examples/train_2d.py on 4 CPU ranks (2 x 2): it runs and the loss falls."""
    import os
    import re
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                           str(port), "examples/train_2d.py", "--tp", "2", "--data-parallel", wrapper, "--steps", "4"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\S+) \(mesh dp=2 x tp=2", proc.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, proc.stdout
