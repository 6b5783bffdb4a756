"""The csrc/ kernels (``torch.ops.autotp_kernels``) against their composite twins, and models
sharded with them on and off (gloo, world size 2 and 4) against the unsharded model.

Accuracy: float32 results are compared with the float64 composite (the truth) at 1e-6
relative (atol 1e-6 for values near zero: the composite float32 ops themselves are off by
up to ~1.4e-6 there); float64 kernels pass ``gradcheck``; bfloat16 is compared with the
float32 composite rounded to bfloat16 at bf16's resolution.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import autotp
from autotp import kernels, ops
from autotp.runtime import Communicator
from distributed import run_ranks, run_ranks_once

BUILT = kernels.available()["cpu"]
needs_kernels = pytest.mark.skipif(not BUILT, reason="autotp._C was not built (AUTOTP_NO_KERNELS=1 install)")
K = torch.ops.autotp_kernels if BUILT else None
ROOT = Path(__file__).resolve().parents[1]


def test_kernels_are_built_unless_opted_out():
    """The project's install compiles csrc/; a silent build failure must not turn every kernel test into a skip."""
    if os.environ.get("AUTOTP_NO_KERNELS", "0") not in ("", "0"):
        pytest.skip("AUTOTP_NO_KERNELS is set: the install skipped the kernels on purpose")
    assert BUILT, f"autotp._C is not importable: {kernels.available()} (rerun 'pip install --no-build-isolation -e .' " \
                  "and read its warnings)"
    assert kernels.extension("cpu").isa() in ("avx512f", "avx2", "baseline")


