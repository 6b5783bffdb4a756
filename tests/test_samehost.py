"""Same-host collectives (autotp.samehost): shared-memory all-reduce / all-gather between CPU ranks.

Checked against gloo's own collectives at world size 2 and 4, through a sharded
generation model (token-for-token equal to the unsharded model, with the
collectives counted by the communicator and none left to gloo), for messages
larger than a slot (they fall back to gloo), and for a rank that never arrives.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model_cases import CASES


def _collectives(rank, world):
    from autotp.samehost import SameHostComm, enable_same_host_collectives

    assert isinstance(enable_same_host_collectives(), SameHostComm)
    small = SameHostComm(slot_bytes=1 << 20)
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


def _gather_into(rank, world):
    """``gather_into`` writes the global layout straight from the slots: equal to gloo's parts put
    together (``traceable.gather``'s c10d path), for plain, padded and chunked shards, any dim."""
    from autotp.runtime import Communicator
    from autotp.samehost import SameHostComm
    from autotp.traceable import gather

    shm, plain = SameHostComm(slot_bytes=1 << 20), Communicator()
    bad = []
    for shape, dim, chunks, global_size in [((3, 5, 8), 2, 1, 8 * world), ((3, 5, 8), 2, 1, 8 * world - 5),
                                            ((6, 4), 0, 3, 6 * world), ((2, 12, 3), 1, 2, 12 * world)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(rank + 10 * dim))
        want = gather(x, dim, chunks, global_size, plain)
        got = shm.gather_into(x, dim, chunks, global_size)
        if got is None or not torch.equal(got, want):
            bad.append((shape, dim, chunks, global_size))
    too_big = shm.gather_into(torch.zeros(1 << 19), 0, 1, world << 19)  # 2 MiB > the 1 MiB slot: the caller's
    return bad, too_big is None, dict(shm.counts)


@pytest.mark.parametrize("world", [2, 4])
def test_gather_into_the_global_layout(world):
    for bad, refused, counts in run_ranks(_gather_into, world):
        assert bad == [] and refused, bad
        assert counts["all_gather"] == 4, counts


@pytest.mark.parametrize("world", [2, 4])
def test_same_host_collectives_match_gloo(world):
    results = run_ranks(_collectives, world)
    for rows in results:
        for row in rows:
            if row[0] == "counts":
                continue
            n, dtype, reduced_ok, gathered_ok, _ = row
            assert reduced_ok and gathered_ok, (n, dtype)
    counts = results[0][-1][1]
    assert counts == {"all_reduce": 7, "all_gather": 7, "fallback": 2}, counts  # fp32 300k went to gloo
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
        assert after_generate == {"all_reduce": 25, "all_gather": 5, "fallback": 0}, after_generate
        assert after_step == {"all_reduce": 30, "all_gather": 6, "fallback": 0}, after_step
        assert c10d == 0, c10d


def _straggler(rank, world):
    from autotp.samehost import SameHostComm

    comm = SameHostComm(timeout_s=2.0)
    if rank == 0:
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] did not arrive"):
            comm.all_reduce_(torch.ones(4))
    return True


def test_a_missing_rank_raises_instead_of_spinning():
    assert run_ranks(_straggler, 2) == [True, True]
