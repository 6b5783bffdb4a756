"""The plan is the contract: every collective that runs is in the plan, and nothing else is.

For every model case of the suite (CONFORMANCE M1-M10), training variants (labels: the
vocab-parallel cross-entropy; activation checkpointing: recomputed collectives) and the
generation decode step, on gloo ranks at world size 2 and 4: the collectives of one
forward and of one backward are recorded at run time (``CommDebugMode``, extended to
note each message's shape and dtype) and compared with ``plan.collectives`` -- op, count,
per-rank message shape and dtype.  The forward must match in order; the backward as a
multiset (autograd's order is its own).  A dynamic dim in a plan (the decode step's
batch and cache length) matches any size.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

from distributed import run_ranks_once
from model_cases import CASES

_OPS = {"allreduce": "all_reduce", "allgather": "all_gather"}


class Recorder(CommDebugMode):
    """CommDebugMode that also keeps ``(op, message shape, dtype)`` of each c10d collective."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple[str, tuple, torch.dtype]] = []

    def __enter__(self):
        out = super().__enter__()
        # CommDebugMode attributes collectives to modules; a block recomputed in backward by
        # activation checkpointing is entered without its parents recorded -- treat it as top-level
        tracker = self.advanced_module_tracker
        tracker.module_parents_dict = defaultdict(set, tracker.module_parents_dict)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(getattr(func, "_overloadpacket", "")).split(".")[-1].rstrip("_")
        if name in _OPS:
            t = args[0][0] if name == "allreduce" else args[1][0]  # allgather_(outputs, inputs, ...)
            self.log.append((_OPS[name], tuple(t.shape), t.dtype))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def counted(self) -> int:
        return sum(self.get_comm_counts().values())


def _planned(plan, phase: str) -> list:
    return [(c.op, tuple(c.local_shape), c.dtype) for c in plan.collectives if c.phase == phase]


def _matches(planned, ran) -> bool:
    op, shape, dtype = planned
    return (op == ran[0] and dtype == ran[2] and len(shape) == len(ran[1])
            and all(isinstance(p, str) or p == r for p, r in zip(shape, ran[1])))


def _same_sequence(planned: list, ran: list) -> bool:
    return len(planned) == len(ran) and all(_matches(p, r) for p, r in zip(planned, ran))


def _same_multiset(planned: list, ran: list) -> bool:
    if any(isinstance(d, str) for p in planned for d in p[1]):
        raise AssertionError("backward plans are compared for static shapes only")
    return Counter(planned) == Counter(ran)


def _forward_backward(sharded, args, kwargs, loss_of):
    sharded(*args, **kwargs)  # the first call checks that the ranks' inputs agree (not part of the plan)
    with Recorder() as fwd:
        out = sharded(*args, **kwargs)
    loss = loss_of(out)
    with Recorder() as bwd:
        loss.backward()
    assert fwd.counted() == len(fwd.log) and bwd.counted() == len(bwd.log)  # CommDebugMode saw the same
    return {"forward": (_planned(sharded.plan, "forward"), fwd.log),
            "backward": (_planned(sharded.plan, "backward"), bwd.log)}


class SmoothedLM(torch.nn.Module):
    """Embedding -> MLP -> tied head -> cross-entropy with label smoothing, vocab 99 (padded at any tp)."""

    def __init__(self, vocab: int = 99, hidden: int = 16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.up, self.down = torch.nn.Linear(hidden, 4 * hidden), torch.nn.Linear(4 * hidden, hidden)

    def forward(self, ids, labels):
        h = self.emb(ids)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        logits = h @ self.emb.weight.t()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=0.1)


def _training_cases():
    import transformers

    zero = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    gpt2 = lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(  # noqa: E731
        n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=99, **zero)).train()
    llama = lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(  # noqa: E731
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        num_hidden_layers=2, vocab_size=128)).train()
    return [("gpt2_labels", gpt2, 99, {}), ("llama_labels_local_logits", llama, 128, {"gather_outputs": False}),
            ("gpt2_labels_checkpointing", gpt2, 99, {"activation_checkpointing": True}),
            ("label_smoothing", SmoothedLM, 99, {})]


