"""Sequence parallelism (issue 15): ``shard(..., sequence_parallel=True)`` on gloo ranks, world 2 and 4.

Per model -- GPT-2 (with its loss), Llama with grouped KV heads, GPT-NeoX's parallel residual,
T5's encoder -- against the unsharded model built from the same weights (dropout off):

* forward output and every parameter's gradient (narrowed to the rank's shard) equal;
* the collectives that run (``CommDebugMode``) are the plan's, forward and backward; forward
  has no all-reduce left between blocks: a reduce-scatter after each row-parallel output (and
  the vocab-parallel embedding), an all-gather before each column-parallel input (and the LM
  head), the counts derived below from the model's structure;
* the regions between blocks hold 1/world of the sequence: an uneven length (7) is padded and
  trimmed;
* with ``same_host_collectives=True`` (Llama, NeoX) the same step is exact and every planned
  collective runs once, every reduce-scatter and all-gather through shared memory.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks_once
from test_training import _counts, _grad_errors

SEQ = 7  # uneven at 2 and 4: padded


def _models():
    import transformers as T

    return {
        "gpt2": (T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=96,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), True),
        "llama_gqa": (T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                        intermediate_size=128, num_hidden_layers=2, vocab_size=96)),
                      True),
        "neox_parallel": (T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=64, num_attention_heads=4,
                                                                intermediate_size=128, num_hidden_layers=2,
                                                                vocab_size=96, use_parallel_residual=True,
                                                                hidden_dropout=0.0, attention_dropout=0.0)), True),
        "t5_encoder": (T.T5EncoderModel(T.T5Config(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                                                    vocab_size=96, dropout_rate=0.0)), False),
    }


def _run(rank: int, world: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from torch.distributed.tensor.debug import CommDebugMode
    from transformers.utils import logging

    import autotp

    logging.set_verbosity_error()
    res = {}
    for name, (model, lm) in _models().items():
        torch.manual_seed(0)
        for p in model.parameters():  # (T5's init leaves some weights tiny; any values do)
            p.data.normal_(0, 0.2)
        ids = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
        kw = {"labels": ids, "use_cache": False} if lm else {}
        ref = model(ids, **kw)
        ref_out = ref.loss if lm else ref.last_hidden_state
        ref_out.sum().backward()
        sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs=kw, sequence_parallel=True)
        sharded(ids, **kw)  # (the first call also checks the ranks' inputs agree)
        with CommDebugMode() as comm:
            out = sharded(ids, **kw)
            fwd = _counts(comm)
            out_t = out.loss if lm else out.last_hidden_state
            out_t.sum().backward()
        total = _counts(comm)
        plan = sharded.plan
        res[name] = {
            "out_err": (out_t - ref_out).abs().max().item() / max(1.0, ref_out.abs().max().item()),
            "grad_err": _grad_errors(sharded, model, world, rank),
            "fwd": fwd, "bwd": {k: total[k] - fwd.get(k, 0) for k in total if total[k] > fwd.get(k, 0)},
            "plan_fwd": plan.counts("forward"), "plan_bwd": plan.counts("backward"),
            "sequence_nodes": sum(1 for d in plan.nodes.values() if d.why.startswith("sequence-parallel")),
        }
        if name in SAME_HOST:  # the same step with the same-host transport carrying the collectives
            shm = autotp.shard(model, world, example_inputs=(ids,), example_kwargs=kw, sequence_parallel=True,
                               same_host_collectives=True)
            with torch.no_grad():
                shm(ids, **kw)  # (the first call's input check)
            before = dict(shm.comm.same_host.counts)
            with CommDebugMode() as comm:
                out = shm(ids, **kw)
                (out.loss if lm else out.last_hidden_state).sum().backward()
            out_t = out.loss if lm else out.last_hidden_state
            res[name]["shm"] = {
                "out_err": (out_t - ref_out).abs().max().item() / max(1.0, ref_out.abs().max().item()),
                "grad_err": _grad_errors(shm, model, world, rank),
                "c10d": {C10D[k]: v for k, v in _counts(comm).items()},
                "transport": {k: v - before[k] for k, v in shm.comm.same_host.counts.items()}}
    return res


def results(world: int) -> list[dict]:
    return run_ranks_once(_run, world)


# Forward per model with L=2 layers: a reduce-scatter per row-parallel output (the parallel
# residual sums its two first: one per layer) and per vocab-parallel embedding; an all-gather per
# column-parallel input (q/k/v share one; NeoX's two norms of one residual each have their own)
# and before the LM head, +1 for the vocab-sharded logits (or T5's returned hidden states).
# The LM loss adds the vocab-parallel cross-entropy's 2 all-reduces; no other all-reduce runs forward.
EXPECTED = {
    "gpt2": {"reduce_scatter": 5, "all_gather": 6, "all_reduce": 2},
    "llama_gqa": {"reduce_scatter": 5, "all_gather": 6, "all_reduce": 2},
    "neox_parallel": {"reduce_scatter": 3, "all_gather": 6, "all_reduce": 2},
    "t5_encoder": {"reduce_scatter": 5, "all_gather": 5},
}
C10D = {"_reduce_scatter_base": "reduce_scatter", "allgather": "all_gather", "allreduce": "all_reduce"}
SAME_HOST = ("llama_gqa", "neox_parallel")  # also run with same_host_collectives=True


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_sequence_parallel_exact_and_counted(name, world):
    for r in results(world):
        m = r[name]
        assert m["out_err"] <= 1e-5 and m["grad_err"] <= 1e-5, m
        assert m["sequence_nodes"] > 0, m
        assert m["plan_fwd"] == EXPECTED[name], m
        assert {C10D[k]: v for k, v in m["fwd"].items()} == m["plan_fwd"], m
        assert {C10D[k]: v for k, v in m["bwd"].items()} == m["plan_bwd"], m
        if name in SAME_HOST:
            shm = m["shm"]
            assert shm["out_err"] <= 1e-5 and shm["grad_err"] <= 1e-5, shm
            # the plan's collectives, forward and backward, each ran once: through shared memory, or through gloo
            # (the cross-entropy's max all-reduce; a column-parallel linear's asynchronous input-gradient all-reduce)
            planned = {k: m["plan_fwd"].get(k, 0) + m["plan_bwd"].get(k, 0) for k in ("reduce_scatter", "all_gather",
                                                                                      "all_reduce")}
            ran = {k: shm["transport"][k] + shm["c10d"].get(k, 0) for k in planned}
            assert ran == planned and shm["transport"]["fallback"] == 0, shm
            assert set(shm["c10d"]) <= {"all_reduce"}, shm  # every reduce-scatter and all-gather in shared memory
            assert shm["transport"]["reduce_scatter"] >= EXPECTED[name]["reduce_scatter"], shm


def _run_dropout_and_compiled(rank: int, world: int) -> dict:
    """GPT-2 with dropout on (train mode): the ranks agree on the loss and on every replicated
    gradient, the region's dropouts draw per-rank streams; compiled: equal to eager."""
    import warnings

    warnings.filterwarnings("ignore")
    import transformers as T
    from transformers.utils import logging

    import autotp
    from autotp.runtime import TPDropout

    logging.set_verbosity_error()
    res = {}
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=96)).train()
    ids = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
    kw = {"labels": ids, "use_cache": False}
    sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs=kw, sequence_parallel=True, seed=3)
    losses = []
    for _ in range(2):
        out = sharded(ids, **kw)
        out.loss.backward()
        losses.append(out.loss.item())
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, (losses, {n: p.grad.clone() for n, p in sharded.module.named_parameters()
                                                            if repr(sharded.plan.parameters[n].placement) == "R"}))
    res["losses_agree"] = all(e[0] == everyone[0][0] for e in everyone)
    res["grads_agree"] = all(torch.equal(e[1][n], everyone[0][1][n]) for e in everyone for n in e[1])
    res["replicated_grads"] = len(everyone[0][1])
    res["losses_differ_per_step"] = losses[0] != losses[1]  # dropout is on
    drops = [m for m in sharded.module.modules() if isinstance(m, TPDropout)]
    res["sharded_dropouts"] = sum(m.sharded for m in drops)
    res["replicated_dropouts"] = sum(not m.sharded for m in drops)

    # compiled (dropout off): output and gradients equal to the eager sharded module's
    model.eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    model.zero_grad()
    eager = autotp.shard(model, world, example_inputs=(ids,), example_kwargs=kw, sequence_parallel=True)
    comp = autotp.shard(model, world, example_inputs=(ids,), example_kwargs=kw, sequence_parallel=True, compile=True)
    le, lc = eager(ids, **kw).loss, comp(ids, **kw).loss
    le.backward()
    lc.backward()
    ge, gc = dict(eager.module.named_parameters()), dict(comp.module.named_parameters())
    res["compiled_loss_err"] = (le - lc).abs().item()
    res["compiled_grad_err"] = max((ge[n].grad - gc[n].grad).abs().max().item() for n in ge)
    return res


