"""Same-host collectives (autotp.samehost): shared-memory all-reduce / all-gather / reduce-scatter between CPU ranks.

Checked against gloo's own collectives at world size 2 and 4, through a sharded
generation model (token-for-token equal to the unsharded model, with the
collectives counted by the communicator and none left to gloo), for messages
larger than a slot (the Python transport falls back to gloo; the C++ one sends
them through the slots in pieces), and for a rank that never arrives -- each for
the Python transport and the compiled one (``autotp._samehost``, skipped where it
was not built).  The compiled transport must equal the Python one bit for bit,
survive a stress of back-to-back collectives of changing sizes, and its fused
all-reduce + residual + norm must equal the composite graph it replaces, alone
and inside sharded GPT-2 and Llama models (kernels on and forced off).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model_cases import CASES

from autotp import kernels

TRANSPORTS = [False, pytest.param(True, marks=pytest.mark.skipif(
    not kernels.available()["samehost"], reason="autotp._samehost is not built (python setup.py build_ext --inplace)"))]
needs_cpp = pytest.mark.skipif(not kernels.available()["samehost"],
                               reason="autotp._samehost is not built (python setup.py build_ext --inplace)")



def _norm_fusions(plan) -> list:
    """The plan's all-reduce + norm fusions (the csrc/ compute kernels record theirs beside them)."""
    return [f for f in plan.fusions if f["kind"] == "allreduce_add_norm"]

def _collectives(rank, world, compiled):
    from autotp.samehost import SameHostComm, enable_same_host_collectives

    assert isinstance(enable_same_host_collectives(compiled=compiled), SameHostComm)
    small = SameHostComm(slot_bytes=1 << 20, compiled=compiled)
    assert small.compiled == compiled
    out = []
    for n in (1, 768, 5000, 300_000):  # 300k fp32 (1.2 MB) is larger than the 1 MiB slot; 300k bf16 is not
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(rank * 100 + n)
            x = torch.randn(n, generator=g).to(dtype)
            got = small.all_reduce_(x.clone())
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            gathered = small.all_gather(x)
            exact = torch.stack([p.double() for p in parts]).sum(0)
            # each of the world-1 additions in the dtype rounds by at most half an ulp of the partial sum
            bound = (world * torch.finfo(dtype).eps) * torch.stack([p.double().abs() for p in parts]).sum(0)
            reduced_ok = bool(((got.double() - exact).abs() <= bound + 1e-30).all())
            out.append((n, dtype, reduced_ok, all(torch.equal(a, b) for a, b in zip(parts, gathered)), got))
    out.append(("counts", dict(small.counts)))
    return out


def _gather_into(rank, world, compiled):
    """``gather_into`` writes the global layout straight from the slots: equal to gloo's parts put
    together (``traceable.gather``'s c10d path), for plain, padded and chunked shards, any dim."""
    from autotp.runtime import Communicator
    from autotp.samehost import SameHostComm
    from autotp.traceable import gather

    shm, plain = SameHostComm(slot_bytes=1 << 20, compiled=compiled), Communicator()
    bad = []
    for shape, dim, chunks, global_size in [((3, 5, 8), 2, 1, 8 * world), ((3, 5, 8), 2, 1, 8 * world - 5),
                                            ((6, 4), 0, 3, 6 * world), ((2, 12, 3), 1, 2, 12 * world)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(rank + 10 * dim))
        want = gather(x, dim, chunks, global_size, plain)
        got = shm.gather_into(x, dim, chunks, global_size)
        if got is None or not torch.equal(got, want):
            bad.append((shape, dim, chunks, global_size))
    # larger than the 1 MiB slot: the C++ transport sends whole rows in pieces (padded, chunked, a middle dim);
    # the Python one leaves them to the caller's process group
    large = []
    for shape, dim, chunks, global_size in [((1 << 19,), 0, 1, world << 19), ((3, 50_000, 4), 1, 2, 50_000 * world),
                                            ((3, 50_000, 4), 1, 1, 50_000 * world - 7)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(rank + 3))
        got = shm.gather_into(x, dim, chunks, global_size)
        large.append(None if got is None else torch.equal(got, gather(x, dim, chunks, global_size, plain)))
    row_too_big = shm.gather_into(torch.zeros(2, 1 << 19), 0, 1, 2 * world)  # one 2 MiB row fits no slot
    return bad, large, row_too_big is None, dict(shm.counts)


