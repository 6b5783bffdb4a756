"""Scan every Hugging Face causal-LM architecture with autotp: build, plan, and shard on real ranks.

Run from anywhere::

    OMP_NUM_THREADS=1 python bench/hf_zoo/scan.py                       # all of them, world 2
    OMP_NUM_THREADS=1 python bench/hf_zoo/scan.py --only gpt2,llama     # some
    python bench/hf_zoo/scan.py --world 4 --out /some/dir

For each architecture in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (or ``--only``):

1. build check: the tiny random-weight model (``build.py``) builds and its forward runs;
2. plan check: ``autotp.plan(model, world)`` in this process;
3. rank check: every model whose plan succeeded is sharded on ``--world`` gloo ranks
   (``tests/distributed.run_ranks``), and its logits compared with the unsharded model's.

Writes to ``--out`` (default ``bench/hf_zoo/out/``, git-ignored): ``results.json`` (every record),
``report.md`` (``report.py``), and ``ranks/<spawn>/rank<r>.jsonl`` (the rank check's records as
they come: ``tail -f`` them to follow a long run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# This checkout's autotp, and the test suite's rank launcher.
sys.path.insert(1, str(REPO))
sys.path.insert(2, str(REPO / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import build  # noqa: E402
import checks  # noqa: E402
import report  # noqa: E402

MODELS_PER_SPAWN = 31  # one spawn of ranks checks this many models: imports cost seconds per spawn,
                       # and a rank that dies loses at most the rest of its spawn's list (rerun after it)


def rank_check_all(names: list[str], world: int, out: Path) -> dict[str, list[dict]]:
    """The rank check of ``names``, ``MODELS_PER_SPAWN`` per spawn of ``world`` ranks.

    When a spawn fails (a rank died, or raised outside a model's check), the models every rank
    finished keep their records, the model it was on is recorded as a crash of every rank with the
    launcher's error, and the scan goes on with the next one.
    """
    from distributed import run_ranks

    results, queue, spawn = {}, list(names), 0
    while queue:
        group, log_dir = queue[:MODELS_PER_SPAWN], out / "ranks" / f"{spawn:03d}"
        log_dir.mkdir(parents=True)
        error = None
        try:
            run_ranks(checks.rank_check, world, group, str(log_dir))
        except RuntimeError as e:
            error = e
        done = checks.rank_results(str(log_dir), world)
        for name, records in zip(group, done):
            results[name] = records
            print(f"  {name}: {_describe(records)}", flush=True)
        queue = queue[len(done):]
        if error is not None and len(done) < len(group):
            name = queue.pop(0)
            msg = (str(error).splitlines() or [""])[0][:400]
            results[name] = [{"ok": False, "exc": "RankDied", "msg": msg, "full_msg": str(error)[:3000]}] * world
            print(f"  {name}: rank died: {msg}", flush=True)
        spawn += 1
    return results


def _describe(records: list[dict]) -> str:
    verdict, rel = checks.verdict(records)
    if verdict == "crash":
        failed = next(r for r in records if not r["ok"])
        return f"crash: {failed['exc']}: {failed['msg'][:160]}"
    return f"{verdict} (max rel err {rel:.1e})"


def _meta(world: int, started: float) -> dict:
    import torch
    import transformers

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"world": world, "commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--", "autotp", "passes")),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "minutes": (time.time() - started) / 60,
            "command": " ".join(["python", "bench/hf_zoo/scan.py", *sys.argv[1:]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2, help="ranks to plan for and shard on (default 2)")
    ap.add_argument("--only", default="", help="comma-separated architectures (model_type names, e.g. gpt2,llama)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output directory (default bench/hf_zoo/out)")
    args = ap.parse_args()

    names = build.select(args.only, ap.error)
    # A fresh output directory: a report never mixes records of two runs.
    shutil.rmtree(args.out / "ranks", ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    checks.quiet()
    started = time.time()

    print(f"build check: {len(names)} architectures", flush=True)
    built = {}
    for name in names:
        built[name] = r = checks.build_check(name)
        if r["ok"]:
            print(f"  {name}: built", flush=True)
        elif "skip" in r:
            print(f"  {name}: skipped: {r['skip']}", flush=True)
        else:
            print(f"  {name}: FAILED: {r['exc']}: {r['msg'][:160]}", flush=True)

    todo = [n for n in names if built[n]["ok"]]
    print(f"plan check: {len(todo)} architectures, world {args.world}", flush=True)
    planned = {}
    for name in todo:
        planned[name] = r = checks.plan_check(name, args.world)
        print(f"  {name}: " + (f"planned, forward collectives {r['counts']}, {r['sharded']}/{r['total']} "
                               f"parameters sharded" if r["ok"] else f"FAILED: {r['exc']}: {r['msg'][:160]}"),
              flush=True)

    todo = [n for n in todo if planned[n]["ok"]]
    print(f"rank check: {len(todo)} architectures on {args.world} ranks", flush=True)
    ranks = rank_check_all(todo, args.world, args.out)

    results = {"meta": _meta(args.world, started), "names": names,
               "build": built, "plan": planned, "ranks": ranks}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "report.md").write_text(report.render(results))
    stats = report.summarize(results)["stats"]
    print(", ".join(f"{k} {stats[k]}" for k in ("tried", "skipped", "build failed", "built", "planned",
                                                 "plan failed", "exact", "close", "wrong", "crash", "not run")))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
