"""Shard a small GPT-2 over CPU ranks with gloo, check it against the unsharded model, print the plan.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/shard_gpt2.py

Options: --layers, --hidden, --heads, --vocab, --batch, --seq (defaults: a 4-layer,
256-hidden GPT-2 with 8 heads and a 50257-token vocab: small, but with GPT-2's
fused c_attn, Conv1D weights, tied LM head and an uneven vocab).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    import autotp

    logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)  # every rank builds the same weights and inputs
    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=args.vocab,
                        n_positions=max(64, args.seq))
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits

    world = int(os.environ.get("WORLD_SIZE", "1"))
    t0 = time.perf_counter()
    sharded = autotp.shard(model, world_size=world, example_inputs=(ids,), example_kwargs={"use_cache": False})
    compile_s = time.perf_counter() - t0
    with torch.no_grad():
        logits = sharded(ids, use_cache=False).logits
    err = (logits - reference).abs().max().item()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print(sharded.plan.summary())
        print(f"\ncompile (capture + plan + lower): {compile_s:.2f} s  {sharded.timings}")
        print(f"max |logits - unsharded logits| = {err:.3e} on rank 0 (world_size={world})")
    ok = err <= 1e-5 * max(1.0, reference.abs().max().item())
    if dist.is_initialized():
        flag = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(flag)
        ok = flag.item() == 0
        dist.destroy_process_group()
    if rank == 0:
        print("OK: sharded output equals the unsharded model on every rank" if ok else "MISMATCH")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