@pytest.mark.parametrize("compiled", TRANSPORTS)
@pytest.mark.parametrize("world", [2, 4])
def test_gather_into_the_global_layout(world, compiled):
    for bad, large, refused, counts in run_ranks(_gather_into, world, compiled):
        assert bad == [] and refused, bad
        assert large == ([True] * 3 if compiled else [None] * 3), large
        assert counts["all_gather"] == (7 if compiled else 4), counts


def _reduce_scatter(rank, world):
    """The C++ transport's reduce-scatter: this rank's rows of the rank-ordered sum, bitwise what its
    all-reduce gives (the same summation), for any dim, float32 and bfloat16, pieces larger than a slot."""
    from autotp.samehost import SameHostComm

    shm = SameHostComm(slot_bytes=1 << 16, compiled=True)
    results = []
    for shape, dim in [((world * 3, 5), 0), ((2, world * 7, 3), 1), ((4, world * 1000, 16), 1), ((5, world * 2), -1)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(rank * 7 + len(shape))).to(dtype)
            got = shm.reduce_scatter(x, dim)
            n = x.shape[dim] // world
            want = shm.all_reduce_(x.clone()).narrow(dim, rank * n, n)
            results.append((shape, dtype, got is not None and got.shape == want.shape and torch.equal(got, want)))
    wide = shm.reduce_scatter(torch.zeros(world, 1 << 14), 0)  # world rows of 64 KiB fit no 64 KiB slot
    try:
        shm.reduce_scatter(torch.zeros(world * 2 + 1, 3), 0)
        uneven = None
    except ValueError as e:
        uneven = str(e)
    py = SameHostComm(compiled=False).reduce_scatter(torch.zeros(world, 3), 0)
    return results, wide is None, uneven, py is None, shm.counts["reduce_scatter"]


@needs_cpp
@pytest.mark.parametrize("world", [2, 4])
def test_reduce_scatter_equals_the_all_reduce_rows(world):
    for results, wide_refused, uneven, py_refused, count in run_ranks(_reduce_scatter, world):
        assert all(ok for *_, ok in results), [r for r in results if not r[-1]]
        assert wide_refused and py_refused and count == 8
        assert uneven is not None and "do not split over" in uneven, uneven


@pytest.mark.parametrize("compiled", TRANSPORTS)
@pytest.mark.parametrize("world", [2, 4])
def test_same_host_collectives_match_gloo(world, compiled):
    results = run_ranks(_collectives, world, compiled)
    for rows in results:
        for row in rows:
            if row[0] == "counts":
                continue
            n, dtype, reduced_ok, gathered_ok, _ = row
            assert reduced_ok and gathered_ok, (n, dtype)
    counts = results[0][-1][1]
    if compiled:  # the fp32 300k all-reduce went through the slots in two pieces; its all-gather to gloo
        assert counts == {"all_reduce": 8, "all_gather": 7, "reduce_scatter": 0, "fallback": 1}, counts
    else:  # fp32 300k went to gloo
        assert counts == {"all_reduce": 7, "all_gather": 7, "reduce_scatter": 0, "fallback": 2}, counts
    # every rank got the bitwise-same sum (generation relies on identical logits)
    for i, row in enumerate(results[0]):
        if row[0] != "counts":
            assert all(torch.equal(r[i][4], row[4]) for r in results)


