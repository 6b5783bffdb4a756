"""kernels: micro-benchmarks of autotp's compiled kernels against the composite ops they replace.

    python bench/harness.py kernels [--only NAME,...] [--rounds 20] [--json kernels.json]

Where kernel micro-benchmarks go.  Each entry of ``MICROBENCHMARKS`` is a ``MicroBench``: a name, and
``cases()`` yielding ``Case``s -- a label (the shape), the kernel as a callable, the composite it replaces
as a callable, and optionally ``skip`` (why this case cannot run here: the extension did not build, no
GPU).  The harness calls each case's kernel and composite once, compares their outputs (``max|diff|``,
and ``torch.equal``), then times them interleaved (kernel, composite, kernel, ... with the order
alternating per round) and prints median ms of each and kernel / composite.  Register an entry with
``@register`` in this file (or in a module imported here)::

    @register
    def silu_mul():
        for n in (512, 4096):
            x = torch.randn(n, 2048)
            g = torch.randn(n, 2048)
            yield Case(f"{n}x2048", lambda: torch.ops.autotp_kernels.silu_mul(x, g),
                       lambda: torch.nn.functional.silu(x) * g,
                       skip=None if autotp.kernels.extension("cpu") else "autotp._C not built")

With no entries the subcommand says so and measures nothing.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Iterable

import torch

import harness as H

RANKS = False  # one process: micro-benchmarks need no process group


@dataclasses.dataclass
class Case:
    label: str
    kernel: Callable[[], object]
    composite: Callable[[], object]
    skip: str | None = None


@dataclasses.dataclass
class MicroBench:
    name: str
    cases: Callable[[], Iterable[Case]]


MICROBENCHMARKS: list[MicroBench] = []


def register(fn: Callable[[], Iterable[Case]]) -> Callable[[], Iterable[Case]]:
    """Add ``fn`` (a generator of ``Case``s) to ``MICROBENCHMARKS`` under its function name."""
    MICROBENCHMARKS.append(MicroBench(fn.__name__, fn))
    return fn


# ---- entries: the kernels' micro-benchmarks are registered below ------------------------------------
# (forward only, under no_grad; bench_kernels.py measures forward+backward and the cross-entropy's memory)


_SMALL = False  # --small: a smoke run's sizes (set by run)


def _batch() -> tuple[int, int]:
    return (2, 128) if _SMALL else (8, 1024)


def _skip():
    import autotp.kernels
    return None if autotp.kernels.extension("cpu") is not None else "autotp._C not built"


@register
def bias_gelu():
    from torch.nn import functional as F
    for approximate in ("tanh", "none"):
        x, b = torch.randn(*_batch(), 3072), torch.randn(3072)
        yield Case(f"{'x'.join(map(str, x.shape))} {approximate}",
                   lambda x=x, b=b, a=approximate: torch.ops.autotp_kernels.bias_gelu(x, b, a),
                   lambda x=x, b=b, a=approximate: F.gelu(x + b, approximate=a), skip=_skip())


@register
def silu_mul():
    from torch.nn import functional as F
    g, u = torch.randn(*_batch(), 8192), torch.randn(*_batch(), 8192)
    yield Case("x".join(map(str, g.shape)), lambda: torch.ops.autotp_kernels.silu_mul(g, u), lambda: F.silu(g) * u, skip=_skip())


@register
def masked_embedding():
    w, ids = torch.randn(25152, 768), torch.randint(0, 2 * 25152, (_batch()[0] * _batch()[1],))

    def composite():
        from autotp import ops
        return ops.masked_embedding_composite(w, ids, 25152)
    yield Case(f"{ids.numel()} ids, 25152x768 shard", lambda: torch.ops.autotp_kernels.masked_embedding(w, ids, 25152, -1),
               composite, skip=_skip())


@register
def vocab_cross_entropy():
    import autotp
    from autotp.runtime import Communicator
    comm = Communicator(None)
    n = _batch()[0] * _batch()[1]
    logits, target = torch.randn(n, 50304 // 2), torch.randint(0, 50304 // 2, (n,))
    yield Case(f"{n}x25152 (loss)",
               lambda: autotp.vocab_parallel_cross_entropy(logits, target, comm=comm, fused=True),
               lambda: autotp.vocab_parallel_cross_entropy(logits, target, comm=comm, fused=False), skip=_skip())


# ---- the subcommand ----------------------------------------------------------------------------------


def add_args(p):
    p.add_argument("--only", default="", help="comma-separated entry names (default: all)")
    p.add_argument("--rounds", type=int, default=20, help="timed calls of each side per case")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--small", action="store_true", help="smaller tensors (a smoke run)")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _diff(a, b):
    a, b = _first(a), _first(b)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None, None
    if a.shape != b.shape:
        return float("inf"), False
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0, bool(torch.equal(a, b))


def run(a) -> dict:
    global _SMALL
    _SMALL = a.small
    torch.set_num_threads(a.threads)
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    entries = [m for m in MICROBENCHMARKS if not only or m.name in only]
    rows = []
    for m in entries:
        for case in m.cases():
            row = {"bench": m.name, "case": case.label, "skip": case.skip}
            if case.skip is None:
                with torch.no_grad():
                    row["max_abs_diff"], row["equal"] = _diff(case.kernel(), case.composite())
                    times = {"kernel": [], "composite": []}
                    for r in range(a.rounds):
                        order = ("kernel", "composite") if r % 2 == 0 else ("composite", "kernel")
                        for side in order:
                            fn = case.kernel if side == "kernel" else case.composite
                            t0 = time.perf_counter()
                            fn()
                            times[side].append(time.perf_counter() - t0)
                row.update({f"{k}_ms": [t * 1e3 for t in v] for k, v in times.items()})
            rows.append(row)
    import autotp.kernels

    return {"entries": [m.name for m in entries], "registered": len(MICROBENCHMARKS), "rows": rows,
            "extensions": {k: autotp.kernels.extension(k) is not None for k in ("cpu", "cuda", "samehost")}}


def report(a, results) -> str:
    r = results[0]
    L = ["=" * 100, f"kernel micro-benchmarks | torch {torch.__version__} | {a.threads} thread(s) | extensions built: "
         + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["extensions"].items())]
    if not r["rows"]:
        what = "none registered" if not r["registered"] else f"none matched --only {a.only!r}"
        L.append(f"  no kernel micro-benchmarks to run ({what}): add entries to MICROBENCHMARKS in bench/kernel_micro.py")
        L.append("=" * 100)
        return "\n".join(L)
    body = []
    for x in r["rows"]:
        if x["skip"]:
            body.append([x["bench"], x["case"], f"skipped: {x['skip']}"])
            continue
        k, c = statistics.median(x["kernel_ms"]), statistics.median(x["composite_ms"])
        rp = statistics.median(u / v for u, v in zip(x["kernel_ms"], x["composite_ms"]))
        d = x["max_abs_diff"]
        body.append([x["bench"], x["case"], f"{k:.3f}", f"{c:.3f}", f"{k / c:.2f} [{rp:.2f}]",
                     "" if d is None else f"{d:.1e}", "" if x["equal"] is None else str(x["equal"])])
    L += H.table(["bench", "case", "kernel ms", "composite ms", "kernel/composite", "max|diff|", "equal"], body)
    L.append(f"  medians of {a.rounds} calls each, interleaved; [median of per-pair ratios]")
    L.append("=" * 100)
    return "\n".join(L)


if __name__ == "__main__":
    import sys

    H.main(["kernels"] + sys.argv[1:])
