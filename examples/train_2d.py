"""2-D parallel training: tensor parallel (autotp) inside a group, data parallel (FSDP2 or DDP) across groups.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 examples/train_2d.py --tp 2            # 2 x 2 on CPU (gloo)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/train_2d.py --tp 8                                                      # TP in a node, FSDP across

The ranks form a ``DeviceMesh`` of shape ``(world / tp, tp)`` named ``("dp", "tp")``; with
torchrun's rank order the ``tp`` groups are consecutive ranks, so each one lies inside a node
(NVLink) and only FSDP's gradient reduce-scatter and parameter all-gather cross nodes.  Each
data-parallel group reads its own slice of every batch; the TP ranks of a group read the same one.
Random weights and synthetic data (nothing downloaded); on GPUs NCCL and one GPU per rank.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (divides the world size)")
    ap.add_argument("--data-parallel", choices=["fsdp", "ddp"], default="fsdp")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4, help="rows per data-parallel group per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)

    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    import autotp

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if gpu else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % args.tp:
        raise SystemExit(f"--tp {args.tp} does not divide the world size {world}")
    mesh = init_device_mesh("cuda" if gpu else "cpu", (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")

    torch.manual_seed(0)  # the same weights on every rank
    config = transformers.LlamaConfig(hidden_size=args.hidden, num_attention_heads=8, num_key_value_heads=4,
                                      intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                                      vocab_size=1000)
    model = transformers.LlamaForCausalLM(config)
    example = torch.zeros(args.batch, args.seq, dtype=torch.long)
    sharded = autotp.shard(model, args.tp, group=mesh["tp"].get_group(), example_inputs=(example,),
                           example_kwargs={"use_cache": False}, device=device)
    sharded.train()
    if args.data_parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        trained = fully_shard(sharded, mesh=mesh["dp"])
    else:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(sharded, process_group=mesh["dp"].get_group())
    optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3)

    dp = mesh.get_local_rank("dp")
    for step in range(1, args.steps + 1):
        # synthetic: one fixed global batch, which the model memorises (the loss falls); each dp group takes its rows
        batch = torch.randint(0, config.vocab_size, (mesh["dp"].size() * args.batch, args.seq),
                              generator=torch.Generator().manual_seed(1))
        ids = batch[dp * args.batch:(dp + 1) * args.batch].to(device)
        logits = trained(ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh["dp"].get_group())
        if rank == 0:
            print(f"step {step}: loss {mean.item() / mesh['dp'].size():.4f} "
                  f"(mesh dp={mesh['dp'].size()} x tp={args.tp}, {args.data_parallel})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