def _generate(rank, world):
    import autotp
    from torch.distributed.tensor.debug import CommDebugMode

    torch.manual_seed(0)
    ref = {c.name: c.build for c in CASES}["M3_llama_untied"]()
    tp = autotp.shard_for_generation(ref, world, same_host_collectives=True)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=5, pad_token_id=0, num_beams=3)
    comm = tp.autotp_comm.same_host
    got = tp.generate(input_ids=ids, **kw)
    after_generate = dict(comm.counts)
    with CommDebugMode() as debug, torch.no_grad():
        tp(input_ids=ids)  # one more step: nothing may go through gloo
    c10d = sum(debug.get_comm_counts().values())
    return torch.equal(got, ref.generate(input_ids=ids, **kw)), after_generate, dict(comm.counts), c10d


def test_generation_over_same_host_collectives():
    for same, after_generate, after_step, c10d in run_ranks(_generate, 2):
        assert same
        # prefill + 4 decode steps, each 5 all-reduces (2 per layer + the vocab-parallel embedding)
        # and 1 logits gather; then one more step, all of it through shared memory
        assert after_generate == {"all_reduce": 25, "all_gather": 5, "reduce_scatter": 0, "fallback": 0}, after_generate
        assert after_step == {"all_reduce": 30, "all_gather": 6, "reduce_scatter": 0, "fallback": 0}, after_step
        assert c10d == 0, c10d


def _straggler(rank, world, compiled):
    import time

    from autotp.runtime import CollectiveError
    from autotp.samehost import SameHostComm

    comm = SameHostComm(timeout_s=2.0, compiled=compiled)
    late = world - 1
    comm.all_reduce_(torch.ones(4))  # one collective every rank takes
    if rank != late:  # the last rank skips the next one
        t0 = time.monotonic()
        with pytest.raises(CollectiveError, match=rf"collective #2 on rank {rank} of {world}: rank\(s\) \[{late}\] "
                                                  r"did not arrive within 2 s"):
            comm.all_reduce_(torch.ones(4))
        return time.monotonic() - t0
    return None


@pytest.mark.parametrize("compiled", TRANSPORTS)
@pytest.mark.parametrize("world", [2, 4])
def test_a_missing_rank_raises_instead_of_spinning(world, compiled):
    waited = run_ranks(_straggler, world, compiled)
    assert waited[-1] is None
    assert all(2.0 <= w < 30.0 for w in waited[:-1]), waited  # bounded: raised after the timeout, not never


# ---- the compiled transport (autotp._samehost) ----------------------------------------------------

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _compiled_vs_python(rank, world):
    """The C++ transport's all-reduce / all-gather against the Python transport's (bitwise) and gloo's
    (to the rounding of world-1 additions), for every dtype it sums; 60 000 elements of 4 or 8 bytes
    exceed the 64 KiB slot and go through it in pieces (the Python one gets a slot large enough)."""
    from autotp.samehost import SameHostComm

    cpp = SameHostComm(slot_bytes=64 << 10, compiled=True)
    py = SameHostComm(slot_bytes=1 << 20, compiled=False)
    rows = []
    for dtype in DTYPES:
        for n in (1, 1000, 60_000):
            g = torch.Generator().manual_seed(1000 * rank + n)
            x = (torch.randn(n, generator=g) * 10).to(dtype)
            got, want = cpp.all_reduce_(x.clone()), py.all_reduce_(x.clone())
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            exact = torch.stack([p.double() for p in parts]).sum(0)
            bound = world * torch.finfo(dtype).eps * torch.stack([p.double().abs() for p in parts]).sum(0)
            gloo_ok = bool(((got.double() - exact).abs() <= bound + 1e-30).all())
            gathered = cpp.all_gather(x.view(-1, 10) if n % 10 == 0 else x)
            gather_ok = all(torch.equal(a.reshape(-1), b) for a, b in zip(gathered, parts))
            rows.append((dtype, n, torch.equal(got, want), gloo_ok, gather_ok, got))
    return rows, dict(cpp.counts), dict(py.counts)


