"""Architecture classes of the coverage issue, each with a tiny model, on gloo ranks at world 2 and 4.

For every case: the sharded logits equal the unsharded model's, every parameter gradient of
one backward equals the unsharded gradient's slice (fp32, 1e-5 relative), the parameter
share per rank is what the class promises, and the collectives one forward and one backward
issue at run time (``CommDebugMode``) are as many as the plan lists.

* ``parallel_residual``: GPT-NeoX with ``x + attn(ln1(x)) + mlp(ln2(x))`` (biases on both
  row-parallel linears, vocab 101: padded at both world sizes).  The two branches' partial
  sums and the replicated residual are added before one all-reduce, so a forward all-reduces
  once per layer, plus once for the vocab-parallel embedding -- Megatron issues two per layer.
* ``sequential``: Llama (``x + attn``, then ``+ mlp``): two per layer, plus the embedding.
* ``interleaved_rotary``: GPT-J, whose rotary embedding rotates pairs with ``stack`` + ``flatten``
  (view-like ops on the heads' shard) -- and a parallel-residual block: one per layer.
* ``fused_qkv_per_head``: Bloom, whose fused QKV is laid out ``[.., heads, 3, head_dim]`` and
  picked apart with ``select``; ALiBi scores through ``baddbmm`` on local heads.
* ``weight_transposed``: Falcon, whose linears are written ``x @ W.T`` (``FalconLinear``), seeded
  like ``nn.Linear`` from the matmul's math (a sequential block here: Falcon's parallel one writes
  its branch sum in place, ``add_``, which no rule keeps partial yet).
* ``moe``: Mixtral, whose experts are 3-D weights (``gate_up_proj (E, 2I, H)``, ``down_proj
  (E, H, I)``) run through a grouped matmul: column -> row inside every expert, the router
  replicated; one all-reduce for the attention and one for the MoE per layer.
* ``state_space``: Mamba (its CPU path: causal depthwise conv1d, then a selective scan written as a
  loop over the sequence), sharded by channels as Megatron shards it: ``in_proj`` column-parallel
  (its output chunked into x and the gate z, each split by channels), the depthwise conv per
  channel (weight, bias and ``groups`` local), ``x_proj`` row-parallel -- dt, B and C are needed
  whole: one all-reduce before their split --, ``dt_proj`` column-parallel though written
  ``W @ dt`` (left-multiplied), ``A_log`` and ``D`` split by channel though read through
  ``-exp(A_log.float())`` and size-1 dims, the scan on the rank's channels, ``out_proj``
  row-parallel: two all-reduces per layer.  Backward too: dt, B and C (C read once per time step)
  reach the sharded scan along paths of replicated ops, and one ``copy`` where they meet, after
  the all-reduce, sums their gradients once.
* ``multi_query``: Falcon with one KV head (fewer than the ranks) in its fused
  ``query_key_value [(heads + 2) * head_dim]``, viewed per head and cut ``[:-2]`` / ``[[-2]]`` /
  ``[[-1]]``: one linear per part (``autotp.split_linears``), the q rows sharded by heads and the
  k and v rows whole (the weight held in pieces), every rank attending its q heads to the whole
  K/V; and a parallel block summing its branches in place (``add_``): one all-reduce per layer.
* ``uneven_fused_split``: Phi-3 with grouped-query attention (4 q heads, 2 KV heads) in one
  ``qkv_proj`` cut by slices into parts of unequal widths ``[64, 32, 32]``: every part sharded at
  world 2; at world 4, fewer KV heads than ranks, q sharded and k, v whole.
* ``fused_qkv_per_kv_group``: Falcon's new decoder architecture, 8 q heads in 4 KV groups, its
  fused projection viewed ``[.., groups, q heads per group + 2, head_dim]``, cut along the second
  of those dims (``[:-2]``, ``[[-2]]``, ``[[-1]]``) and broadcast: sharded by whole KV groups.
* ``gqa_fewer_kv_heads``: Llama with 2 KV heads in separate projections: at world 4 the k and v
  projections stay whole (listed with their reason), q and the output projection are sharded
  and each rank's q heads read their KV heads from the repeated whole K/V.
"""
from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

