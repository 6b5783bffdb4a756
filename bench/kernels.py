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


# ---- the subcommand ----------------------------------------------------------------------------------


def add_args(p):
    p.add_argument("--only", default="", help="comma-separated entry names (default: all)")
    p.add_argument("--rounds", type=int, default=20, help="timed calls of each side per case")
    p.add_argument("--threads", type=int, default=1, help="torch threads")


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
        L.append(f"  no kernel micro-benchmarks to run ({what}): add entries to MICROBENCHMARKS in bench/kernels.py")
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