@needs_cpp
@pytest.mark.parametrize("world", [2, 4])
def test_compiled_transport_equals_python_bitwise_and_gloo(world):
    results = run_ranks(_compiled_vs_python, world)
    for rows, cpp_counts, py_counts in results:
        for dtype, n, same_as_python, gloo_ok, gather_ok, _ in rows:
            assert same_as_python and gloo_ok, (dtype, n, same_as_python, gloo_ok)
            assert gather_ok or n == 60_000, (dtype, n)  # 60k elements gather through gloo (larger than a slot)
        assert cpp_counts == {"all_reduce": 12, "all_gather": 8, "reduce_scatter": 0, "fallback": 4}, cpp_counts
        assert py_counts == {"all_reduce": 12, "all_gather": 0, "reduce_scatter": 0, "fallback": 0}, py_counts
    for i in range(len(results[0][0])):  # every rank holds the bitwise-same sum
        assert all(torch.equal(r[0][i][5], results[0][0][i][5]) for r in results)


def _stress(rank, world, rounds):
    """Back-to-back collectives of changing sizes whose values name their round: a stale slot (the
    previous round's data read after the flag said it was new) or a torn one (half old, half new)
    shows as a wrong integer; sizes above the 64 KiB slot go through it in pieces (all-reduce, reduce-scatter,
    gather into the layout)."""
    from autotp.samehost import SameHostComm

    comm = SameHostComm(slot_bytes=64 << 10, compiled=True)
    sizes = (1, 8191, 3, 20_000, 77, 1 << 13, 5, 9000)
    bad = []
    for k in range(rounds):
        n = sizes[k % len(sizes)]
        # element i of rank r in round k: k * 4096 + r + i % 7 -- exact in float64 sums
        x = torch.arange(n, dtype=torch.float64).remainder_(7).add_(k * 4096 + rank)
        want = torch.arange(n, dtype=torch.float64).remainder_(7).mul_(world).add_(world * k * 4096 + world * (world - 1) // 2)
        if not torch.equal(comm.all_reduce_(x.clone()), want):
            bad.append(("all_reduce", k, n))
        if n * 8 <= comm.slot_bytes:
            parts = comm.all_gather(x)
            if not all(torch.equal(p, x - rank + r) for r, p in enumerate(parts)):
                bad.append(("all_gather", k, n))
        # every rank's rows of [x, x, ...] sum to want; the gather lays the ranks' x end to end
        if not torch.equal(comm.reduce_scatter(x.repeat(world), 0), want):
            bad.append(("reduce_scatter", k, n))
        if not torch.equal(comm.gather_into(x, 0, 1, world * n), torch.cat([x - rank + r for r in range(world)])):
            bad.append(("gather_into", k, n))
    return bad, dict(comm.counts)


@needs_cpp
@pytest.mark.parametrize("world", [2, 4])
def test_compiled_transport_store_ordering_stress(world):
    rounds = 400
    for bad, counts in run_ranks(_stress, world, rounds):
        assert bad == [], bad[:10]
        assert counts["all_reduce"] == rounds == counts["reduce_scatter"], counts
        assert counts["all_gather"] == rounds // 8 * 6 + rounds, counts


def _fused_vs_composite(rank, world):
    """``SameHostComm.add_norm`` against the composite it replaces: ``s = AllReduce(x + OneRankShare(r))``
    (or ``AllReduce(x)``), ``y = layer_norm(s)`` / Llama's RMSNorm written out.  ``s`` must be bitwise
    equal; ``y`` within 1e-6 of max|y| in float32 (1e-12 in float64, 2 ulp-ish in the half types).
    32 rows of 1000 float64 (256 KB) take four pieces of the 64 KiB slot."""
    import torch.nn.functional as F

    from autotp.samehost import SameHostComm

    comm = SameHostComm(slot_bytes=64 << 10, compiled=True)
    out = []
    for dtype in DTYPES:
        for rows, cols in ((1, 64), (6, 48), (32, 1000)):
            for rms in (False, True):
                for join in (False, True):
                    g = torch.Generator().manual_seed(rank * 31 + rows + cols)
                    gs = torch.Generator().manual_seed(7 + cols)  # the replicated tensors: the same on every rank
                    x = torch.randn(rows, cols, generator=g).to(dtype)
                    r = torch.randn(rows, cols, generator=gs).to(dtype)
                    w = (1 + 0.1 * torch.randn(cols, generator=gs)).to(dtype)
                    b = None if rms else (0.1 * torch.randn(cols, generator=gs)).to(dtype)
                    eps = 1e-6 if rms else 1e-5
                    p = x + (r if rank == 0 else torch.zeros_like(r)) if join else x
                    s_ref = comm.all_reduce_(p.clone())
                    if rms:
                        t = s_ref.float() if dtype in (torch.bfloat16, torch.float16) else s_ref
                        y_ref = w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
                    else:
                        y_ref = F.layer_norm(s_ref, (cols,), w, b, eps)
                    s, y = comm.add_norm(x, w, b, eps, rms, residual=r if join and rank == 0 else None, join=join)
                    rel = ((y.double() - y_ref.double()).abs().max() / y_ref.double().abs().max()).item()
                    out.append((dtype, rows, cols, rms, join, torch.equal(s, s_ref), rel))
    return out


@needs_cpp
@pytest.mark.parametrize("world", [2, 4])
def test_fused_allreduce_norm_equals_composite(world):
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
    for rows in run_ranks(_fused_vs_composite, world):
        assert len(rows) == 4 * 3 * 2 * 2
        for dtype, r, c, rms, join, s_exact, rel in rows:
            assert s_exact, (dtype, r, c, rms, join)
            assert rel <= tol[dtype], (dtype, r, c, rms, join, rel)


def _models(rank, world):
    """GPT-2 (LayerNorm) and Llama (written-out RMSNorm) sharded over same-host collectives, with the
    kernels on and forced off: logits against the unsharded model (inference, and with autograd on,
    where the fused module runs its composite twin: logits and gradients equal), the plan's fusions,
    how often the fused op ran, the collectives counted (none through gloo), and greedy generation."""
    import autotp
    from torch.distributed.tensor.debug import CommDebugMode

    from autotp.samehost import AllReduceAddNorm

    cases = {c.name: c for c in CASES}
    out = {}
    for name in ("M2_gpt2", "M3_llama_untied"):
        for kernels_on in (True, False):
            torch.manual_seed(0)
            case = cases[name]
            model = case.build()
            args, kw = case.inputs()
            tp = autotp.shard(model, world, example_inputs=args, example_kwargs=kw, same_host_collectives=True,
                              kernels=kernels_on)
            fused_modules = [m for m in tp.modules() if isinstance(m, AllReduceAddNorm)]
            with torch.no_grad():
                want = case.output(model(*args, **kw))
                tp(*args, **kw)  # the first call checks the inputs agree across ranks (through gloo)
                with CommDebugMode() as debug:
                    got = case.output(tp(*args, **kw))
            c10d = sum(debug.get_comm_counts().values())
            counts = dict(tp.comm.same_host.counts)
            fused_calls = sum(m.fused_calls for m in fused_modules)
            # autograd on: the fused modules run their composite twins; logits and grads as the reference
            got_g = case.output(tp(*args, **kw))
            want_g = case.output(model(*args, **kw))
            got_g.square().mean().backward()
            want_g.square().mean().backward()
            ref_params = dict(model.named_parameters())
            norm_grads = [(p.grad, ref_params[n.removeprefix("module.")].grad) for n, p in tp.named_parameters()
                          if p.grad is not None and ("norm" in n or ".ln_" in n)]  # replicated: whole on every rank
            assert len(norm_grads) == sum("norm" in n or ".ln_" in n for n in ref_params) > 0
            grad_err = max((a - b).abs().max().item() for a, b in norm_grads)
            out[name, kernels_on, "forward"] = ((got - want).abs().max().item(), (got_g - want_g).abs().max().item(),
                                               grad_err, _norm_fusions(tp.plan), fused_calls, counts, c10d)
            # greedy generation, token for token
            torch.manual_seed(0)
            ref = case.build()
            gen = autotp.shard_for_generation(ref, world, same_host_collectives=True, kernels=kernels_on)
            ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(5))
            kw_gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            tokens = gen.generate(input_ids=ids, **kw_gen)
            fused_calls = sum(m.fused_calls for m in gen.modules() if isinstance(m, AllReduceAddNorm))
            out[name, kernels_on, "generate"] = (torch.equal(tokens, ref.generate(input_ids=ids, **kw_gen)),
                                                {k: len(_norm_fusions(p)) for k, p in gen.autotp_steps.plans.items()},
                                                fused_calls, dict(gen.autotp_comm.same_host.counts))
    return out


