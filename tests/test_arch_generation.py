"""generate() on the parallel-residual, MoE and multi-query classes: token-for-token the unsharded model's.

GPT-NeoX with a parallel residual, Mixtral (3-D expert weights through a grouped matmul) and Falcon
with one KV head (q heads sharded, the one k and v head computed whole on every rank: each rank
caches its q heads' K/V whole), from ``test_arch_classes``, on 2 gloo ranks: greedy decoding and
beam search of left-padded prompts against the same model unsharded, and one decode step's
all-reduces as counted and as planned -- one per parallel-residual layer (GPT-NeoX, Falcon), two
per Mixtral layer (attention, experts), plus one for the vocab-parallel embedding.
"""
from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

from distributed import run_ranks
from test_arch_classes import CASES, LAYERS, VOCAB, _build

MODES = {"greedy": dict(do_sample=False), "beam": dict(num_beams=4, do_sample=False)}


def _generate(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kw)


def _case(rank: int, world: int, case: str):
    import autotp
    from transformers.cache_utils import DynamicCache

    ref = _build(case)
    tp = autotp.shard_for_generation(ref, world)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[mask == 0] = 0
    out = {mode: (_generate(ref, ids, mask, **kw), _generate(tp, ids, mask, **kw)) for mode, kw in MODES.items()}
    cache = DynamicCache()
    with torch.no_grad():
        tp(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        with CommDebugMode() as comm:  # one decode step
            tp(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], 1), cache=cache)
    ran = sum(v for k, v in comm.get_comm_counts().items() if "allreduce" in str(k))
    return out, ran, tp.autotp_steps.plans["decode"].counts("forward").get("all_reduce")


@pytest.mark.parametrize("case", ["parallel_residual", "moe", "multi_query"])
def test_generate_matches_unsharded(case):
    for rank, (out, ran, planned) in enumerate(run_ranks(_case, 2, case)):
        for mode, (want, got) in out.items():
            assert torch.equal(want, got), f"rank {rank} {case} {mode}:\nwant {want}\ngot  {got}"
            assert got.shape[1] > 7  # the prompt (7 tokens) and what it generated
        assert ran == planned == CASES[case] * LAYERS + 1, (ran, planned)
