"""generate: generate() throughput of autotp vs Hugging Face tp_plan="auto" vs the unsharded model.

Run (ranks spawned by the harness, gloo, one thread per rank)::

    python bench/harness.py generate --preset llama-12x768 --world-sizes 2    # ~5-8 min on 2 cores
    python bench/harness.py generate --world-sizes 2 --small                  # smoke test (llama-tiny)

A LlamaForCausalLM preset with random weights (default ``llama-12x768``: 12 layers, hidden 768, 12 heads, 4 KV
heads, MLP 2048, vocab 32000; Llama because HF's tp_plan needs a model that has one -- GPT-2 has none), fp32,
greedy ``generate`` of exactly ``--new`` tokens (``min_new_tokens = max_new_tokens``) after a
``--prompt``-token prompt, at batch 1 and batch 8, ``torch.no_grad()``:

* autotp: ``autotp.shard_for_generation`` (prefill/decode graphs, KV cache sharded by heads), with
  gloo collectives, "autotp shm" with ``same_host_collectives=True`` (shared-memory all-reduce
  and all-gather between the ranks of this host; its own process group, so the two do not mix), and
  "autotp shm static" adding ``static_cache=True`` (preallocated buffers written in place: ``autotp.static_cache``);
* HF: ``from_pretrained(path, tp_plan="auto")`` of the same weights saved to a temporary directory;
* unsharded: every rank runs the whole model at the same time, one thread each (rank 0 reported);
* half width (``harness.Preset.half_width``): heads, MLP and vocab divided by the world size -- one rank's compute with
  no communication, autotp's per-rank limit (other weights: its tokens are not compared).

Each peer's tokens are compared with the unsharded model's, so a wrong result cannot look fast.
Peers are timed round-robin (each runs each batch once per round, order rotated).  The report is
new tokens per second (median over rounds, each call the max over ranks) and autotp / peer throughput ratios.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.distributed as dist

import autotp
import harness as H


def add_args(p):
    p.add_argument("--preset", default="llama-12x768", help="a Llama preset of harness.PRESETS")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--small", action="store_true", help="preset llama-tiny, 8 new tokens, 1 round")
    p.add_argument("--compile", action="store_true",
                   help="also time 'autotp shm static+compile': ShardConfig(static_cache=True, compile=True), the "
                        "steps under torch.compile")


def run(a) -> dict:
    if a.small:
        a.preset, a.new, a.rounds = "llama-tiny", 8, 1
    batches = [int(b) for b in str(a.batches).split(",")]
    rank, world = H.RANK, H.WORLD
    pre = H.preset(a.preset)
    positions = a.prompt + a.new + 8
    ref = H.build(pre, max_positions=positions)
    g = torch.Generator().manual_seed(1)
    inputs = {b: torch.randint(3, pre.vocab, (b, a.prompt), generator=g) for b in batches}
    kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)

    peers = {"unsharded": ref}
    if world > 1 and pre.kind == "llama":  # one rank's compute, no communication: autotp's per-rank limit
        peers["half width"] = H.build(pre.half_width(world), max_positions=positions)
    t0 = time.perf_counter()
    peers["autotp"] = autotp.shard_for_generation(ref, world)
    compile_s = time.perf_counter() - t0
    shm_group = dist.new_group(list(range(world)))
    peers["autotp shm"] = autotp.shard_for_generation(ref, world, group=shm_group, same_host_collectives=True)
    peers["autotp shm static"] = autotp.shard_for_generation(ref, world, group=shm_group, same_host_collectives=True,
                                                             static_cache=True)
    if a.compile:
        peers["autotp shm static+compile"] = autotp.shard_for_generation(
            ref, world, group=shm_group, same_host_collectives=True, static_cache=True, compile=True)
    saved = H.SavedCheckpoint(ref)
    hf_error = None
    try:
        peers["HF tp_plan"] = saved.hf_tp(type(ref), a.threads)
    except Exception as e:  # reported, not fatal
        hf_error = H.short_err(e)
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
    saved.close()
    times = {k: H.max_over_ranks(v) for k, v in times.items()}  # each round's call: its slowest rank
    if rank != 0:
        return {}
    tps = {(n, b): b * a.new / statistics.median(times[(n, b)]) for (n, b) in times}
    L = ["=" * 100]
    L.append(f"generate throughput, world size {world}, gloo, fp32, {a.threads} thread(s) per rank: {pre.describe()}; "
             f"prompt {a.prompt}, {a.new} new tokens, greedy, median of {a.rounds} rounds")
    L.append(f"autotp shard_for_generation: {compile_s:.1f} s (capture {peers['autotp'].autotp_steps.timings})")
    if a.compile:
        L.append(f"first generate calls (warm-up, all batches; the compiled peer compiles here): autotp shm static "
                 f"{warm['autotp shm static']:.1f} s, autotp shm static+compile {warm['autotp shm static+compile']:.1f} s")
    if hf_error:
        L.append(f"HF tp_plan failed: {hf_error}")
    body = [[n] + [f"{tps[(n, b)]:.1f}" for b in inputs] + [str(same[n]) if n != "half width" else "n/a"]
            for n in peers]
    L += H.table(["peer"] + [f"batch {b} tok/s" for b in inputs] + ["tokens = unsharded"], body, indent="")
    for mine in [n for n in peers if n.startswith("autotp")]:
        for n in peers:
            if not n.startswith("autotp"):
                rs = "  ".join(f"batch {b}: {tps[(mine, b)] / tps[(n, b)]:.2f}x" for b in inputs)
                L.append(f"{mine} / {n}: {rs}")
    L.append("=" * 100)
    return {"text": "\n".join(L), "model": pre.describe(), "compile_s": compile_s, "hf_error": hf_error,
            "rows": [{"peer": n, "batch": b, "tokens_per_s": tps[(n, b)], "seconds": times[(n, b)],
                      "tokens_equal_unsharded": same[n] if n != "half width" else None} for (n, b) in times]}


def report(a, results) -> str:
    return "\n".join(r["text"] for r in results.values())


if __name__ == "__main__":
    H.main(["generate"] + sys.argv[1:])
