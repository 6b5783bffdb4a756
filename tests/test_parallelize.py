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
    with pytest.raises(ValueError, match="gloo"):
        autotp.parallelize(BUILDERS["M2_gpt2"](), world_size=2, backend="nccl")
