"""Kernel micro-benchmarks with autograd: each csrc/ kernel against its composite twin, forward + backward,
and the vocab-parallel cross-entropy's memory (forward-only cases: ``python bench/harness.py kernels``).

    OMP_NUM_THREADS=1 python bench/bench_kernels.py                 # the issue's sizes, ~1-2 min on 2 cores
    OMP_NUM_THREADS=1 python bench/bench_kernels.py --small --json out.json

Rows (fp32, CPU unless ``--device cuda``; times are medians of ``--iters`` interleaved calls):

* ``bias_gelu`` (tanh and erf forms) at ``[8, 1024, 3072]``: ``gelu(x + b)`` composite vs the fused kernel,
  forward, and forward + backward;
* ``silu_mul`` at ``[8, 1024, 8192]``: ``silu(g) * u`` vs the kernel, forward + backward;
* ``vocab_cross_entropy`` at ``[8 x 1024, 50304 / 2]`` (one rank's shard at world size 2): loss + backward,
  time, and peak resident memory one step adds above the logits (gradient included; a fresh process each),
  composite vs fused;

Every row prints the ratio composite / fused (> 1: the kernel is faster or smaller).  The
kernels must be compiled (``autotp.kernels.available()``); the script says so and exits 2
otherwise.  ``BENCHMARKS`` is the list a harness can run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _median_ms(fns: dict, iters: int) -> dict:
    """Interleaved timing: each round calls every fn once (noise hits them alike); medians in ms."""
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


_PEAK_SCRIPT = """
import sys, torch, autotp
from autotp.runtime import Communicator
rows, cols, fused = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
comm = Communicator(None)
def peak_rss():  # this process's resident high-water mark (VmHWM: per address space, so fresh after exec,
    # unlike getrusage's ru_maxrss, which a child inherits from its parent)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
def step(logits, target):
    autotp.vocab_parallel_cross_entropy(logits, target, comm=comm, fused=fused).backward()
step(torch.randn(4, 64).requires_grad_(), torch.randint(0, 64, (4,)))  # load what the first call loads
logits = torch.randn(rows, cols).requires_grad_()
target = torch.randint(0, cols, (rows,))
base = peak_rss()  # the high-water mark so far: the logits
step(logits, target)
print(peak_rss() - base)
"""


def _ce_peak_bytes(rows: int, cols: int, fused: bool) -> int:
    """Peak resident bytes one loss + backward adds above the logits, gradient included (a fresh process:
    tensors this large are mapped and unmapped by the allocator, so the resident high-water mark
    follows the live tensors)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(rows), str(cols), "1" if fused else "0"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def bench_bias_gelu(small: bool, iters: int, device: str) -> list[dict]:
    from autotp import ops

    shape = (2, 256, 3072) if small else (8, 1024, 3072)
    x = torch.randn(shape, device=device)
    b = torch.randn(shape[-1], device=device)
    g = torch.randn(shape, device=device)
    rows = []
    for approximate in ("tanh", "none"):
        k = torch.ops.autotp_kernels.bias_gelu
        fwd = _median_ms({"composite": lambda: F.gelu(x + b, approximate=approximate),
                          "fused": lambda: k(x, b, approximate)}, iters)
        xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()

        def both(fn):
            def run():
                y = fn(xr, br, approximate)
                y.backward(g)
                xr.grad = br.grad = None
            return run

        fb = _median_ms({"composite": both(ops.bias_gelu_composite), "fused": both(k)}, iters)
        for what, t in (("forward", fwd), ("forward+backward", fb)):
            rows.append({"kernel": f"bias_gelu ({approximate})", "what": what, "shape": list(shape),
                         "composite_ms": t["composite"], "fused_ms": t["fused"],
                         "ratio": t["composite"] / t["fused"]})
    return rows


def bench_silu_mul(small: bool, iters: int, device: str) -> list[dict]:
    from autotp import ops

    shape = (2, 256, 8192) if small else (8, 1024, 8192)
    gate = torch.randn(shape, device=device).requires_grad_()
    up = torch.randn(shape, device=device).requires_grad_()
    g = torch.randn(shape, device=device)

    def both(fn):
        def run():
            fn(gate, up).backward(g)
            gate.grad = up.grad = None
        return run

    t = _median_ms({"composite": both(ops.silu_mul_composite), "fused": both(torch.ops.autotp_kernels.silu_mul)},
                   iters)
    return [{"kernel": "silu_mul", "what": "forward+backward", "shape": list(shape), "composite_ms": t["composite"],
             "fused_ms": t["fused"], "ratio": t["composite"] / t["fused"]}]


def bench_cross_entropy(small: bool, iters: int, device: str) -> list[dict]:
    import autotp
    from autotp.runtime import Communicator

    rows_n, cols = (2 * 256, 50304 // 2) if small else (8 * 1024, 50304 // 2)
    comm = Communicator(None)
    logits = torch.randn(rows_n, cols, device=device).requires_grad_()
    target = torch.randint(0, cols, (rows_n,), device=device)

    def step(fused):
        def run():
            loss = autotp.vocab_parallel_cross_entropy(logits, target, comm=comm, fused=fused)
            loss.backward()
            logits.grad = None
        return run

    t = _median_ms({"composite": step(False), "fused": step(True)}, max(3, iters // 3))
    out = [{"kernel": "vocab_cross_entropy", "what": "loss+backward time", "shape": [rows_n, cols],
            "composite_ms": t["composite"], "fused_ms": t["fused"], "ratio": t["composite"] / t["fused"]}]
    if device == "cpu":
        mem = {k: _ce_peak_bytes(rows_n, cols, k == "fused") for k in ("composite", "fused")}
        out.append({"kernel": "vocab_cross_entropy", "what": "peak bytes above the logits", "shape": [rows_n, cols],
                    "composite_MiB": mem["composite"] / 2**20, "fused_MiB": mem["fused"] / 2**20,
                    "ratio": mem["composite"] / max(mem["fused"], 1),
                    "fused_over_composite": mem["fused"] / max(mem["composite"], 1)})
    return out


BENCHMARKS = [bench_bias_gelu, bench_silu_mul, bench_cross_entropy]


def run(small: bool = False, iters: int = 10, device: str = "cpu") -> list[dict]:
    from autotp import kernels

    if not kernels.available()["cpu"] or (device == "cuda" and not kernels.available()["cuda"]):
        raise SystemExit(f"the kernels are not compiled ({kernels.available()}): "
                         "pip install --no-build-isolation -e .")
    torch.manual_seed(0)
    rows = []
    for bench in BENCHMARKS:
        rows += bench(small, iters, device)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'kernel':<22} {'what':<28} {'shape':<18} {'composite':>12} {'fused':>12} {'composite/fused':>16}"]
    for r in rows:
        unit = "ms" if "composite_ms" in r else "MiB"
        c, f = r.get("composite_ms", r.get("composite_MiB")), r.get("fused_ms", r.get("fused_MiB"))
        lines.append(f"{r['kernel']:<22} {r['what']:<28} {'x'.join(map(str, r['shape'])):<18} "
                     f"{c:>9.2f} {unit:<2} {f:>9.2f} {unit:<2} {r['ratio']:>15.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="smaller tensors (a smoke run)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    rows = run(args.small, args.iters, args.device)
    print(f"# {' '.join(['python bench/bench_kernels.py'] + (argv if argv is not None else sys.argv[1:]))}  "
          f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s))")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "argv": sys.argv}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
