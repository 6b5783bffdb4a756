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

    if kind == "mlp_dropout":  # dropout between the column and the row linear: a sharded activation
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Dropout(0.3),
                                   torch.nn.Linear(64, 32))
    if kind == "gpt2_attn_dropout":  # attention dropout on this rank's heads; the replicated ones off
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=99, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.2))

    if kind in ("parallel_residual", "moe"):  # one all-reduce per layer (R joins P on rank 0); experts sharded
        from test_arch_classes import _build as build_arch

        return build_arch(kind)
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


@pytest.mark.parametrize("kind", ["gpt2", "llama", "parallel_residual", "moe"])
def test_compiled_fullgraph_equals_eager(kind):
    for r in run_ranks_once(_compile_vs_eager, 2, kind, "inductor"):
        assert r["sharded_params"] > 0, r
        assert r["logits"] < 1e-5, r
        assert r["grads"] < 1e-5, r
        # every planned collective ran, forward and backward, compiled as eagerly
        assert r["issued"] == r["eager_issued"] == r["planned"], r


def _dropout_compiled_vs_eager(rank: int, world: int, kind: str) -> dict:
    """With dropout on sharded activations, a compiled step draws the masks the eager step drew
    (the same per-rank seeds, from ``autotp::dropout_keep``), so the two agree."""
    import autotp
    from autotp.runtime import TPAttention, TPDropout

    torch.manual_seed(0)
    model = _build(kind).train()
    if kind == "mlp_dropout":
        x = torch.randn(4, 32)
        args, kwargs, read = (x,), {}, lambda out: out
    else:
        x = torch.randint(0, 99, (2, 8))
        args, kwargs, read = (x,), {"use_cache": False}, lambda out: out.logits
    sharded = autotp.shard(model, world, example_inputs=args, example_kwargs=kwargs)
    drops = [m for m in sharded.modules() if isinstance(m, (TPDropout, TPAttention)) and m.sharded]
    start = [m._calls for m in drops]

    def step(fn):
        for m, c in zip(drops, start):
            m._calls = c
        sharded.zero_grad(set_to_none=True)
        out = read(fn(*args, **kwargs))
        (out.float().square().mean() * 100).backward()
        return out.detach(), {n: p.grad.clone() for n, p in sharded.named_parameters()}

    eager_out, eager_grads = step(sharded)
    with torch.no_grad():
        sharded.eval()
        no_dropout = read(sharded(*args, **kwargs))
        sharded.train()
    out, grads = step(torch.compile(sharded, fullgraph=True))
    scale = eager_out.abs().max().item()
    return {"drops": len(drops), "dropped": (eager_out - no_dropout).abs().max().item() / scale,
            "out": (out - eager_out).abs().max().item() / scale,
            "grads": max((grads[n] - g).abs().max().item() / max(1e-6, g.abs().max().item())
                         for n, g in eager_grads.items())}


@pytest.mark.parametrize("kind", ["mlp_dropout", "gpt2_attn_dropout"])
def test_compiled_dropout_on_sharded_activations_draws_the_eager_masks(kind):
    for r in run_ranks_once(_dropout_compiled_vs_eager, 2, kind):
        assert r["drops"] > 0, r          # a sharded dropout was lowered
        assert r["dropped"] > 1e-3, r     # and it drops something (the check below is not vacuous)
        assert r["out"] < 1e-5 and r["grads"] < 1e-5, r


