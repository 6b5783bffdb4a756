"""Pretraining: the indexed dataset, global gradient clipping, the LR schedule, and
preprocess_data.py -> pretrain_gpt.py end to end under torchrun (gloo, 2 ranks)."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "examples", "data", "corpus.jsonl")
HAVE_CHECKPOINT = importlib.util.find_spec("autotp.checkpoint") is not None


# ---------------------------------------------------------------------------------------------
# autotp.data

DOCS = [[5, 6, 7], [8, 9], [], [10, 11, 12, 13, 14], [15]]


def test_indexed_dataset_round_trip_with_eod(tmp_path):
    from autotp.data import IndexedDataset, dtype_for_vocab, write_indexed_dataset

    prefix = tmp_path / "d"
    assert write_indexed_dataset(prefix, iter(DOCS), dtype_for_vocab(512), eod=0) == len(DOCS)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(DOCS) and ds.dtype == np.uint16
    for i, doc in enumerate(DOCS):
        assert ds[i].tolist() == doc + [0]  # EOD after every document, the empty one included
    assert ds[-1].tolist() == [15, 0]
    assert ds.sizes.tolist() == [len(d) + 1 for d in DOCS]
    assert ds.num_tokens == sum(len(d) + 1 for d in DOCS)
    assert os.path.getsize(f"{prefix}.bin") == 2 * ds.num_tokens
    with pytest.raises(IndexError, match="out of range"):
        ds[len(DOCS)]


def test_indexed_dataset_int32_without_eod(tmp_path):
    from autotp.data import IndexedDataset, dtype_for_vocab, write_indexed_dataset

    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.int32
    docs = [[70_000, 1], [65_535, 100_000, 3]]
    write_indexed_dataset(tmp_path / "big", docs, dtype_for_vocab(100_001))
    ds = IndexedDataset(tmp_path / "big")
    assert ds.dtype == np.int32 and [ds[i].tolist() for i in range(2)] == docs
    with pytest.raises(ValueError, match=r"document 0 has token ids in \[1, 70000\].*uint16"):
        write_indexed_dataset(tmp_path / "bad", docs, np.uint16)


def test_indexed_dataset_errors(tmp_path):
    from autotp.data import IndexedDataset, IndexedDatasetError, write_indexed_dataset

    with pytest.raises(FileNotFoundError, match=r"nothere\.idx does not exist.*preprocess_data\.py"):
        IndexedDataset(tmp_path / "nothere")
    prefix = str(tmp_path / "d")
    write_indexed_dataset(prefix, DOCS, np.uint16, eod=0)
    idx = open(prefix + ".idx", "rb").read()
    binary = open(prefix + ".bin", "rb").read()

    open(prefix + ".idx", "wb").write(b"MMIDIDX\x00" + idx[8:])  # Megatron's magic is not ours
    with pytest.raises(IndexedDatasetError, match="not the autotp index magic"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(idx[:-8])  # one offset short
    with pytest.raises(IndexedDatasetError, match="truncated or corrupt"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(idx[:20])  # shorter than the header
    with pytest.raises(IndexedDatasetError, match="shorter than the 32-byte header"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(idx)
    open(prefix + ".bin", "wb").write(binary[:-2])  # last token missing
    with pytest.raises(IndexedDatasetError, match=r"\.bin is 30 bytes but .* indexes 16 uint16 tokens = 32 bytes"):
        IndexedDataset(prefix)
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"d\.bin does not exist"):
        IndexedDataset(prefix)


def test_gpt_dataset_samples_span_documents(tmp_path):
    from autotp.data import GPTDataset, IndexedDataset, write_indexed_dataset

    write_indexed_dataset(tmp_path / "d", DOCS, np.uint16, eod=0)
    ds = IndexedDataset(tmp_path / "d")
    stream = np.concatenate([ds[i] for i in range(len(ds))]).tolist()  # 16 tokens
    plain = GPTDataset(ds, seq_len=5, seed=0, shuffle=False)
    assert len(plain) == (16 - 1) // 5 == 3
    for k in range(3):  # consecutive samples overlap by one token, crossing documents
        assert plain[k].tolist() == stream[5 * k:5 * k + 6]
    assert plain[0].tolist() == [5, 6, 7, 0, 8, 9]

    shuffled = GPTDataset(ds, seq_len=5, seed=1234)
    again = GPTDataset(ds, seq_len=5, seed=1234)
    other = GPTDataset(ds, seq_len=5, seed=99)
    epochs = [[shuffled.sample(e * 3 + k).tolist() for k in range(3)] for e in range(4)]
    assert epochs[0] == [again[k].tolist() for k in range(3)]  # same seed, same samples: every rank agrees
    assert any(epochs[e] != [other.sample(e * 3 + k).tolist() for k in range(3)] for e in range(4))
    assert len({str(e) for e in epochs}) > 1  # epochs come in new orders
    for samples in epochs:
        assert all(len(s) == 6 for s in samples)
        # (16 - 1) = 3 x 5: the samples' first 5 tokens are the whole epoch stream but its last token (an EOD)
        assert sorted(sum((s[:5] for s in samples), []) + [0]) == sorted(stream)
    with pytest.raises(ValueError, match="fewer than one sample of seq_len"):
        GPTDataset(ds, seq_len=16, seed=0)


def test_split_documents():
    from autotp.data import split_documents

    assert [r.tolist() for r in split_documents(10, [8, 2])] == [list(range(8)), [8, 9]]
    assert [r.tolist() for r in split_documents(3, [949, 50, 1])] == [[0], [1], [2]]
    assert [len(r) for r in split_documents(1000, [969, 30, 1])] == [969, 30, 1]
    assert [len(r) for r in split_documents(5, [1, 0, 1])] == [2, 0, 3]
    with pytest.raises(ValueError, match="cannot split 2 documents into 3 non-empty parts"):
        split_documents(2, [1, 1, 1])


# ---------------------------------------------------------------------------------------------
# autotp.optim

def test_cosine_lr():
    from autotp.optim import cosine_lr

    lrs = [cosine_lr(s, max_lr=1.0, min_lr=0.1, warmup=4, total=14) for s in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup
    assert lrs[4] == 1.0 and lrs[9] == pytest.approx(0.55) and lrs[14:] == [0.1, 0.1]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # then never increases
    assert cosine_lr(0, max_lr=3e-4, total=10) == 3e-4
    with pytest.raises(ValueError, match="min_lr <= max_lr"):
        cosine_lr(0, max_lr=1e-4, min_lr=1e-3, total=10)
    with pytest.raises(ValueError, match="warmup <= total"):
        cosine_lr(0, max_lr=1e-4, warmup=20, total=10)


def _clip_vs_unsharded(rank, world, max_norm):
    import autotp
    from autotp.optim import clip_grad_norm_, grad_norm
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # vocab 101: an uneven vocab-parallel LM head (padded rows); tied embedding
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    ref = GPT2LMHeadModel(config)
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 101, (2, 12))
    sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs={"labels": ids, "use_cache": False})
    sharded(ids, labels=ids, use_cache=False).loss.backward()
    ref(ids, labels=ids, use_cache=False).loss.backward()

    out = dict(sharded=sum(repr(p.placement).startswith("S") for p in sharded.plan.parameters.values()))
    out["inf"] = grad_norm(sharded, math.inf).item()
    out["ref_inf"] = max(p.grad.abs().max().item() for p in ref.parameters())
    out["measured"] = clip_grad_norm_(sharded, 1e6).item()  # measures, scales nothing
    out["norm"] = clip_grad_norm_(sharded, max_norm).item()
    out["ref_norm"] = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item()
    out["after"] = grad_norm(sharded).item()
    out["ref_after"] = torch.stack([p.grad.norm() for p in ref.parameters()]).norm().item()
    # a replicated parameter's clipped gradient is the reference's, whole
    out["ln_err"] = (dict(sharded.module.named_parameters())["transformer.ln_f.weight"].grad
                     - ref.transformer.ln_f.weight.grad).abs().max().item()
    return out


def test_clip_grad_norm_equals_unsharded():
    max_norm = 0.05
    results = run_ranks(_clip_vs_unsharded, 2, max_norm)
    for r in results:
        assert r["sharded"] >= 9  # c_attn, c_fc, c_proj weights/biases of both layers, the LM head
        assert r["measured"] == r["norm"]
        assert r["norm"] == pytest.approx(r["ref_norm"], abs=1e-5) and r["ref_norm"] > 10 * max_norm
        assert r["inf"] == pytest.approx(r["ref_inf"], abs=1e-6)
        assert r["after"] == pytest.approx(r["ref_after"], abs=1e-5)
        assert r["after"] == pytest.approx(max_norm, rel=1e-4)
        assert r["ln_err"] < 1e-7
    assert results[0]["norm"] == results[1]["norm"]  # every rank scales by the same coefficient


# ---------------------------------------------------------------------------------------------
# examples/preprocess_data.py -> examples/pretrain_gpt.py under torchrun

ITER = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?learning rate: (\S+) \|.*?lm loss: (\S+) \|.*?grad norm: (\S+) \|"
                  r".*?tokens per second: (\d+)")
VALID = re.compile(r"validation loss (.*?) \| lm loss value: (\S+) \| lm loss PPL: (\S+) \|")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stdlib"
    log = _run([sys.executable, "examples/preprocess_data.py", "--input", CORPUS, "--output-prefix", str(out),
                "--vocab-size", "512", "--append-eod"])
    assert "Vocab size: 512  EOD id: 0" in log
    from autotp.data import IndexedDataset

    ds = IndexedDataset(f"{out}_text_document")
    n_docs = sum(1 for line in open(CORPUS, encoding="utf-8") if line.strip())
    assert len(ds) == n_docs and all(ds[i][-1] == 0 for i in range(len(ds)))  # --append-eod
    assert ds.num_tokens > 100_000 and ds.tokens.max() < 512
    return f"{out}_text_document", f"{out}-vocab.json"


def _pretrain(corpus, *extra):
    data, vocab = corpus
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "examples/pretrain_gpt.py", "--data-path", data, "--vocab-file", vocab,
           "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
           "--micro-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1",
           "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "2", *extra]
    log = _run(cmd)
    iters = {int(m[0]): dict(lr=float(m[2]), loss=float(m[3]), norm=float(m[4]), tps=int(m[5]))
             for m in ITER.findall(log)}
    valid = [(m[0], float(m[1]), float(m[2])) for m in VALID.findall(log)]
    return log, iters, valid


def test_pretrain_gpt_on_two_ranks(corpus, tmp_path):
    save = [] if not HAVE_CHECKPOINT else ["--save", str(tmp_path / "ckpt"), "--save-interval", "3"]
    log, iters, valid = _pretrain(corpus, "--train-iters", "6", *save)
    assert sorted(iters) == [1, 2, 3, 4, 5, 6], log
    losses = [iters[i]["loss"] for i in range(1, 7)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(512), abs=0.3)  # an untrained model: about uniform
    assert losses[-1] < losses[0] - 0.3, losses  # learning
    assert all(math.isfinite(i["norm"]) and i["norm"] > 0 and i["tps"] > 0 for i in iters.values())
    assert iters[1]["lr"] == pytest.approx(3e-3) and iters[6]["lr"] < iters[2]["lr"]  # warmup, then cosine decay
    # at iteration 3, at the end (val, test): perplexity is exp(loss), and validation loss falls
    assert [v[0] for v in valid] == ["at iteration 3", "at the end of training for val data",
                                     "at the end of training for test data"], log
    for _, loss, ppl in valid:
        assert ppl == pytest.approx(math.exp(loss), rel=1e-5)
    assert valid[1][1] < valid[0][1] < math.log(512)
    if HAVE_CHECKPOINT:
        assert os.path.exists(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt")
        # resume from iteration 3: iteration, data position, optimizer state and LR restored, so
        # iterations 4-6 repeat the uninterrupted run -- here with --sequence-parallel (the same
        # parameter shards, so the checkpoint loads; dropout is off, so the losses are the same)
        log2, resumed, _ = _pretrain(corpus, "--train-iters", "6", "--load", str(tmp_path / "ckpt"),
                                     "--ckpt-step", "3", "--eval-iters", "0", "--sequence-parallel")
        assert "reduce_scatter" in log2, log2  # the plan's collectives, printed at start
        assert "resumed from" in log2 and "at iteration 3 (12 samples consumed)" in log2, log2
        assert sorted(resumed) == [4, 5, 6]
        for i in (4, 5, 6):
            assert resumed[i]["loss"] == pytest.approx(iters[i]["loss"], abs=1e-5), (i, log, log2)
            assert resumed[i]["lr"] == iters[i]["lr"]


def test_pretrain_fp16_loss_scaling_on_two_ranks(corpus):
    """--fp16: autocast and the sharded loss scaler (the ranks agree on overflow), here on CPU ranks.

    The initial scale 2**24 overflows fp16 at once: the first steps are skipped (on every rank alike,
    or the ranks' weights would part and the run fail) and the scale halves each time, until steps
    go through and the model learns."""
    log, iters, _ = _pretrain(corpus, "--train-iters", "14", "--fp16", "--initial-loss-scale", str(2.0 ** 24),
                              "--eval-iters", "0")
    scales = [float(s) for s in re.findall(r"loss scale: (\S+) \|", log)]
    skipped = [int(s) for s in re.findall(r"number of skipped iterations:\s+(\d+) \|", log)]
    assert len(scales) == 14 and scales[0] < 2.0 ** 24 and scales == sorted(scales, reverse=True), log
    assert skipped[0] == 1 and 0 in skipped, log  # overflow first, then steps that go through
    good = [iters[i]["loss"] for i in sorted(iters) if skipped[i - 1] == 0]
    assert len(good) >= 2 and all(math.isfinite(v) for v in good) and good[-1] < good[0], log