def test_dropout_per_rank_streams_and_compiled():
    for r in run_ranks_once(_run_dropout_and_compiled, 2):
        assert r["losses_agree"] and r["grads_agree"] and r["replicated_grads"] > 0, r
        assert r["losses_differ_per_step"], r
        # GPT-2's region: the embedding's and each block's residual dropouts after the reduce-scatter
        assert r["sharded_dropouts"] >= 1, r
        assert r["compiled_loss_err"] <= 1e-5 and r["compiled_grad_err"] <= 1e-5, r


def test_options_that_contradict_sequence_parallel_are_refused():
    import autotp

    with pytest.raises(ValueError, match="sequence_parallel=True needs static shapes"):
        autotp.ShardConfig(sequence_parallel=True, dynamic=True)
    with pytest.raises(ValueError, match="sequence_parallel=True is for shard"):
        autotp.ShardConfig(sequence_parallel=True).check_for_generation()


def test_plan_shows_the_regions_and_what_stayed_out(tmp_path):
    """One process: the plan's summary, ``plan.json`` (schema-valid) and the HTML report name the
    sequence-sharded values and, at a region's edge, each node left as it was with why (Llama's k/v
    projections at 4 ranks with 2 KV heads are whole-weight linears reading the gathered input)."""
    import json

    import autotp
    from autotp.report import validate

    model, _ = _models()["llama_gqa"]
    ids = torch.randint(0, 96, (2, SEQ))
    plan = autotp.plan(model, 4, example_inputs=(ids,), example_kwargs={"use_cache": False}, sequence_parallel=True)
    kept = plan.sequence["kept"]
    assert len(plan.sequence["nodes"]) > 10 and len(kept) == 4, plan.sequence  # k and v of 2 layers
    assert all("whole weight" in why for why in kept.values()), kept
    assert f"sequence-parallel: {len(plan.sequence['nodes'])} values" in plan.summary()
    files = plan.dump(tmp_path)
    doc = json.loads(open(files["plan.json"]).read())
    assert validate(doc) == [] and doc["sequence"] == plan.sequence
    assert any(c["op"] == "reduce_scatter" for c in doc["collectives"])
    page = open(files["plan.html"]).read()
    assert "Sequence-parallel regions" in page and all(n in page for n in kept)
    off = autotp.plan(model, 4, example_inputs=(ids,), example_kwargs={"use_cache": False})
    assert off.sequence == {} and "reduce_scatter" not in off.counts("forward")


class _PositionParam(torch.nn.Module):
    """Two MLP blocks with a learned position table added between them (a parameter as long as the sequence)."""

    def __init__(self, seq=SEQ, hidden=16):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(1, seq, hidden))
        self.up1, self.down1 = torch.nn.Linear(hidden, 32), torch.nn.Linear(32, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.up2, self.down2 = torch.nn.Linear(hidden, 32), torch.nn.Linear(32, hidden)

    def forward(self, x):
        h = x + self.down1(torch.relu(self.up1(x))) + self.pos
        return h + self.down2(torch.relu(self.up2(self.norm(h))))


def test_a_parameter_is_never_sharded_along_the_sequence():
    """A parameter sliced along the sequence would pad with zeros, not with a copy of its last row,
    which the region's padding argument needs: the node reading it stays out, and says why."""
    import autotp

    plan = autotp.plan(_PositionParam(), 2, example_inputs=(torch.randn(2, SEQ, 16),), sequence_parallel=True)
    assert repr(plan.parameters["pos"].placement) == "R", plan.parameters["pos"]
    assert any("shard a parameter along the sequence" in why for why in plan.sequence["kept"].values()), plan.sequence
    assert plan.sequence["nodes"], plan.sequence  # the norm between the blocks is still sequence-sharded
