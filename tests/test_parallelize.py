"""autotp.parallelize from a plain single-process test (issue 4): start, generate, shut down.

The test process is the notebook: it builds a model, parallelizes it over 2
worker processes, compares generate() with the unsharded model, and checks that
no worker outlives the handle -- also when a worker is killed mid-session or
fails while loading.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import autotp
from model_cases import CASES, VOCAB

BUILDERS = {c.name: c.build for c in CASES}


def _gone(pids, within_s=10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_parallelize_generates_like_the_model_and_leaves_no_process():
    torch.manual_seed(0)
    model = BUILDERS["M3_llama_untied"]()
    ids, mask = _prompts()
    kw = dict(max_new_tokens=6, pad_token_id=0)
    with autotp.parallelize(model, world_size=2) as lm:
        pids = lm.pool.pids
        assert len(pids) == 2
        for extra in (dict(do_sample=False), dict(num_beams=5, no_repeat_ngram_size=4)):
            got = lm.generate(input_ids=ids, attention_mask=mask, **kw, **extra)
            assert torch.equal(got, model.generate(input_ids=ids, attention_mask=mask, **kw, **extra)), extra
        logits = lm(ids, attention_mask=mask)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1:]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
        assert lm.plans["decode"].counts("forward") == {"all_reduce": 5, "all_gather": 1}
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        assert lm.parameter_bytes_per_rank < 0.6 * full
    assert not lm.pool.alive
    assert _gone(pids)
    with pytest.raises(RuntimeError, match="closed"):
        lm.generate(input_ids=ids, max_new_tokens=2)


def test_parallelize_seq2seq_from_a_path(tmp_path):
    torch.manual_seed(0)
    model = BUILDERS["M8_t5"]()
    model.save_pretrained(tmp_path)
    ids, mask = _prompts()
    kw = dict(max_new_tokens=6, decoder_start_token_id=0, num_beams=3)
    lm = autotp.parallelize(str(tmp_path), world_size=2)
    try:
        assert torch.equal(lm.generate(input_ids=ids, attention_mask=mask, **kw),
                           model.generate(input_ids=ids, attention_mask=mask, **kw))
        assert set(lm.plans) == {"encoder", "prefill", "decode"}
    finally:
        lm.close()
    lm.close()  # idempotent
    assert _gone(lm.pool.pids)


def test_a_killed_worker_surfaces_as_an_error_not_a_hang():
    torch.manual_seed(0)
    model = BUILDERS["M2_gpt2"]()
    ids, mask = _prompts()
    lm = autotp.parallelize(model, world_size=2, timeout_s=120)
    pids = lm.pool.pids
    os.kill(pids[1], signal.SIGKILL)  # as the OOM killer would
    t0 = time.monotonic()
    with pytest.raises(autotp.WorkerError, match="rank 1"):
        lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    assert time.monotonic() - t0 < 60
    assert _gone(pids)


def test_a_worker_failing_to_load_raises_in_the_caller(tmp_path):
    torch.manual_seed(0)
    model = BUILDERS["M2_gpt2"]()
    model.save_pretrained(tmp_path)
    model.config.n_embd = 32  # the config no longer matches the weights
    model.config.save_pretrained(tmp_path)
    with pytest.raises(autotp.WorkerError, match="the config and the weights disagree"):
        autotp.parallelize(str(tmp_path), world_size=2)


def test_parallelize_rejects_what_it_cannot_run():
    with pytest.raises(TypeError, match="Hugging Face model"):
        autotp.parallelize(torch.nn.Linear(4, 4), world_size=2)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="needs one GPU per rank"):
            autotp.parallelize(BUILDERS["M2_gpt2"](), world_size=2, backend="nccl")
    with pytest.raises(ValueError, match="disagree"):
        autotp.parallelize(BUILDERS["M2_gpt2"](), world_size=2, num_gpus=4)
    with pytest.raises(ValueError, match="fp16=True and dtype"):
        autotp.parallelize(BUILDERS["M2_gpt2"](), num_gpus=2, fp16=True, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs world_size"):
        autotp.parallelize(BUILDERS["M2_gpt2"]())


def _fake_gpus(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("gpus, world, expected", [(4, 2, "nccl"), (2, 2, "nccl"), (1, 2, "gloo"), (0, 4, "gloo")])
def test_backend_is_nccl_when_there_is_a_gpu_per_rank(monkeypatch, gpus, world, expected):
    from autotp.interactive import resolve_backend

    _fake_gpus(monkeypatch, gpus)
    assert resolve_backend(world, None) == expected


def test_parallelformers_one_liner_starts_nccl_workers_in_fp16(monkeypatch):
    """``parallelize(model, num_gpus=2, fp16=True)`` on a machine with 2 GPUs: the pool it starts
    (stood in for here: this machine has none) gets NCCL, fp16 and no shared-memory transport."""
    import autotp.interactive as interactive

    started = {}

    class Pool:
        def __init__(self, world_size, setup, payload, *, backend, timeout_s, env):
            started.update(world_size=world_size, setup=setup, payload=payload, backend=backend)

    _fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(interactive, "WorkerPool", Pool)
    lm = autotp.parallelize(BUILDERS["M2_gpt2"](), num_gpus=2, fp16=True)
    assert started["world_size"] == 2 and started["backend"] == "nccl"
    assert started["payload"]["dtype"] == torch.float16
    assert "same_host_collectives" not in started["payload"]["options"]  # NCCL ranks are GPUs, not this host's shm
    assert lm.pool.__class__ is Pool


def test_parallelformers_names_on_cpu_ranks():
    """``num_gpus`` / ``fp16`` with no GPU: gloo workers holding float16 shards, logits like the fp16 model's."""
    torch.manual_seed(0)
    model = BUILDERS["M3_llama_untied"]()
    ids, mask = _prompts()
    with autotp.parallelize(model, num_gpus=2, fp16=True) as lm:
        assert lm.pool.backend == "gloo"
        logits = lm(ids, attention_mask=mask)
    with torch.no_grad():
        ref = model.half()(ids, attention_mask=mask, use_cache=False).logits[:, -1:]
    assert logits.dtype == torch.float16
    assert (logits.float() - ref.float()).abs().max().item() < 2e-2 * ref.float().abs().max().item()
