"""generate() throughput: autotp vs Hugging Face tp_plan="auto" vs the unsharded model.

Run (2 CPU ranks, gloo, one thread per rank)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/bench_generate.py            # ~5-8 min on 2 cores
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/bench_generate.py --small    # smoke test

A LlamaForCausalLM with random weights (config defaults: 12 layers, hidden 768, 12 heads, 4 KV heads,
MLP 2048, vocab 32000; Llama because HF's tp_plan needs a model that has one -- GPT-2 has none), fp32,
greedy ``generate`` of exactly ``--new`` tokens (``min_new_tokens = max_new_tokens``) after a
``--prompt``-token prompt, at batch 1 and batch 8, ``torch.no_grad()``:

* autotp: ``autotp.shard_for_generation`` (prefill/decode graphs, KV cache sharded by heads), with
  gloo collectives, and "autotp shm" with ``same_host_collectives=True`` (shared-memory all-reduce
  and all-gather between the ranks of this host; its own process group, so the two do not mix);
* HF: ``from_pretrained(path, tp_plan="auto")`` of the same weights saved to a temporary directory;
* unsharded: every rank runs the whole model at the same time, one thread each (rank 0 reported);
* half width (world size 2): the model with half the heads, MLP and vocab -- one rank's compute with
  no communication, autotp's per-rank limit (other weights: its tokens are not compared).

Each peer's tokens are compared with the unsharded model's, so a wrong result cannot look fast.
Peers are timed round-robin (each runs each batch once per round, order rotated).  The report is
new tokens per second (median over rounds) and autotp / peer throughput ratios.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

import autotp


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--small", action="store_true", help="2 layers, hidden 128, 8 new tokens, 1 round")
    p.add_argument("--compile", action="store_true",
                   help="also time 'autotp shm+compile': ShardConfig(compile=True), the steps under torch.compile")
    a = p.parse_args()
    if a.small:
        a.layers, a.hidden, a.heads, a.kv_heads, a.intermediate, a.vocab = 2, 128, 4, 2, 256, 1000
        a.new, a.rounds = 8, 1
    a.batches = [int(b) for b in a.batches.split(",")]
    return a


def main():
    a = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1800))
    rank, world = dist.get_rank(), dist.get_world_size()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load0 = os.getloadavg()[0]
    cfg = transformers.LlamaConfig(num_hidden_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                                   num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate,
                                   vocab_size=a.vocab, max_position_embeddings=a.prompt + a.new + 8)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {b: torch.randint(3, a.vocab, (b, a.prompt), generator=g) for b in a.batches}
    kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)

    peers = {"unsharded": ref}
    if world == 2:  # one rank's compute, no communication: autotp's per-rank limit
        torch.manual_seed(0)
        peers["half width"] = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads // 2,
            num_key_value_heads=max(1, a.kv_heads // 2), head_dim=a.hidden // a.heads,
            intermediate_size=a.intermediate // 2, vocab_size=a.vocab // 2,
            max_position_embeddings=a.prompt + a.new + 8)).eval()
    t0 = time.perf_counter()
    peers["autotp"] = autotp.shard_for_generation(ref, world)
    compile_s = time.perf_counter() - t0
    shm_group = dist.new_group(list(range(world)))
    peers["autotp shm"] = autotp.shard_for_generation(ref, world, group=shm_group, same_host_collectives=True)
    if a.compile:
        peers["autotp shm+compile"] = autotp.shard_for_generation(ref, world, group=shm_group,
                                                                  same_host_collectives=True, compile=True)
    path = [tempfile.mkdtemp(prefix="bench_gen_") if rank == 0 else None]
    if rank == 0:
        ref.save_pretrained(path[0])
    dist.broadcast_object_list(path, src=0)
    hf_error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peers["HF tp_plan"] = transformers.LlamaForCausalLM.from_pretrained(path[0], tp_plan="auto",
                                                                               dtype=torch.float32).eval()
        torch.set_num_threads(1)
    except Exception as e:  # reported, not fatal
        hf_error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    dist.barrier()

    want, same = {}, {}
    warm = {}
    with torch.no_grad():
        for b, ids in inputs.items():  # warm-up (compilation, for the compiled peer) and correctness
            want[b] = ref.generate(input_ids=ids, **kw)
            for name, m in peers.items():
                same.setdefault(name, True)
                t = time.perf_counter()
                got = m.generate(input_ids=ids % m.config.vocab_size, **kw)
                same[name] &= bool(torch.equal(got, want[b])) if name != "half width" else True  # other weights
                warm[name] = warm.get(name, 0.0) + time.perf_counter() - t
        times = {(n, b): [] for n in peers for b in inputs}
        names = list(peers)
        for r in range(a.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for b, ids in inputs.items():
                for name in order:
                    dist.barrier()
                    t = time.perf_counter()
                    peers[name].generate(input_ids=ids % peers[name].config.vocab_size, **kw)
                    times[(name, b)].append(time.perf_counter() - t)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path[0], ignore_errors=True)
        tps = {(n, b): b * a.new / statistics.median(times[(n, b)]) for (n, b) in times}
        print("=" * 100)
        print(f"generate throughput, world size {world}, gloo, fp32, 1 thread per rank: LlamaForCausalLM "
              f"{a.layers}x{a.hidden}, heads {a.heads} (KV {a.kv_heads}), MLP {a.intermediate}, vocab {a.vocab}; "
              f"prompt {a.prompt}, {a.new} new tokens, greedy, median of {a.rounds} rounds")
        print(f"autotp shard_for_generation: {compile_s:.1f} s (capture {peers['autotp'].autotp_steps.timings})")
        if a.compile:
            print(f"first generate calls (warm-up, all batches; the compiled peer compiles here): "
                  f"autotp shm {warm['autotp shm']:.1f} s, autotp shm+compile {warm['autotp shm+compile']:.1f} s")
        if hf_error:
            print(f"HF tp_plan failed: {hf_error}")
        print(f"{'peer':<20}" + "".join(f"{f'batch {b} tok/s':>18}" for b in inputs) + f"{'tokens = unsharded':>22}")
        for n in peers:
            print(f"{n:<20}" + "".join(f"{tps[(n, b)]:>18.1f}" for b in inputs) + f"{str(same[n]) if n != 'half width' else 'n/a':>22}")
        for mine in [n for n in peers if n.startswith("autotp")]:
            for n in peers:
                if not n.startswith("autotp"):
                    ratios = "  ".join(f"batch {b}: {tps[(mine, b)] / tps[(n, b)]:.2f}x" for b in inputs)
                    print(f"{mine} / {n}: {ratios}")
        print(f"load average (1 min) start/end: {load0:.2f} / {os.getloadavg()[0]:.2f} (2 ranks alone give ~2)")
        print(f"command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} torchrun --nproc_per_node {world} "
              + " ".join(sys.argv))
        print("=" * 100)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