def _run(rank: int, world: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    import autotp

    logging.set_verbosity_error()
    res = {}
    for case in CASES:
        torch.manual_seed(0)
        model = case.build()
        args, kwargs = case.inputs()
        sharded = autotp.shard(model, world, example_inputs=args, example_kwargs=kwargs)
        res[case.name] = _forward_backward(sharded, args, kwargs, lambda o: case.output(o).float().square().mean())
    for name, build, vocab, options in _training_cases():
        torch.manual_seed(0)
        model = build()
        ids = torch.randint(0, vocab, (2, 8))
        labels = ids.clone()  # a tensor of its own: export merges two inputs that are one tensor
        kw = {"labels": labels} if isinstance(model, SmoothedLM) else {"labels": labels, "use_cache": False}
        sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs=kw, **options)
        res[name] = _forward_backward(sharded, (ids,), kw, lambda o: o if isinstance(o, torch.Tensor) else o.loss)
        res[name]["kinds"] = [c.why for c in sharded.plan.collectives]
    # generation: the prefill step (with the encoder for T5), then a decode step, whose plan has
    # dynamic batch and cache length
    for case_name in ("M2_gpt2", "M3_llama_untied", "M8_t5"):
        torch.manual_seed(0)
        model = {c.name: c for c in CASES}[case_name].build()
        lm = autotp.shard_for_generation(model, world)
        plans = lm.autotp_steps.plans
        ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(1))
        seq2seq = "encoder" in plans
        first = {"decoder_input_ids": torch.zeros(3, 1, dtype=torch.long)} if seq2seq else {}
        with torch.no_grad(), Recorder() as pre:
            out = lm(input_ids=ids, **first)
        nxt = out.logits[:, -1:].argmax(-1)
        again = {"decoder_input_ids": nxt, "encoder_outputs": (out.encoder_last_hidden_state,)} if seq2seq else {}
        with torch.no_grad(), Recorder() as dec:
            lm(input_ids=ids if seq2seq else nxt, cache=out.cache, **again)
        check, ran = pre.log[:2], pre.log[2:]  # the first call checks that the ranks' inputs agree
        assert [c[:1] + c[2:] for c in check] == [("all_reduce", torch.int64)] * 2, check
        planned = [c for name in ("encoder", "prefill") if name in plans for c in _planned(plans[name], "forward")]
        res[f"{case_name}_prefill"] = {"forward": (planned, ran)}
        res[f"{case_name}_decode"] = {"forward": (_planned(plans["decode"], "forward"), dec.log)}
        res[f"{case_name}_decode"]["dynamic"] = any(isinstance(d, str) for c in plans["decode"].collectives
                                                    for d in c.local_shape)
    return res


def results(world: int) -> list[dict]:
    return run_ranks_once(_run, world)


NAMES = [c.name for c in CASES] + ["gpt2_labels", "llama_labels_local_logits", "gpt2_labels_checkpointing",
                                   "label_smoothing"] + [
    f"{m}_{step}" for m in ("M2_gpt2", "M3_llama_untied", "M8_t5") for step in ("prefill", "decode")]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", NAMES)
def test_plan_lists_exactly_the_collectives_that_run(name, world):
    for rank, per_rank in enumerate(results(world)):
        r = per_rank[name]
        planned, ran = r["forward"]
        assert ran, (rank, "no forward collective recorded")
        assert _same_sequence(planned, ran), (rank, "forward", planned, ran)
        if "backward" in r:
            planned, ran = r["backward"]
            assert _same_multiset(planned, ran), (rank, "backward", "planned, not run:",
                                                  Counter(planned) - Counter(ran), "run, not planned:",
                                                  Counter(ran) - Counter(planned))


@pytest.mark.parametrize("world", [2, 4])
def test_training_plans_name_the_loss_and_recomputed_collectives(world):
    r = results(world)[0]
    assert sum("vocab-parallel cross-entropy" in why for why in r["gpt2_labels"]["kinds"]) == 2
    assert sum("recomputed" in why for why in r["gpt2_labels_checkpointing"]["kinds"]) == 4  # 2 per layer
    assert all(r[f"{m}_decode"]["dynamic"] for m in ("M2_gpt2", "M3_llama_untied", "M8_t5"))
    # label smoothing adds the sum of the logits to the fused all-reduce: [N, 3] instead of [N, 2]
    smoothing = [p for p in r["label_smoothing"]["forward"][0] if p[1] == (16, 3)]
    assert len(smoothing) == 1, r["label_smoothing"]["forward"][0]