@needs_cpp
@pytest.mark.parametrize("world", [2, 4])
def test_models_with_fused_allreduce_norm(world):
    for res in run_ranks(_models, world):
        for name in ("M2_gpt2", "M3_llama_untied"):
            for requested in (True, False):
                on = requested and kernels.enabled()  # AUTOTP_KERNELS=0 forces them off: the composite graph
                err, err_g, grad_err, fusions, fused_calls, counts, c10d = res[name, requested, "forward"]
                assert err <= 1e-5 and err_g <= 1e-5 and grad_err <= 1e-5, (name, on, err, err_g, grad_err)
                # 2 all-reduces per layer + the embedding's, each followed by a norm: all five fused when on
                assert len(fusions) == (5 if on else 0), (name, on, fusions)
                assert all(f["kind"] == "allreduce_add_norm" for f in fusions)
                assert fused_calls == (10 if on else 0), (name, on, fused_calls)  # two forwards without autograd
                assert counts == {"all_reduce": 10, "all_gather": 2, "reduce_scatter": 0, "fallback": 0}, (name, on, counts)
                assert c10d == 0, (name, on, c10d)
                same, plan_fusions, gen_fused, gen_counts = res[name, requested, "generate"]
                assert same, (name, on)
                assert all(n == (5 if on else 0) for n in plan_fusions.values()), plan_fusions
                # prefill + 5 decode steps, 5 reductions each, every one fused when on
                assert gen_fused == (30 if on else 0), (name, on, gen_fused)
                assert gen_counts["all_reduce"] == 30 and gen_counts["fallback"] == 0, gen_counts


