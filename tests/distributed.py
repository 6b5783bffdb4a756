"""Run a function on N gloo ranks with torch.multiprocessing, collecting each rank's return value.

Ranks are forked from a fork server (``multiprocessing``'s ``forkserver`` start method) that has
imported torch, transformers' model code and autotp once per test session: a rank starts in well
under a second instead of importing them again (seconds per process, most of the suite's time at
world 4 on 2 cores).  The server is a single-threaded process that only imported modules, so
forking it is safe; each rank gets the caller's current environment (``os.environ`` at the call),
as a spawned process would.  ``AUTOTP_RANKS_START=spawn`` falls back to spawning.

Ranks run with ``OMP_NUM_THREADS=1``; a rank that raises makes
``run_ranks`` raise with that rank's traceback (no hang: the others are killed), and so do
ranks that have not finished after ``RANKS_TIMEOUT_S``.  A rank
that wrote its result and then died on the way out (a signal during interpreter teardown)
still counts: every rank's result file decides.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


RANKS_TIMEOUT_S = 900  # the slowest spawn of the suite (every model case at world 4, loaded) takes a few minutes


# imported once by the fork server; every rank starts with them loaded
PRELOAD = ["torch", "torch.distributed", "numpy", "networkx", "transformers", "autotp", "autotp.passes",
           "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama"]


def _start_method() -> str:
    method = os.environ.get("AUTOTP_RANKS_START", "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"AUTOTP_RANKS_START={method!r}: use 'forkserver' (default) or 'spawn'")
    if method == "forkserver":
        import multiprocessing

        multiprocessing.set_forkserver_preload(PRELOAD)
    return method


def _entry(rank, world, fn, args, init_file, out_dir, env):
    os.environ.clear()
    os.environ.update(env)  # the caller's, as a spawned rank would have it
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        dist.barrier()
        payload = ("ok", result)
    except BaseException as e:  # reported to the parent
        payload = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    # Leave without interpreter teardown: the result is on disk, and under load a rank process
    # sometimes aborts in C++ static destructors at exit ("terminate called without an active
    # exception", SIGABRT, seen before this change too), which would fail a test that passed.
    os._exit(1 if payload[0] == "error" else 0)


def run_ranks(fn, world_size: int, *args) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        try:
            ctx = mp.start_processes(_entry, args=(world_size, fn, args, init_file, tmp, dict(os.environ)),
                                     nprocs=world_size, join=False, start_method=_start_method())
            deadline = time.monotonic() + RANKS_TIMEOUT_S
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:  # a hang must fail the test, not stall the suite
                    for p in ctx.processes:
                        p.kill()
                    what = getattr(fn, "__name__", fn)
                    raise RuntimeError(f"{what} on {world_size} ranks did not finish in {RANKS_TIMEOUT_S} s "
                                       "(a hang: ranks waiting in different collectives?)")
        except Exception as spawn_error:
            errors, done = [], 0
            for r in range(world_size):
                p = os.path.join(tmp, f"rank{r}.pkl")
                if os.path.exists(p):
                    with open(p, "rb") as f:
                        status, val = pickle.load(f)
                    done += 1
                    if status == "error":
                        errors.append(val)
            if errors or done < world_size:
                raise RuntimeError("\n".join(errors) or str(spawn_error)) from None
        results = []
        for r in range(world_size):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f)[1])
        return results


_RESULTS: dict = {}


def run_ranks_once(fn, world_size: int, *args) -> list:
    """``run_ranks``, remembered per (function, world size, args): the tests of one module share
    one spawn of ranks per world size (imports cost seconds per process)."""
    key = (fn, world_size, args)
    if key not in _RESULTS:
        _RESULTS[key] = run_ranks(fn, world_size, *args)
    return _RESULTS[key]