from distributed import run_ranks_once

LAYERS = 2
VOCAB = 101


def _build(case: str):
    import transformers

    torch.manual_seed(0)
    if case == "parallel_residual":
        cfg = transformers.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=LAYERS,
                                         intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                                         rotary_pct=0.25, use_parallel_residual=True)
        return transformers.GPTNeoXForCausalLM(cfg).eval()
    if case == "sequential":
        cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                       num_hidden_layers=LAYERS, intermediate_size=128, vocab_size=VOCAB)
        return transformers.LlamaForCausalLM(cfg).eval()
    if case == "interleaved_rotary":
        cfg = transformers.GPTJConfig(n_embd=64, n_head=4, n_layer=LAYERS, n_inner=128, rotary_dim=8,
                                      vocab_size=VOCAB, n_positions=64)
        return transformers.GPTJForCausalLM(cfg).eval()
    if case == "fused_qkv_per_head":
        cfg = transformers.BloomConfig(hidden_size=64, n_head=4, n_layer=LAYERS, vocab_size=VOCAB)
        return transformers.BloomForCausalLM(cfg).eval()
    if case == "weight_transposed":
        cfg = transformers.FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=LAYERS,
                                        vocab_size=VOCAB, bias=True, new_decoder_architecture=False,
                                        multi_query=False, parallel_attn=False)
        return transformers.FalconForCausalLM(cfg).eval()
    if case == "moe":
        cfg = transformers.MixtralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                         num_hidden_layers=LAYERS, intermediate_size=128, vocab_size=VOCAB,
                                         num_local_experts=4, num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(cfg).eval()
    if case == "state_space":
        cfg = transformers.MambaConfig(hidden_size=64, intermediate_size=128, state_size=8, time_step_rank=8,
                                       conv_kernel=4, num_hidden_layers=LAYERS, vocab_size=VOCAB)
        return transformers.MambaForCausalLM(cfg).eval()
    if case == "multi_query":
        cfg = transformers.FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=LAYERS,
                                        vocab_size=VOCAB, bias=True, new_decoder_architecture=False,
                                        multi_query=True, parallel_attn=True)
        return transformers.FalconForCausalLM(cfg).eval()
    if case == "uneven_fused_split":
        cfg = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=LAYERS, intermediate_size=128, vocab_size=VOCAB,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return transformers.Phi3ForCausalLM(cfg).eval()
    if case == "fused_qkv_per_kv_group":
        cfg = transformers.FalconConfig(hidden_size=64, num_attention_heads=8, num_kv_heads=4,
                                        num_hidden_layers=LAYERS, vocab_size=VOCAB, new_decoder_architecture=True,
                                        parallel_attn=True)
        return transformers.FalconForCausalLM(cfg).eval()
    if case == "gqa_fewer_kv_heads":
        cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                       num_hidden_layers=LAYERS, intermediate_size=128, vocab_size=VOCAB)
        return transformers.LlamaForCausalLM(cfg).eval()
    raise KeyError(case)


# case -> forward all-reduces per layer at the optimum (the vocab-parallel embedding adds one)
CASES = {"parallel_residual": 1, "sequential": 2, "interleaved_rotary": 1, "fused_qkv_per_head": 2, "moe": 2,
         "weight_transposed": 2, "multi_query": 1, "uneven_fused_split": 2, "fused_qkv_per_kv_group": 1,
         "gqa_fewer_kv_heads": 2, "state_space": 2}