def test_bad_slot_size_is_named():
    from autotp.samehost import SameHostComm

    with pytest.raises(ValueError, match=r"slot_bytes=100 must be a positive multiple of 64"):
        SameHostComm(slot_bytes=100)


@needs_cpp
def test_the_compiled_transport_checks_its_mapping():
    from autotp import _samehost

    buf = torch.zeros(1024, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"the mapping has 1024 bytes; world 2 with 4096-byte slots needs 16416"):
        _samehost.Transport(buf.data_ptr(), 1024, 2, 0, 4096, 1.0)
    with pytest.raises(ValueError, match=r"rank 2 of world size 2"):
        _samehost.Transport(buf.data_ptr(), 1024, 2, 2, 64, 1.0)


def _compiled_model(rank, world):
    import autotp

    from autotp.samehost import AllReduceAddNorm

    case = {c.name: c for c in CASES}["M3_llama_untied"]
    torch.manual_seed(0)
    model = case.build()
    args, kw = case.inputs()
    tp = autotp.shard(model, world, example_inputs=args, example_kwargs=kw, same_host_collectives=True, compile=True)
    with torch.no_grad():
        err = (case.output(tp(*args, **kw)) - case.output(model(*args, **kw))).abs().max().item()
    fused = [m for m in tp.modules() if isinstance(m, AllReduceAddNorm)]
    return err, len(_norm_fusions(tp.plan)), len(fused), sum(m.fused_calls for m in fused)


@needs_cpp
def test_fused_allreduce_norm_under_torch_compile_runs_the_composite():
    for err, fusions, modules, fused_calls in run_ranks(_compiled_model, 2):
        # fullgraph compile traces the fused module's composite twin (its AllReduce has a traceable op)
        assert err <= 1e-5 and fusions == modules == 5 and fused_calls == 0, (err, fusions, modules, fused_calls)