def _x(*shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------------------------ elementwise kernels

@needs_kernels
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_forward_backward_float32(approximate, with_bias):
    x, b, g = _x(37, 1100), (_x(1100, seed=1) if with_bias else None), _x(37, 1100, seed=2, scale=1.0)
    xd = x.double().requires_grad_()
    bd = b.double().requires_grad_() if with_bias else None
    truth = ops.bias_gelu_composite(xd, bd, approximate)
    truth.backward(g.double())
    xf = x.clone().requires_grad_()
    bf = b.clone().requires_grad_() if with_bias else None
    y = K.bias_gelu(xf, bf, approximate)
    y.backward(g)
    torch.testing.assert_close(y.double(), truth.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xf.grad.double(), xd.grad, rtol=1e-6, atol=1e-6)
    if with_bias:  # a sum over 37 rows of the above
        torch.testing.assert_close(bf.grad.double(), bd.grad, rtol=1e-6, atol=1e-5)


@needs_kernels
def test_silu_mul_forward_backward_float32():
    gate, up, g = _x(29, 900), _x(29, 900, seed=1), _x(29, 900, seed=2, scale=1.0)
    gd, ud = gate.double().requires_grad_(), up.double().requires_grad_()
    truth = ops.silu_mul_composite(gd, ud)
    truth.backward(g.double())
    gf, uf = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = K.silu_mul(gf, uf)
    y.backward(g)
    for got, want in ((y, truth), (gf.grad, gd.grad), (uf.grad, ud.grad)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_round_once(dtype):
    x, b, gate, up = _x(16, 2500, scale=2), _x(2500, seed=1), _x(16, 2500, seed=2), _x(16, 2500, seed=3)
    for approximate in ("none", "tanh"):
        got = K.bias_gelu(x.to(dtype), b.to(dtype), approximate)
        # the composite in float32 from the rounded inputs, rounded once: at most one unit of the last place apart
        want = ops.bias_gelu_composite(x.to(dtype).float(), b.to(dtype).float(), approximate).to(dtype)
        torch.testing.assert_close(got, want, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=1e-3)
    got = K.silu_mul(gate.to(dtype), up.to(dtype))
    want = ops.silu_mul_composite(gate.to(dtype).float(), up.to(dtype).float()).to(dtype)
    torch.testing.assert_close(got, want, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=1e-3)


@needs_kernels
def test_gradcheck_float64():
    x = _x(5, 7, dtype=torch.float64, scale=2).requires_grad_()
    b = _x(7, dtype=torch.float64, seed=1).requires_grad_()
    u = _x(5, 7, dtype=torch.float64, seed=2).requires_grad_()
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(lambda x, b: K.bias_gelu(x, b, approximate), (x, b))
        assert torch.autograd.gradcheck(lambda x: K.bias_gelu(x, None, approximate), (x,))
    assert torch.autograd.gradcheck(K.silu_mul, (x, u))
    w = _x(6, 4, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[10, 13, 2, 15], [11, 11, 16, 12]])
    # no padding row: its gradient is zero by definition (as F.embedding's), not the derivative
    assert torch.autograd.gradcheck(lambda w: K.masked_embedding(w, ids, 10, -1), (w,))
    logits = _x(6, 9, dtype=torch.float64).requires_grad_()
    target = torch.tensor([0, 4, -100, 7, 2, 3])
    comm = Communicator(None)
    for eps in (0.0, 0.1):
        assert torch.autograd.gradcheck(
            lambda z: autotp.vocab_parallel_cross_entropy(z, target, comm=comm, vocab_size=8, label_smoothing=eps,
                                                          fused=True), (logits,))


@needs_kernels
def test_opcheck():
    ids = torch.tensor([[0, 5, 12, 17, 3], [14, 15, 9, 2, 11]])
    target = torch.tensor([0, 3, -1, 6, 2, -1])
    cases = [
        (K.bias_gelu.default, (_x(3, 5).requires_grad_(), _x(5).requires_grad_(), "tanh")),
        (K.bias_gelu.default, (_x(3, 5).requires_grad_(), None, "none")),
        (K.bias_gelu_backward.default, (_x(3, 5), _x(3, 5), _x(5), "none")),
        (K.silu_mul.default, (_x(3, 5).requires_grad_(), _x(3, 5).requires_grad_())),
        (K.silu_mul_backward.default, (_x(3, 5), _x(3, 5), _x(3, 5))),
        (K.masked_embedding.default, (_x(10, 6).requires_grad_(), ids, 10, 2)),
        (K.masked_embedding_backward.default, (_x(2, 5, 6), ids, 10, 10, 2)),
        (K.ce_stats.default, (_x(6, 7), target, 5, True)),
        (K.ce_grad.default, (_x(6, 7), target, 5, _x(6, 4))),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@needs_kernels
def test_masked_embedding_matches_composite():
    w = _x(50, 33).requires_grad_()
    ids = torch.randint(0, 200, (4, 9), generator=torch.Generator().manual_seed(0))
    ids[0, :3] = torch.tensor([100, 101, 149])  # inside [100, 150)
    ids[1, 0] = 110  # the local padding row (10): looked up, no gradient
    y = K.masked_embedding(w, ids, 100, 10)
    want = ops.masked_embedding_composite(w.detach(), ids, 100, 10)
    assert torch.equal(y, want)  # a copy of rows and zeros: bitwise
    g = _x(4, 9, 33, seed=5)
    y.backward(g)
    wc = w.detach().clone().requires_grad_()
    ops.masked_embedding_composite(wc, ids, 100, 10).backward(g)
    torch.testing.assert_close(w.grad, wc.grad, rtol=1e-6, atol=1e-6)
    assert w.grad[10].abs().sum() == 0 and wc.grad[10].abs().sum() == 0


# ------------------------------------------------------------------------------------ cross-entropy

@needs_kernels
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_composite(reduction, eps, dtype):
    """World size 1 with padding columns (vocab 1000 in 1024 local columns) and ignored rows."""
    comm = Communicator(None)
    logits = _x(40, 1024, scale=4).to(dtype)
    target = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(3))
    target[::7] = -100
    outs, grads = [], []
    for fused in (True, False):
        z = logits.clone().requires_grad_()
        loss = autotp.vocab_parallel_cross_entropy(z, target, comm=comm, vocab_size=1000, reduction=reduction,
                                                   label_smoothing=eps, fused=fused)
        loss.sum().backward()
        outs.append(loss.float())
        grads.append(z.grad.float())
    z = logits.float()[:, :1000].double().requires_grad_()
    truth = F.cross_entropy(z, target, reduction=reduction, label_smoothing=eps)
    truth.sum().backward()
    if dtype == torch.float32:
        torch.testing.assert_close(outs[0].double(), truth.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[0][:, :1000].double(), z.grad, rtol=1e-6, atol=1e-7)
    else:  # bf16 logits, float statistics: the loss is rounded to bf16 once, as the composite's is
        torch.testing.assert_close(outs[0], outs[1], rtol=2 ** -7, atol=0)
        torch.testing.assert_close(grads[0], grads[1], rtol=2 ** -7, atol=1e-4)
    assert grads[0][:, 1000:].abs().sum() == 0  # padding columns get no gradient


@needs_kernels
def test_fused_cross_entropy_keeps_no_softmax():
    """Backward keeps the logits (already alive) and per-row numbers, not a [N, V] float copy."""
    from autotp import loss as loss_mod

    comm = Communicator(None)
    logits = _x(8, 512).requires_grad_()
    target = torch.randint(0, 512, (8,))
    kept = {}
    for fused in (True, False):
        forward = loss_mod._ce_forward_fused if fused else loss_mod._ce_forward
        _, saved, _ = forward(logits.detach(), target, 512, -100, "mean", 0.0, comm)
        kept[fused] = [t for t in saved if t.dim() == 2]
    assert len(kept[True]) == 1 and kept[True][0].data_ptr() == logits.data_ptr()
    assert len(kept[False]) == 1 and kept[False][0].data_ptr() != logits.data_ptr()


def _ce_ranks(rank, world):
    from torch.distributed.tensor.debug import CommDebugMode

    vocab = 1001  # uneven: the last rank's shard is padded
    torch.manual_seed(0)
    full = torch.randn(24, vocab, dtype=torch.float64) * 3
    target = torch.randint(0, vocab, (24,))
    target[::5] = -100
    cols = -(-vocab // world)
    local = F.pad(full, (0, cols * world - vocab))[:, rank * cols:(rank + 1) * cols].float().requires_grad_()
    comm = Communicator(None)
    with CommDebugMode() as cm:
        loss = autotp.vocab_parallel_cross_entropy(local, target, comm=comm, vocab_size=vocab, label_smoothing=0.1,
                                                   fused=True)
        counts = {str(k).split(".")[-1].rstrip("_"): v for k, v in cm.get_comm_counts().items()}
        loss.backward()
        bwd = sum(cm.get_comm_counts().values()) - sum(counts.values())
    z = full.clone().requires_grad_()
    truth = F.cross_entropy(z, target, label_smoothing=0.1)
    truth.backward()
    want = F.pad(z.grad, (0, cols * world - vocab))[:, rank * cols:(rank + 1) * cols]
    return {"loss_err": abs(loss.item() - truth.item()) / abs(truth.item()),
            "grad_err": (local.grad.double() - want).abs().max().item(), "fwd": counts, "bwd": bwd}


@needs_kernels
@pytest.mark.parametrize("world", [2, 4])
def test_fused_cross_entropy_on_ranks(world):
    for r in run_ranks(_ce_ranks, world):
        assert r["loss_err"] < 1e-6 and r["grad_err"] < 1e-7, r
        assert r["fwd"] == {"allreduce": 2} and r["bwd"] == 0, r  # max, then (target logit, sum of exp, sum)


# ------------------------------------------------------------------------------------ models, kernels on and off

class _GeluMLP(torch.nn.Module):
    """Embedding -> Linear -> GELU (erf) -> Linear -> LM head: an aten.gelu after a biased column linear.

    No norm between the embedding's all-reduce and the column linear, nor between the residual's
    all-reduce and the head: before the fix in ``analyze._edge`` neither got a ``copy``, so their
    partial input gradients were never summed (every gradient but the head's was wrong, kernels or not).
    """

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(96, 32)
        self.up = torch.nn.Linear(32, 64)
        self.act = torch.nn.GELU()
        self.down = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 96, bias=False)

    def forward(self, ids, labels):
        h = self.emb(ids)
        h = h + self.down(self.act(self.up(h)))
        return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def _model_ranks(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    from torch.distributed.tensor.debug import CommDebugMode
    from test_training import _grad_errors, _hf

    res = {}
    for kind in ("gpt2", "llama", "gelu_mlp"):
        for on in (True, False):
            torch.manual_seed(0)
            model = _GeluMLP() if kind == "gelu_mlp" else _hf(kind)
            vocab = 96 if kind == "gelu_mlp" else model.config.vocab_size
            ids = torch.randint(0, vocab, (2, 8))
            if kind == "gelu_mlp":
                args, kw = (ids, ids), {}
                ref = model(*args)
            else:
                args, kw = (ids,), {"labels": ids, "use_cache": False}
                ref = model(*args, **kw).loss
            ref.backward()
            sharded = autotp.shard(model, world, example_inputs=args, example_kwargs=kw, kernels=on)
            sharded(*args, **kw)
            with CommDebugMode() as cm:
                out = sharded(*args, **kw)
                loss = out if kind == "gelu_mlp" else out.loss
                fwd = sum(cm.get_comm_counts().values())
                loss.backward()
                total = sum(cm.get_comm_counts().values())
            res[kind, on] = {"loss_err": abs(loss.item() - ref.item()), "grad_err": _grad_errors(sharded, model, world, rank),
                             "fusions": sorted(f["kind"] for f in sharded.plan.fusions), "fwd": fwd, "bwd": total - fwd,
                             "plan": (sum(sharded.plan.counts("forward").values()),
                                      sum(sharded.plan.counts("backward").values()))}
    return res


EXPECTED_FUSIONS = {
    "gpt2": ["bias_gelu", "bias_gelu", "vocab_cross_entropy", "vocab_embedding"],  # gelu_new written out in aten ops
    "llama": ["silu_mul", "silu_mul", "vocab_cross_entropy", "vocab_embedding"],
    "gelu_mlp": ["bias_gelu", "vocab_cross_entropy", "vocab_embedding"],
}


@needs_kernels
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", sorted(EXPECTED_FUSIONS))
def test_models_with_kernels_on_and_off(kind, world):
    for r in run_ranks_once(_model_ranks, world):
        on, off = r[kind, True], r[kind, False]
        assert on["fusions"] == EXPECTED_FUSIONS[kind] and off["fusions"] == [], (on["fusions"], off["fusions"])
        for res in (on, off):
            assert res["loss_err"] < 1e-5 and res["grad_err"] < 1e-5, res
            assert (res["fwd"], res["bwd"]) == res["plan"], res  # fusing changes no collective
        assert (on["fwd"], on["bwd"]) == (off["fwd"], off["bwd"])


def _env_off_ranks(rank, world):
    os.environ["AUTOTP_KERNELS"] = "0"
    from test_training import _hf

    torch.manual_seed(0)
    model = _hf("llama")
    ids = torch.randint(0, 128, (2, 8))
    sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs={"use_cache": False})
    return sharded.plan.fusions


@needs_kernels
def test_environment_variable_turns_kernels_off():
    assert run_ranks(_env_off_ranks, 2) == [[], []]


# ------------------------------------------------------------------------------------ CUDA sources

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """csrc/kernels.cu has no torch dependency: nvcc compiles it without a GPU or a CUDA torch
    (the dispatcher glue, csrc/kernels_cuda.cpp, links only against a CUDA build of torch)."""
    out = tmp_path / "kernels.o"
    proc = subprocess.run(["nvcc", "-c", "-O3", "-std=c++17", str(ROOT / "csrc" / "kernels.cu"), "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > 0


# ------------------------------------------------------------------------------------ on a GPU (bench/gpu_check.sh)

needs_cuda_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.available()["cuda"]),
                                        reason="needs a CUDA device and autotp._C_cuda (a CUDA build of torch + nvcc)")


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_kernels_match_composite(dtype):
    """Every op on CUDA against the float64 composite (fp32 / fp64 at 1e-6, bf16 at its resolution), backward included."""
    dev = "cuda"
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype != torch.bfloat16 else {"rtol": 2 ** -7, "atol": 1e-2}

    def close(got, want):
        torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **tol)

    x, b, g = _x(33, 700).to(dev, dtype), _x(700, seed=1).to(dev, dtype), _x(33, 700, seed=2, scale=1).to(dev, dtype)
    for approximate in ("none", "tanh"):
        xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = K.bias_gelu(xr, br, approximate)
        y.backward(g)
        xd, bd = x.double().requires_grad_(), b.double().requires_grad_()
        want = ops.bias_gelu_composite(xd, bd, approximate)
        want.backward(g.double())
        close(y, want.detach())
        close(xr.grad, xd.grad)
    up = _x(33, 700, seed=3).to(dev, dtype)
    gr, ur = x.clone().requires_grad_(), up.clone().requires_grad_()
    y = K.silu_mul(gr, ur)
    y.backward(g)
    gd, ud = x.double().requires_grad_(), up.double().requires_grad_()
    want = ops.silu_mul_composite(gd, ud)
    want.backward(g.double())
    for got, ref in ((y, want.detach()), (gr.grad, gd.grad), (ur.grad, ud.grad)):
        close(got, ref)
    w = _x(50, 33).to(dev, dtype).requires_grad_()
    ids = torch.randint(0, 200, (4, 9), device=dev)
    e = K.masked_embedding(w, ids, 100, 7)
    assert torch.equal(e, ops.masked_embedding_composite(w.detach(), ids, 100, 7))
    e.backward(torch.ones_like(e))
    wc = w.detach().double().requires_grad_()
    ops.masked_embedding_composite(wc, ids, 100, 7).backward(torch.ones_like(e, dtype=torch.float64))
    close(w.grad, wc.grad)
    comm = Communicator(None)
    logits = _x(40, 1024, scale=4).to(dev, dtype)
    target = torch.randint(0, 1000, (40,), device=dev)
    target[::7] = -100
    z = logits.clone().requires_grad_()
    loss = autotp.vocab_parallel_cross_entropy(z, target, comm=comm, vocab_size=1000, label_smoothing=0.1, fused=True)
    loss.backward()
    zd = logits[:, :1000].double().requires_grad_()
    want = F.cross_entropy(zd, target, label_smoothing=0.1)
    want.backward()
    close(loss, want.detach())
    close(z.grad[:, :1000], zd.grad)
    assert z.grad[:, 1000:].abs().sum() == 0
