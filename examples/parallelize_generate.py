"""Notebook-style inference: ``autotp.parallelize`` from one ordinary Python process.

    python examples/parallelize_generate.py                 # a small GPT-2, 2 CPU workers
    python examples/parallelize_generate.py --model t5      # a small T5 (encoder-decoder)
    python examples/parallelize_generate.py --static-cache --compile   # preallocated KV cache, compiled decode step

No launcher: the script is the notebook.  It builds a small model with random
weights (nothing is downloaded), shards it over 2 worker processes, runs beam
search with ``no_repeat_ngram_size`` (the seed's parallelformers example) on a
left-padded batch, checks the tokens against the unsharded model, prints the
decode step's plan, and shuts the workers down.
"""
from __future__ import annotations

import argparse
import time

import torch

import autotp


def build(kind: str):
    import transformers

    torch.manual_seed(0)
    if kind == "t5":
        cfg = transformers.T5Config(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2, vocab_size=512,
                                    decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    cfg = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=128, vocab_size=512)
    return transformers.GPT2LMHeadModel(cfg).eval()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["gpt2", "t5"], default="gpt2")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--static-cache", action="store_true", help="a preallocated KV cache written in place")
    p.add_argument("--compile", action="store_true", help="the decode step under torch.compile (compiles on first use)")
    a = p.parse_args()
    model = build(a.model)
    ids = torch.randint(3, 512, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ids[mask == 0] = 0
    kw = dict(num_beams=5, no_repeat_ngram_size=4, max_new_tokens=15, pad_token_id=0)

    t0 = time.perf_counter()
    with autotp.parallelize(model, world_size=a.world_size, static_cache=a.static_cache, compile=a.compile) as lm:
        print(f"{a.world_size} workers up and sharded in {time.perf_counter() - t0:.1f} s")
        out = lm.generate(input_ids=ids, attention_mask=mask, **kw)
        print(lm.plans["static_decode" if a.static_cache else "decode"].summary())
    want = model.generate(input_ids=ids, attention_mask=mask, **kw)
    print("generated:\n", out)
    print("same tokens as the unsharded model:", torch.equal(out, want))
    if not torch.equal(out, want):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
