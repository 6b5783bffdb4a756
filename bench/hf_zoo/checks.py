"""The scan's three checks of one architecture; each returns a JSON-able record with ``ok``.

1. ``build_check``: the tiny model builds and its unsharded forward runs.  Anything failing here
   is about the tiny config (or a model that cannot be called with ``input_ids`` alone), not
   autotp, so later steps skip it.
2. ``plan_check``: ``autotp.plan`` in this process, no ranks.  Catches capture failures and
   analysis crashes cheaply, and records what the plan shards (collectives per forward and
   backward, parameters sharded, layers left whole and why).
3. ``rank_check`` (run on every rank by ``tests/distributed.run_ranks``): ``autotp.shard`` on
   real gloo ranks and the sharded logits against the unsharded model's -- the only check that
   runs lowering and the collectives, so the only one that sees a wrong answer.

Every model gets a time limit (SIGALRM), so that one slow model cannot stall the scan; a failure
is recorded with its exception, first message line and the autotp frames it went through.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import time
import traceback
import warnings
from pathlib import Path

import torch

import build

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

BUILD_TIMEOUT_S = 60      # build + one unsharded forward
PLAN_TIMEOUT_S = 180      # autotp.plan (capture + analysis)
RANK_TIMEOUT_S = 300      # per model on a rank: build, reference forward, shard, two sharded calls
COLLECTIVE_TIMEOUT_S = 120  # ShardConfig.timeout_s: a rank left waiting on a peer raises instead of hanging

# "Exact" is the test suite's tolerance; a larger error is reported as close (<= CLOSE_REL) or wrong.
EXACT_REL = 1e-5
CLOSE_REL = 1e-4


class Timeout(BaseException):
    """A model over its time limit (a BaseException, so that no ``except Exception`` in model code
    swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    def expire(signum, frame):
        raise Timeout(f"{what} took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def quiet() -> None:
    """One torch thread, and no warnings or transformers log lines in the scan's output."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging
    logging.set_verbosity_error()


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def error_record(e: BaseException) -> dict:
    """What a failure is reported with: the exception's type, the first line of its message (the
    full message, which for a CaptureError names the model's source line, is kept too), the last
    frame (usually in transformers for a build failure), the frames inside this repository (for an
    autotp crash), and the traceback's tail."""
    tb = traceback.extract_tb(e.__traceback__)
    text = str(e)
    return {
        "ok": False,
        "exc": type(e).__name__,
        "msg": (text.splitlines() or [""])[0][:400],
        "full_msg": text[:3000],
        "where": f"{tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno} {tb[-1].name}" if tb else "",
        "autotp_frames": [f"{Path(f.filename).relative_to(REPO)}:{f.lineno} {f.name}" for f in tb
                          if f.filename.startswith(str(REPO)) and not f.filename.startswith(str(HERE))][-4:],
        "tb": traceback.format_exc()[-4000:],
    }


def _timed(check, *args) -> dict:
    """``check(*args)``, any failure turned into an ``error_record``, with the seconds it took."""
    t = time.time()
    try:
        record = check(*args)
    except KeyboardInterrupt:
        raise
    except build.Skip as e:
        record = {"ok": False, "skip": str(e)}
    except BaseException as e:
        record = error_record(e)
    record["t"] = round(time.time() - t, 1)
    return record


def _build_and_run(name: str) -> dict:
    with time_limit(BUILD_TIMEOUT_S, "build + forward"):
        model = build.build(name)
        args, kwargs = build.inputs()
        with torch.no_grad():
            logits = logits_of(model(*args, **kwargs))
    return {"ok": True, "config": type(model.config).__name__,
            "params": sum(p.numel() for p in model.parameters()),
            "shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all())}


def build_check(name: str) -> dict:
    """Build the tiny model and run its unsharded forward once.  ``config`` records the config class
    actually used (a composite model's text sub-config shows here)."""
    return _timed(_build_and_run, name)


def _plan(name: str, world: int) -> dict:
    import autotp
    model = build.build(name)
    args, kwargs = build.inputs()
    with time_limit(PLAN_TIMEOUT_S, "autotp.plan"):
        plan = autotp.plan(model, world, example_inputs=args, example_kwargs=kwargs)
    params = list(plan.parameters.values())
    return {"ok": True, "counts": plan.counts("forward"), "counts_bwd": plan.counts("backward"),
            "sharded": sum(isinstance(p.placement, autotp.Shard) for p in params), "total": len(params),
            "replicated": dict(plan.replicated), "memory": plan.memory}


def plan_check(name: str, world: int) -> dict:
    """``autotp.plan`` of a freshly built model at ``world`` ranks, in this process."""
    return _timed(_plan, name, world)


def _shard_and_compare(name: str, world: int) -> dict:
    """Shard a fresh build (same seed on every rank, so the same weights) and compare the sharded
    logits with the unsharded model's.  The sharded model is called twice and the second call
    compared: the first call also runs the one-time input agreement."""
    import autotp
    model = build.build(name)
    args, kwargs = build.inputs()
    with torch.no_grad():
        ref = logits_of(model(*args, **kwargs))
    sharded = autotp.shard(model, world, example_inputs=args, example_kwargs=kwargs,
                           timeout_s=COLLECTIVE_TIMEOUT_S)
    with torch.no_grad():
        sharded(*args, **kwargs)
        out = logits_of(sharded(*args, **kwargs))
    if tuple(out.shape) != tuple(ref.shape):
        return {"ok": False, "exc": "ShapeMismatch",
                "msg": f"sharded {tuple(out.shape)} vs unsharded {tuple(ref.shape)}"}
    finite = torch.isfinite(ref)
    nan = float("nan")
    return {"ok": True,
            "max_err": float((out - ref).abs()[finite].max()) if finite.any() else nan,
            "ref_scale": float(ref[finite].abs().max()) if finite.any() else nan,
            "nonfinite_ref": int((~finite).sum()),
            "nonfinite_mismatch": int((torch.isfinite(out) != finite).sum())}


def _time_limited_compare(name: str, world: int) -> dict:
    with time_limit(RANK_TIMEOUT_S, "build + shard + compare"):
        return _shard_and_compare(name, world)


def rank_check(rank: int, world: int, names: list[str], log_dir: str) -> None:
    """Run on every rank (by ``run_ranks``): ``_shard_and_compare`` each of ``names`` in turn.

    One spawn of ranks checks many models, since each spawn pays seconds of imports per process.
    Each model's record is appended to ``log_dir/rank{rank}.jsonl`` as soon as it is known, and
    the ranks meet at a barrier before the next model, so if a rank dies the records of every model
    before it survive (``rank_results`` reads them) and the scan can go on after it.
    """
    import torch.distributed as dist
    quiet()
    path = os.path.join(log_dir, f"rank{rank}.jsonl")
    for name in names:
        record = _timed(_time_limited_compare, name, world)
        with open(path, "a") as f:
            f.write(json.dumps({"name": name, **record}) + "\n")
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S))


def rank_results(log_dir: str, world: int) -> list[list[dict]]:
    """The models every rank finished, in order: one list of per-rank records per model."""
    per_rank = []
    for rank in range(world):
        path = os.path.join(log_dir, f"rank{rank}.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            per_rank.append([json.loads(line) for line in f])
    return [list(records) for records in zip(*per_rank)]


def verdict(records: list[dict]) -> tuple[str, float | None]:
    """``(verdict, relative error)`` of one model's per-rank records: ``crash`` where any rank
    failed, else ``exact`` / ``close`` / ``wrong`` by the worst rank's max |err| / max(1, |ref|).
    An output that is non-finite where the unsharded one is finite (or the reverse) is wrong."""
    if not all(r["ok"] for r in records):
        return "crash", None
    rel = max(r["max_err"] / max(1.0, r["ref_scale"]) for r in records)
    if any(r["nonfinite_mismatch"] for r in records):
        return "wrong", rel
    if rel <= EXACT_REL:
        return "exact", rel
    if rel <= CLOSE_REL:
        return "close", rel
    return "wrong", rel  # also a NaN error (no finite reference value)
