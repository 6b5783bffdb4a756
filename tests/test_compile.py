"""``torch.compile(sharded, fullgraph=True)``: no graph break, and the eager result (gloo, world size 2).

The collectives are ``torch.library`` ops under compilation (``autotp/traceable.py``);
Inductor's C++ backend compiles the rest.  Forward logits and every local gradient of
one training step are compared with the same sharded model run eagerly, and the
compiled step issues exactly the collectives the plan lists.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks_once


def _build(kind: str):
    import transformers

    if kind == "llama":  # GQA: 4 query heads, 2 KV heads
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            num_hidden_layers=2, vocab_size=101))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=99, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))


def _compile_vs_eager(rank: int, world: int, kind: str, backend: str) -> dict:
    import autotp

    torch.manual_seed(0)
    model = _build(kind)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs={"use_cache": False})
    sharded.train()

    def step(fn):
        sharded.zero_grad(set_to_none=True)
        before = sharded.comm.issued
        logits = fn(ids, use_cache=False).logits
        (logits.float().square().mean() * 100).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in sharded.named_parameters()}, sharded.comm.issued - before

    eager_logits, eager_grads, eager_issued = step(sharded)
    compiled = torch.compile(sharded, fullgraph=True, backend=backend)
    logits, grads, issued = step(compiled)
    plan = sharded.plan
    planned = sum(plan.counts("forward").values()) + sum(plan.counts("backward").values())
    scale = eager_logits.abs().max().item()
    return {
        "logits": (logits - eager_logits).abs().max().item() / scale,
        "grads": max((grads[n] - g).abs().max().item() / max(1e-6, g.abs().max().item()) for n, g in eager_grads.items()),
        "issued": issued, "eager_issued": eager_issued, "planned": planned,
        "sharded_params": sum(1 for p in plan.parameters.values() if isinstance(p.placement, autotp.placements.Shard)),
    }


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compiled_fullgraph_equals_eager(kind):
    for r in run_ranks_once(_compile_vs_eager, 2, kind, "inductor"):
        assert r["sharded_params"] > 0, r
        assert r["logits"] < 1e-5, r
        assert r["grads"] < 1e-5, r
        # every planned collective ran, forward and backward, compiled as eagerly
        assert r["issued"] == r["eager_issued"] == r["planned"], r
