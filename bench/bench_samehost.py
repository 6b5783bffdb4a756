"""Same-host collectives: the C++ transport vs the Python one vs gloo, and the fused all-reduce + norm.

Run (2 CPU ranks on this host, gloo, one thread per rank; ``autotp._samehost`` built with
``python setup.py build_ext --inplace``)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/bench_samehost.py [--json FILE] [--quick]

1. All-reduce (sum, float32) of 3 KB, 1.5 MB and 32 MB: median and min latency per call over
   ``--iters`` calls (a tenth of them at 32 MB), the peers interleaved call by call, of

   * ``cpp``: ``SameHostComm(compiled=True)`` with its default 4 MiB slots: 32 MB goes through
     the slots in 8 pieces (one collective each);
   * ``cpp 32M slot``: the same with a slot large enough for 32 MB (one piece: the cost of chunking);
   * ``python``: ``SameHostComm(compiled=False)`` with a slot large enough for 32 MB (with the
     default 4 MiB slot the Python transport hands 32 MB to gloo);
   * ``gloo``: ``dist.all_reduce``.

   The three results are checked against each other first (cpp == python bit for bit, gloo to
   float32 rounding), so a wrong transport cannot look fast.
2. The fused all-reduce + residual + RMSNorm (``SameHostComm.add_norm``) vs the composite it
   replaces in a lowered Llama graph -- ``x + r`` on rank 0, the C++ all-reduce, then Llama's
   RMSNorm written out in torch ops -- at decode ([1, 4096]) and prefill ([128, 4096]) shapes
   and at 3 KB ([1, 768]); the outputs are compared (s bitwise, y to 1e-6 relative).

Rank 0 prints one table with the ratios (``x slower`` = that peer's median / the C++ median).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotp import kernels  # noqa: E402
from autotp.samehost import SameHostComm  # noqa: E402


def timed(peers: dict, iters: int, warmup: int, reset=None) -> dict:
    """``{name: (median, min)}`` seconds per call of each ``peers[name]()``, over ``iters`` rounds
    that call every peer once in turn (interleaved, so that a change in the machine's load --
    2 cores shared with others here -- falls on every peer alike); ``reset()`` runs untimed
    before each call."""
    samples = {name: [] for name in peers}
    for i in range(warmup + iters):
        for name, fn in peers.items():
            if reset is not None:
                reset()
            dist.barrier()  # start together: each sample is one collective, not a rank's head start
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                samples[name].append(dt)
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def rms_composite(s: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    t = s.to(torch.float32)
    return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--quick", action="store_true", help="20 calls per row (a smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if kernels.extension("samehost") is None:
        if rank == 0:
            print("autotp._samehost is not built: run 'python setup.py build_ext --inplace' first", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    iters = 20 if args.quick else args.iters
    sizes = {"3 KB": 768, "1.5 MB": 393_216, "32 MB": 8_388_608}  # float32 elements
    cpp = SameHostComm(compiled=True)
    cpp_big = SameHostComm(compiled=True, slot_bytes=max(sizes.values()) * 4)  # 32 MB in one piece
    py = SameHostComm(compiled=False, slot_bytes=max(sizes.values()) * 4)
    rows, fused_rows = [], []
    for label, n in sizes.items():
        base = torch.randn(n, generator=torch.Generator().manual_seed(rank))
        x = base.clone()
        a, b, c = cpp.all_reduce_(base.clone()), py.all_reduce_(base.clone()), base.clone()
        dist.all_reduce(c)
        assert torch.equal(a, b), f"{label}: the C++ and Python transports disagree"
        assert torch.equal(a, cpp_big.all_reduce_(base.clone())), f"{label}: chunked and one-piece sums disagree"
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
        k = max(5, iters // 10) if n > 1 << 20 else iters
        reset = lambda: x.copy_(base)  # noqa: E731 -- the sum is in place: each call gets the same input
        row = {"size": label, "bytes": n * 4, "iters": k}
        peers = {"cpp": lambda: cpp.all_reduce_(x), "cpp_32m_slot": lambda: cpp_big.all_reduce_(x),
                 "python": lambda: py.all_reduce_(x), "gloo": lambda: dist.all_reduce(x)}
        for name, (med, lo) in timed(peers, k, 3, reset).items():
            row[name + "_median_us"], row[name + "_min_us"] = med * 1e6, lo * 1e6
        rows.append(row)

    eps = 1e-6
    for label, (m, h) in {"3 KB [1, 768]": (1, 768), "decode [1, 4096]": (1, 4096),
                          "prefill [128, 4096]": (128, 4096)}.items():
        g = torch.Generator().manual_seed(rank + 1)
        gs = torch.Generator().manual_seed(99)
        x = torch.randn(m, h, generator=g)
        r = torch.randn(m, h, generator=gs)
        w = 1 + 0.1 * torch.randn(h, generator=gs)
        mine = r if rank == 0 else None

        def composite():
            s = cpp.all_reduce_(x + r if rank == 0 else x + torch.zeros_like(r))
            return s, rms_composite(s, w, eps)

        def fused():
            return cpp.add_norm(x, w, None, eps, True, residual=mine, join=True)

        (s1, y1), (s2, y2) = composite(), fused()
        assert torch.equal(s1, s2), f"{label}: the fused residual differs from the composite"
        rel = ((y1 - y2).abs().max() / y1.abs().max()).item()
        assert rel <= 1e-6, f"{label}: fused RMSNorm off by {rel:.2e} relative"
        row = {"shape": label, "iters": iters, "y_rel_diff": rel}
        for name, (med, lo) in timed({"fused": fused, "composite": composite}, iters, 3).items():
            row[name + "_median_us"], row[name + "_min_us"] = med * 1e6, lo * 1e6
        fused_rows.append(row)

    if rank == 0:
        print(f"same-host all-reduce, float32, world {world}, median (min) us per call; ratio = peer / cpp")
        print("(cpp: 4 MiB slots, 32 MB in 8 pieces; cpp 32M slot: one piece; python: 32 MiB slot)")
        print(f"{'size':>8} {'cpp':>18} {'cpp 32M slot':>18} {'python':>18} {'gloo':>18} {'python/cpp':>11} "
              f"{'gloo/cpp':>9}")
        for r_ in rows:
            cells = [f"{r_[p + '_median_us']:9.1f} ({r_[p + '_min_us']:7.1f})"
                     for p in ("cpp", "cpp_32m_slot", "python", "gloo")]
            print(f"{r_['size']:>8} {cells[0]:>18} {cells[1]:>18} {cells[2]:>18} {cells[3]:>18} "
                  f"{r_['python_median_us'] / r_['cpp_median_us']:10.2f}x {r_['gloo_median_us'] / r_['cpp_median_us']:8.2f}x")
        print()
        print("fused all-reduce + residual + RMSNorm vs x + r, C++ all-reduce, composite RMSNorm (float32)")
        print(f"{'shape':>20} {'fused':>18} {'composite':>18} {'composite/fused':>16} {'y rel diff':>11}")
        for r_ in fused_rows:
            cells = [f"{r_[p + '_median_us']:9.1f} ({r_[p + '_min_us']:7.1f})" for p in ("fused", "composite")]
            print(f"{r_['shape']:>20} {cells[0]:>18} {cells[1]:>18} "
                  f"{r_['composite_median_us'] / r_['fused_median_us']:15.2f}x {r_['y_rel_diff']:11.1e}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world": world, "threads": torch.get_num_threads(), "all_reduce": rows,
                           "fused_add_rmsnorm": fused_rows}, f, indent=1)
            print(f"\nwrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