def _loss_compiled_vs_eager(rank: int, world: int, smoothing: float) -> dict:
    """Labels in the captured graph: the vocab-parallel cross-entropy (2 all-reduces, logits never
    gathered) compiled whole, equal to eager, forward and backward."""
    import autotp

    torch.manual_seed(0)
    model = _build("gpt2")
    ids = torch.randint(0, 99, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions
    kwargs = {"labels": labels, "use_cache": False}
    if smoothing:
        model.loss_function = lambda logits, labels, vocab_size, **kw: torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab_size).float(), labels[:, 1:].reshape(-1), ignore_index=-100,
            label_smoothing=smoothing)
    sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs=kwargs, gather_outputs=False)
    sharded.train()

    def step(fn):
        sharded.zero_grad(set_to_none=True)
        before = sharded.comm.issued
        loss = fn(ids, **kwargs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in sharded.named_parameters()}, sharded.comm.issued - before

    eager, eager_grads, eager_issued = step(sharded)
    loss, grads, issued = step(torch.compile(sharded, fullgraph=True))
    with torch.no_grad():
        ref = model(ids, **kwargs).loss
    ce = [list(c.shape) for c in sharded.plan.collectives if c.phase == "forward" and c.reduce in ("max", "sum")
          and "logit" in c.why]
    return {"vocab_ce": ce, "loss": abs(loss.item() - eager.item()),
            "ref": abs(eager.item() - ref.item()), "issued": (issued, eager_issued),
            "grads": max((grads[n] - g).abs().max().item() / max(1e-6, g.abs().max().item())
                         for n, g in eager_grads.items())}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_compiled_vocab_parallel_cross_entropy_equals_eager(smoothing):
    for r in run_ranks_once(_loss_compiled_vs_eager, 2, smoothing):
        # the loss is the vocab-parallel one: a max and a [rows, 2] (+ smoothing's sum: [rows, 3]) all-reduce
        assert len(r["vocab_ce"]) == 2 and r["vocab_ce"][1][-1] == (3 if smoothing else 2), r
        assert r["ref"] < 1e-5, r  # eager autotp is the unsharded loss
        assert r["loss"] < 1e-5 and r["grads"] < 1e-5, r
        assert r["issued"][0] == r["issued"][1], r


def _compiled_first_call_checks_inputs(rank: int, world: int) -> str:
    import autotp

    torch.manual_seed(0)
    model = _build("gpt2").eval()
    ids = torch.randint(0, 99, (2, 8))
    sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs={"use_cache": False})
    compiled = torch.compile(sharded, fullgraph=True)
    if rank == 1:
        ids = ids.flip(0)  # the same rows in another order
    try:
        with torch.no_grad():
            compiled(ids, use_cache=False)
    except ValueError as e:
        return str(e)
    return "no error"


def test_a_compiled_first_call_still_checks_the_ranks_inputs():
    for message in run_ranks_once(_compiled_first_call_checks_inputs, 2):
        assert "ranks were given different inputs" in message and "args[0]" in message, message


def _compiled_generation(rank: int, world: int) -> dict:
    """``shard_for_generation(..., compile=True)``: the decode step compiled (dynamic in batch and cache
    length; the prefill runs eager), token for token the unsharded model's -- greedy and beam search;
    its first call at each shape timed in ``timings["compile_s"]``."""
    import autotp

    torch.manual_seed(0)
    ref = _build("llama").eval()
    lm = autotp.shard_for_generation(ref, world, compile=True)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, ref.config.vocab_size, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[mask == 0] = 0
    out = {}
    for mode, kw in {"greedy": dict(do_sample=False), "beam": dict(num_beams=4, do_sample=False)}.items():
        kw = dict(kw, input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
        out[mode] = bool(torch.equal(lm.generate(**kw), ref.generate(**kw)))
    out["compiled"] = type(lm.autotp_steps.run["decode"].inner).__name__
    out["prefill eager"] = lm.autotp_steps.run["prefill"] is lm.autotp_steps.prefill
    out["timed"] = sorted(lm.autotp_steps.timings["compile_s"])
    return out


def test_compiled_generation_steps_are_token_exact():
    for r in run_ranks_once(_compiled_generation, 2):
        assert r == {"greedy": True, "beam": True, "compiled": "OptimizedModule", "prefill eager": True,
                     "timed": ["decode@[12, 1]", "decode@[3, 1]"]}, r  # greedy's 3 rows, beam search's 3 x 4
