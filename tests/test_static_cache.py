"""generate() with a static, preallocated KV cache sharded by heads (issue 14).

``shard_for_generation(..., static_cache=True)``: greedy, beam search and sampling on a
left-padded batch are token-for-token the unsharded model's at world sizes 2 and 4 (Llama
with GQA; GPT-2 with its fused c_attn; an uneven vocabulary), eager and compiled; each rank's
buffers hold its heads; one static decode step issues the collectives its plan lists; and
the analysis never redistributes a tensor written in place.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks
from model_cases import CASES
from test_arch_classes import _build as _arch_build
from test_generation import MODES, _generate, _prompts

BUILDERS = {c.name: c.build for c in CASES}
BUILDERS["falcon_multi_query"] = lambda: _arch_build("multi_query")  # one KV head: computed whole on every rank


def _comm_counts(comm) -> dict:
    names = {"allreduce_": "all_reduce", "allgather_": "all_gather", "_allgather_base_": "all_gather"}
    counts = {}
    for k, v in comm.get_comm_counts().items():
        name = str(k).split(".")[-1]
        counts[names.get(name, name)] = counts.get(names.get(name, name), 0) + v
    return counts


def _case(rank, world, name, modes, compile_steps):
    import autotp
    from torch.distributed.tensor.debug import CommDebugMode
    from transformers.cache_utils import StaticCache

    torch.manual_seed(0)
    ref = BUILDERS[name]()
    tp = autotp.shard_for_generation(ref, world, static_cache=True, compile=compile_steps)
    assert tp.generation_config.cache_implementation == "static"
    ids, mask = _prompts(ref.config.vocab_size)
    out = {}
    for mode in modes:
        out[mode] = (_generate(ref, ids, mask, **MODES[mode]), _generate(tp, ids, mask, **MODES[mode]))
    if compile_steps:  # (CommDebugMode is a dispatch mode: torch.compile refuses to trace under it)
        return out, None, None, None, None, ref.config
    # one prefill and one static decode step by hand: the buffers, and the decode step's collectives
    with torch.no_grad():
        if ref.config.is_encoder_decoder:
            from transformers.cache_utils import EncoderDecoderCache

            enc = tp.get_encoder()(input_ids=ids, attention_mask=mask)
            cache = EncoderDecoderCache(StaticCache(config=tp.config, max_cache_len=16),
                                        StaticCache(config=tp.config, max_cache_len=ids.shape[1]))
            start = torch.zeros(3, 1, dtype=torch.long)
            tp(decoder_input_ids=start, encoder_outputs=enc, attention_mask=mask, cache=cache)
            layer = cache.self_attention_cache.layers[0]
            buffers, offset = tuple(layer.keys.shape), int(layer.cumulative_length)
            with CommDebugMode() as comm:
                tp(decoder_input_ids=start, encoder_outputs=enc, attention_mask=mask, cache=cache)
        else:
            cache = StaticCache(config=tp.config, max_cache_len=16)
            tp(input_ids=ids, attention_mask=mask, cache=cache)
            layer = cache.layers[0]
            buffers, offset = tuple(layer.keys.shape), int(layer.cumulative_length)
            with CommDebugMode() as comm:
                tp(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], 1), cache=cache)
    after = int(layer.cumulative_length)
    plan = tp.autotp_steps.plans["static_decode"]
    return out, buffers, (offset, after), _comm_counts(comm), plan.counts("forward"), ref.config


# (case, world size, all-reduces of one decode step: 2 per layer -- 3 per T5 decoder layer, with its
# cross-attention -- + 1 for the vocab-parallel embedding)
STATIC_CASES = [("M3_llama_untied", 2, 5), ("M3_llama_untied", 4, 5), ("M2_gpt2", 2, 5), ("M9_uneven_gpt2", 2, 5),
                ("M8_t5", 2, 7), ("falcon_multi_query", 2, 3)]  # (Falcon's parallel block: 1 per layer)


@pytest.mark.parametrize("name,world,step_all_reduce", STATIC_CASES, ids=[f"{n}-tp{w}" for n, w, _ in STATIC_CASES])
def test_static_cache_generate_matches_unsharded(name, world, step_all_reduce):
    results = run_ranks(_case, world, name, list(MODES), False)
    for rank, (out, buffers, (offset, after), counts, plan_counts, config) in enumerate(results):
        for mode, (want, got) in out.items():
            assert torch.equal(want, got), f"rank {rank} {name} {mode}:\nwant {want}\ngot  {got}"
        if config.is_encoder_decoder:  # T5: the decoder start token is the prefill
            kv, head_dim, prefill = config.num_heads, config.d_kv, 1
        else:
            kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim, prefill = config.hidden_size // config.num_attention_heads, 9
        heads = kv // world if kv % world == 0 else kv  # fewer KV heads than ranks: whole on every rank
        assert buffers == (3, heads, 16, head_dim), buffers
        assert (offset, after) == (prefill, prefill + 1)  # the prompt, then one token written in place
        assert counts.get("all_reduce", 0) == plan_counts.get("all_reduce") == step_all_reduce, (counts, plan_counts)
        assert counts.get("all_gather", 0) == plan_counts.get("all_gather") == 1, (counts, plan_counts)
    for mode in MODES:
        assert all(torch.equal(r[0][mode][1], results[0][0][mode][1]) for r in results)


@pytest.mark.parametrize("world", [2, 4])
def test_static_cache_compiled_matches_unsharded(world):
    """The static decode step under torch.compile (Inductor, CPU): greedy and beam search exact."""
    results = run_ranks(_case, world, "M3_llama_untied", ["greedy", "beam"], True)
    for rank, (out, *_rest) in enumerate(results):
        for mode, (want, got) in out.items():
            assert torch.equal(want, got), f"rank {rank} compiled {mode}:\nwant {want}\ngot  {got}"


# ---------------------------------------------------------------- no write lands in a copy

class _WritesInput(torch.nn.Module):
    def forward(self, x, buf, at):
        buf.index_copy_(2, at, x)  # written along dim 2
        return (buf.sum(),)


def _analyze(module, args, input_placements):
    from autotp.analyze import analyze
    from autotp.capture import capture

    gm = capture(module, args)
    return analyze(gm, 2, input_placements=input_placements)


def test_write_into_input_along_its_shard_is_refused():
    """An input written in place along the dim it is sharded on cannot keep its shard; gathering it
    would make the write land in a copy (the caller's cache never updated): a clear error instead."""
    from autotp.placements import Shard

    args = (torch.ones(2, 4, 1), torch.zeros(2, 4, 6), torch.tensor([3]))
    with pytest.raises(ValueError, match="writes in place into buf.*all_gather.*land in a copy"):
        _analyze(_WritesInput(), args, {1: Shard(2)})
    # sharded on another dim, each rank writes its slice: no collective on the buffer
    analysis = _analyze(_WritesInput(), args, {1: Shard(1)})
    assert not [r for r in analysis.redistributions if r.src.op == "placeholder" and r.src.name == "buf"]


def test_write_visible_through_a_view():
    """A view taken before an in-place write and read after it sees the write."""
    from autotp.patterns import mutated_args, write_visible

    class M(torch.nn.Module):
        def forward(self, x):
            h = x * 2
            v = h[:, :2]
            h.add_(1)
            return (v + 0, h * 3)

    from autotp.capture import capture

    gm = capture(M(), (torch.ones(2, 4),))
    writer = next(n for n in gm.graph.nodes if mutated_args(n))
    assert write_visible(mutated_args(writer)[0], writer)

    class N(torch.nn.Module):
        def forward(self, x):
            h = x * 2
            h.add_(1)
            return (h * 3,)

    gm = capture(N(), (torch.ones(2, 4),))
    writer = next(n for n in gm.graph.nodes if mutated_args(n))
    assert not write_visible(mutated_args(writer)[0], writer)  # only the write's own result reads it
