"""Coverage of every Hugging Face causal-LM architecture: exact? how much per rank? how many all-reduces?

Run from the repository root::

    OMP_NUM_THREADS=1 python bench/coverage.py                            # all, worlds 2 and 4 -> docs/
    OMP_NUM_THREADS=1 python bench/coverage.py --only gpt2,gptj --worlds 2 --out /tmp/cov

Builds every architecture of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` tiny from its config class
(``bench/hf_zoo/build.py``: width 64, 4 heads, 2 KV heads, FFN 128, vocab 128 -- larger than the
width -- and 2 layers; at world 4 the 2 KV heads are fewer than the ranks), plans it at each world
size in this process, shards it on gloo ranks (``hf_zoo/scan.rank_check_all``: this one command
launches them) and compares the logits with the unsharded model's.  Per architecture and world
size it records: exact (the test suite's 1e-5 relative), the parameter share per rank (bytes),
forward all-reduces per transformer layer against the optimum (1 for a parallel-residual block,
``x + attn(ln(x)) + mlp(ln(x))``; 2 for a sequential one), and the weight matrices left whole with
``plan.replicated``'s reason.  Writes ``OUT/coverage.md`` and ``OUT/coverage.json``.

Which blocks are parallel-residual is read from the config (``PARALLEL_*`` below) -- a yardstick of
this report only: autotp itself never reads names or configs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench" / "hf_zoo"), str(REPO / "tests")]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import build  # noqa: E402
import checks  # noqa: E402
import scan  # noqa: E402

# Config flags that make a block parallel-residual, and architectures whose blocks always are.
PARALLEL_FLAGS = ("use_parallel_residual", "parallel_attn", "parallel_residual", "parallel_block")
PARALLEL_TYPES = {"gptj", "codegen", "phi", "cohere", "cohere2", "falcon"}
SHARE_GOAL = 0.60


def parallel_residual(model) -> bool:
    cfg = model.config
    flags = [getattr(cfg, f) for f in PARALLEL_FLAGS if getattr(cfg, f, None) is not None]
    if flags:
        return bool(flags[0]) or (cfg.model_type == "falcon" and bool(getattr(cfg, "new_decoder_architecture", 0)))
    return cfg.model_type in PARALLEL_TYPES


def plan_record(name: str, world: int) -> dict:
    """Plan ``name`` at ``world`` in this process: share, all-reduces per layer, what stayed whole."""
    import autotp
    from autotp.config import resolve_config
    from autotp.patterns import block_of
    from autotp.pipeline import plan_model

    model = build.build(name)
    args, kwargs = build.inputs()
    with checks.time_limit(checks.PLAN_TIMEOUT_S, "plan"):
        gm, plan, _ = plan_model(model, world, resolve_config(None, {}), args, kwargs)
    nodes = {n.name: n for n in gm.graph.nodes}
    blocks = {b for n in gm.graph.nodes if (b := block_of(n)) is not None}
    fwd = [c for c in plan.collectives if c.phase == "forward" and c.op == "all_reduce" and c.kind is not None]
    in_blocks = sum(1 for c in fwd if block_of(nodes[c.at]) is not None)
    whole = {n: plan.replicated.get(n, "") for n, p in plan.parameters.items()
             if len(p.global_shape) >= 2 and not isinstance(p.placement, autotp.Shard)}
    return {"ok": True, "share": plan.memory["param_bytes_per_rank"] / max(1, plan.memory["param_bytes_total"]),
            "counts": plan.counts("forward"), "layers": len(blocks),
            "per_layer": in_blocks / len(blocks) if blocks else None,
            "optimum": 1 if parallel_residual(model) else 2, "whole": whole}


def run(names: list[str], worlds: list[int], out: Path, *, ranks: bool = True) -> dict:
    checks.quiet()
    started, ranks_on = time.time(), ranks
    built = {n: checks.build_check(n) for n in names}
    ok = [n for n in names if built[n]["ok"]]
    print(f"built {len(ok)} of {len(names)}", flush=True)
    per_world = {}
    for world in worlds:
        plans = {n: checks._timed(plan_record, n, world) for n in ok}
        todo = [n for n in ok if plans[n]["ok"]]
        print(f"world {world}: planned {len(todo)}; rank check", flush=True)
        ranks = scan.rank_check_all(todo, world, out / f"ranks_w{world}") if ranks_on else {}
        per_world[world] = {n: {**plans[n], "verdict": checks.verdict(ranks[n])[0] if n in ranks else "not run",
                                "rel_err": checks.verdict(ranks[n])[1] if n in ranks else None,
                                "rank_error": next((f"{r['exc']}: {r['msg']}" for r in ranks.get(n, []) if not r["ok"]),
                                                   None)}
                            for n in ok}
    meta = scan._meta(worlds[0], started)
    meta["command"] = " ".join(["python", "bench/coverage.py", *sys.argv[1:]])
    meta["worlds"] = worlds
    return {"meta": meta, "names": names,
            "build": {n: {k: v for k, v in r.items() if k != "tb"} for n, r in built.items()},
            "worlds": {str(w): {n: {k: v for k, v in r.items() if k not in ("tb", "full_msg")} for n, r in d.items()}
                       for w, d in per_world.items()}}


def stats(result: dict, world: int) -> dict:
    d = result["worlds"][str(world)]
    exact = [n for n, r in d.items() if r.get("verdict") == "exact"]
    par = [n for n, r in d.items() if r.get("ok") and r["optimum"] == 1]
    return {"tried": len(result["names"]), "built": sum(r["ok"] for r in result["build"].values()),
            "planned": sum(r["ok"] for r in d.values()), "exact": len(exact),
            f"exact, share <= {SHARE_GOAL:.0%}": sum(d[n]["share"] <= SHARE_GOAL for n in exact),
            "wrong": sum(r.get("verdict") in ("wrong", "close") for r in d.values()),
            "crash": sum(r.get("verdict") == "crash" for r in d.values()),
            "parallel-residual at 1 all-reduce/layer": f"{sum(d[n]['per_layer'] == 1 for n in par)} of {len(par)}"}


def _short(why: str) -> str:
    return why.split(" (at ")[0].split(";")[0][:70]


def render(result: dict) -> str:
    worlds = result["meta"]["worlds"]
    m = result["meta"]
    lines = ["# Coverage: every Hugging Face causal-LM architecture", "",
             f"Produced by `{m['command']}` at commit `{m['commit']}`{' (dirty)' if m['dirty'] else ''} "
             f"(torch {m['torch']}, transformers {m['transformers']}, {m['minutes']:.0f} min on this machine). "
             "See `bench/coverage.py` for what each column means.", ""]
    keys = list(stats(result, worlds[0]))
    lines += ["| world | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for w in worlds:
        s = stats(result, w)
        lines.append(f"| {w} | " + " | ".join(str(s[k]) for k in keys) + " |")
    lines += ["", "Per architecture (all-reduces per layer in the forward, against the optimum; whole: weight "
              f"matrices left replicated at world {worlds[0]}, with the first reason).", ""]
    head = "| architecture | " + " | ".join(f"w{w} exact | w{w} share" for w in worlds) + \
           " | all-reduces/layer (optimum) | whole | why |"
    lines += [head, "|---" * (3 + 2 * len(worlds) + 1) + "|"]
    for n in result["names"]:
        b = result["build"][n]
        if not b["ok"]:
            why = b.get("skip") or f"{b['exc']}: {b['msg'][:80]}"
            lines.append(f"| {n} | " + " | ".join("-" for _ in range(2 * len(worlds))) + f" | - | - | not built: {why} |")
            continue
        cells = []
        for w in worlds:
            r = result["worlds"][str(w)][n]
            if not r["ok"]:
                cells += [f"plan failed ({r['exc']})", "-"]
                continue
            v = r["verdict"] if r["verdict"] != "crash" else f"crash ({(r['rank_error'] or '')[:60]})"
            cells += [v, f"{r['share']:.0%}"]
        r = result["worlds"][str(worlds[0])][n]
        per = "-" if not r["ok"] or r["per_layer"] is None else f"{r['per_layer']:g} ({r['optimum']})"
        whole = r.get("whole") or {}
        why = _short(next(iter(whole.values()))) if whole else ""
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {per} | {len(whole)} | {why} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="2,4", help="comma-separated world sizes (default 2,4)")
    ap.add_argument("--only", default="", help="comma-separated architectures (model_type names)")
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="where coverage.md / .json go (default docs/)")
    ap.add_argument("--plan-only", action="store_true", help="plan only: no ranks, nothing checked for exactness")
    args = ap.parse_args()
    names = build.select(args.only, ap.error)
    args.out.mkdir(parents=True, exist_ok=True)
    ranks_dir = Path(tempfile.gettempdir()) / f"autotp_coverage_{os.getpid()}"  # per-rank logs
    result = run(names, [int(w) for w in args.worlds.split(",")], ranks_dir, ranks=not args.plan_only)
    (args.out / "coverage.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "coverage.md").write_text(render(result))
    for w in result["meta"]["worlds"]:
        print(f"world {w}: " + ", ".join(f"{k} {v}" for k, v in stats(result, w).items()))
    print(f"wrote {args.out / 'coverage.md'} and {args.out / 'coverage.json'}")


if __name__ == "__main__":
    main()
