"""How long `autotp plan` takes, and its peak memory, on a config (default: the 70B Llama preset at world size 8).

    OMP_NUM_THREADS=1 python bench/bench_plan.py                          # llama-70b, world size 8, dumps included
    OMP_NUM_THREADS=1 python bench/bench_plan.py --model gpt2-medium --world-size 4

Runs the command line as a user does, with each repeated block traced once (the default) and
with ``--whole`` (every block traced), alternating, and checks that both write the same
``plan.json`` and ``graph.dot``.  It runs the command line as a user does (a fresh `python -m autotp plan ...` process, so imports count),
`--repeat` times, and prints each run's wall time and peak resident memory (the child's `ru_maxrss`, what
`/usr/bin/time -v` reports as "Maximum resident set size"), the plan's own step times from its progress
lines, and the command.  Not a test: figures depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time


def one_run(args, out: str, whole: bool = False) -> tuple[float, int, str]:
    cmd = [sys.executable, "-m", "autotp", "plan", args.model, "--world-size", str(args.world_size),
           "--seq-len", str(args.seq_len), "--out", out] + (["--whole"] if whole else [])
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    text = child.stdout.read()
    child.stdout.close()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS (KiB on Linux)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text}")
    rss_kib = usage.ru_maxrss
    return wall, rss_kib, text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-70b")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-whole", action="store_true", help="skip the --whole runs (every block traced)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as reused, tempfile.TemporaryDirectory() as whole:
        for i in range(args.repeat):  # the two ways alternate, so load drifts hit both
            for how, out in (("blocks reused", reused), ("--whole", whole)):
                if how == "--whole" and args.no_whole:
                    continue
                wall, rss_kib, text = one_run(args, out, whole=how == "--whole")
                steps = re.findall(r"autotp: (.*): done in ([0-9.]+) s", text)
                print(f"run {i} {how:>13}: {wall:.2f} s wall, peak RSS {rss_kib / 1024:.0f} MiB; "
                      + "; ".join(f"{what.split(' (')[0].split(' on ')[0]} {s} s" for what, s in steps))
        files = sorted(os.listdir(reused))
        if not args.no_whole:
            same = all(open(os.path.join(reused, f), "rb").read() == open(os.path.join(whole, f), "rb").read()
                       for f in ("plan.json", "graph.dot"))
            print(f"plan.json and graph.dot of the two ways: {'identical' if same else 'DIFFERENT'}")
    print(f"wrote {', '.join(files)}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"command: OMP_NUM_THREADS=1 python -m autotp plan {args.model} --world-size {args.world_size} "
          f"--seq-len {args.seq_len} --out DIR [--whole]")
    if not args.no_whole and not same:
        raise SystemExit("the plans differ")


if __name__ == "__main__":
    main()