# case -> backward all-reduces per layer where the class promises it (Mamba: the gradients of x_proj's
# input and of in_proj's input, each reduced once; the LM head's input adds one)
BACKWARD = {"state_space": 2}
# (case, world) -> the shapes of the weight matrices that stay whole, per layer (the MoE router:
# experts x hidden; the k and v projections of 2 KV heads at world 4)
WHOLE = {("moe", 2): [(4, 64)], ("moe", 4): [(4, 64)], ("gqa_fewer_kv_heads", 4): [(32, 64), (32, 64)]}
# (case, world) -> the layouts of the fused attention weight (and bias), per layer: (size, sharded) parts
_MQA = ((64, True), (16, False), (16, False))
PIECES = {("multi_query", 2): [_MQA, _MQA], ("multi_query", 4): [_MQA, _MQA],
          ("uneven_fused_split", 2): [((64, True), (32, True), (32, True))],
          ("uneven_fused_split", 4): [((64, True), (32, False), (32, False))]}


def _narrow(t, placement, world, rank):
    from autotp.placements import Shard, placement_index, take_shard

    if not isinstance(placement, Shard):
        return t
    return take_shard(t, placement.dim, *placement_index(placement, t.shape[placement.dim], world, rank))


def _counted(mode: CommDebugMode) -> int:
    return sum(mode.get_comm_counts().values())


def _check(case: str, world: int, rank: int) -> dict:
    import autotp

    model = _build(case)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    kwargs = {"use_cache": False}
    sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs=kwargs)
    sharded(ids, **kwargs)  # the first call also checks that the ranks' inputs agree
    with CommDebugMode() as fwd:
        out = sharded(ids, **kwargs).logits
    ref = model(ids, **kwargs).logits
    with CommDebugMode() as bwd:
        out.square().mean().backward()
    ref.square().mean().backward()
    params = dict(model.named_parameters(remove_duplicate=False))
    grad_err = 0.0
    for name, p in sharded.module.named_parameters():
        want = _narrow(params[name].grad, sharded.plan.parameters[name].placement, world, rank)
        grad_err = max(grad_err, ((p.grad - want).abs().max() / max(1.0, want.abs().max())).item())
    plan = sharded.plan
    return {
        "err": ((out - ref).abs().max() / max(1.0, ref.abs().max())).item(),
        "grad_err": grad_err,
        "share": plan.memory["param_bytes_per_rank"] / plan.memory["param_bytes_total"],
        "whole_2d": sorted(p.global_shape for n, p in plan.parameters.items()  # weights, not buffers (rotary tables)
                           if n in params and len(p.global_shape) >= 2 and not isinstance(p.placement, autotp.Shard)),
        "pieces": sorted(p.placement.pieces for p in plan.parameters.values()
                         if isinstance(p.placement, autotp.Shard) and p.placement.pieces),
        "whole_explained": all(n in plan.replicated for n, p in plan.parameters.items()
                               if len(p.global_shape) >= 2 and not isinstance(p.placement, autotp.Shard)),
        "planned": {ph: len([c for c in plan.collectives if c.phase == ph]) for ph in ("forward", "backward")},
        "ran": {"forward": _counted(fwd), "backward": _counted(bwd)},
        "all_reduces": plan.counts("forward").get("all_reduce", 0),
        "bwd_all_reduces": plan.counts("backward").get("all_reduce", 0),
    }


def _run(rank: int, world: int) -> dict:
    return {case: _check(case, world, rank) for case in CASES}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_class(case, world):
    for rank, per_rank in enumerate(run_ranks_once(_run, world)):
        r = per_rank[case]
        assert r["err"] <= 1e-5, (rank, r)
        assert r["grad_err"] <= 1e-5, (rank, r)
        # every weight matrix sharded but the router's (and k, v with fewer heads than ranks), listed with its reason
        assert r["whole_2d"] == sorted(WHOLE.get((case, world), []) * LAYERS), (rank, r)
        assert r["pieces"] == sorted(PIECES.get((case, world), []) * LAYERS), (rank, r)
        assert r["whole_explained"], (rank, r)
        assert r["share"] <= 1 / world + 0.1, (rank, r)
        assert r["ran"] == r["planned"], (rank, r)  # the plan lists what runs, forward and backward
        assert r["all_reduces"] == CASES[case] * LAYERS + 1, (rank, r)
        if case in BACKWARD:
            assert r["bwd_all_reduces"] == BACKWARD[case] * LAYERS + 1, (rank, r)
