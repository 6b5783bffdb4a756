"""The scan's results as markdown: counts, failures grouped by cause, coverage gaps, and one row per
architecture.  Reads only the ``results`` dict that ``scan.py`` writes to ``results.json``, so a
report can be regenerated from a stored run (``python bench/hf_zoo/report.py DIR``)."""
from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

import build
import checks

LITTLE_SHARDED = 0.2  # architectures sharding fewer than this fraction of their parameters are listed


def cause(record: dict) -> str:
    """A failure's cause with what differs between models of one cause taken out: the source
    location (``(at ...)``, shown per model instead), the passes that ran before a failing one,
    and the model class named in a capture error."""
    first_line = (record.get("full_msg") or record.get("msg") or "").split("\n")[0]
    text = re.sub(r" \(at [^\n]*\)\s*$", "", first_line)
    text = re.sub(r" \(after \[[^\]]*\]\)", "", text)
    text = re.sub(r"\b[A-Z]\w*For[A-Z]\w*", "<model>", text)
    return f"{record['exc']}: {text[:300]}"


def location(record: dict) -> str:
    """Where a failure happened: the model source line a capture error names, else the deepest
    frame inside this repository, else the last frame."""
    first_line = (record.get("full_msg") or "").split("\n")[0]
    m = re.search(r"\(at (?:\S*site-packages/)?(\S+?:\d+): (.*)\)\s*$", first_line)
    if m:
        return f"`{m.group(1)}`: `{m.group(2).strip()}`"
    frames = record.get("autotp_frames") or []
    where = frames[-1] if frames else record.get("where", "")
    return f"`{where}`" if where else ""


def gap(reason: str) -> str:
    """A ``plan.replicated`` reason without its location and split sizes, to count across models."""
    reason = re.sub(r" \(at [^)]*\)", "", reason)
    return re.sub(r"\[[\d, ]+\]", "[...]", reason)


def summarize(results: dict) -> dict:
    """Counts, failure groups and per-architecture verdicts of a run."""
    stats = collections.Counter()
    groups = collections.defaultdict(list)  # (step, cause) -> [(name, record)]
    verdicts, max_rel = {}, 0.0
    for name in results["names"]:
        stats["tried"] += 1
        b = results["build"][name]
        if not b["ok"]:
            stats["skipped" if "skip" in b else "build failed"] += 1
            if "skip" not in b:
                groups[("build", cause(b))].append((name, b))
            continue
        stats["built"] += 1
        p = results["plan"][name]
        if not p["ok"]:
            stats["plan failed"] += 1
            groups[("plan", cause(p))].append((name, p))
            continue
        stats["planned"] += 1
        records = results["ranks"].get(name)
        if not records:
            stats["not run"] += 1
            continue
        verdict, rel = checks.verdict(records)
        verdicts[name] = (verdict, rel)
        stats[verdict] += 1
        if verdict == "crash":
            failed = next(r for r in records if not r["ok"])
            groups[("shard", cause(failed))].append((name, failed))
        else:
            max_rel = max(max_rel, rel)
            if verdict == "wrong":
                groups[("wrong", "")].append((name, {"rel": rel}))
    return {"stats": stats, "groups": groups, "verdicts": verdicts, "max_rel": max_rel}


def _counts_table(stats: collections.Counter, world: int) -> list[str]:
    cols = [("tried", stats["tried"]), ("skipped", stats["skipped"]), ("build failed", stats["build failed"]),
            ("built", stats["built"]), ("plan ok", stats["planned"]), ("plan failed", stats["plan failed"]),
            (f"exact at world {world}", f"**{stats['exact']}**"), ("close (≤1e-4 rel)", stats["close"]),
            ("wrong answers", f"**{stats['wrong']}**"), ("crashes (at `shard`)", f"**{stats['crash']}**")]
    if stats["not run"]:
        cols.append(("not run", stats["not run"]))
    return ["| " + " | ".join(c for c, _ in cols) + " |",
            "|" + "---|" * len(cols),
            "| " + " | ".join(str(v) for _, v in cols) + " |"]


def _failure_groups(groups: dict) -> list[str]:
    titles = {"build": "Build failed (the tiny config, not autotp)", "plan": "`autotp.plan` failed",
              "shard": "Crash at `autotp.shard` or the sharded call", "wrong": "WRONG ANSWER"}
    lines = []
    for (step, why), members in sorted(groups.items(), key=lambda kv: (list(titles).index(kv[0][0]), -len(kv[1]))):
        lines.append(f"* **{titles[step]}** ({len(members)}): `{why}`" if why else
                     f"* **{titles[step]}** ({len(members)})")
        for name, record in members:
            detail = f"max rel err {record['rel']:.1e}" if step == "wrong" else location(record)
            lines.append(f"  * `{name}`" + (f": {detail}" if detail else ""))
    return lines or ["None."]


def _row(name: str, results: dict, verdicts: dict) -> list[str]:
    b, p = results["build"][name], results["plan"].get(name)
    notes = []
    if name in build.TEXT_ONLY_MULTIMODAL:
        notes.append("multimodal class, run text-only (input_ids)")
    if b.get("config") and b["config"] != build.CONFIG_MAPPING_NAMES[name]:
        notes.append(f"built from its sub-config {b['config']}")
    row = [name, build.class_name(name)]
    if not b["ok"]:
        return row + ["no", "", "", "", "", (f"skipped: {b['skip']}" if "skip" in b else cause(b))]
    if not p["ok"]:
        return row + ["yes", "no", "", "", "", " · ".join(notes + [cause(p)])]
    c = p["counts"]
    coll = f"{c.get('all_reduce', 0)} / {c.get('all_gather', 0)}"
    others = {k: v for k, v in c.items() if k not in ("all_reduce", "all_gather")}
    if others:
        coll += f" (+{others})"
    verdict, _ = verdicts.get(name, ("not run", None))
    if verdict == "not run":
        err = "not run"
    elif verdict == "crash":
        failed = next(r for r in results["ranks"][name] if not r["ok"])
        err = "crash"
        notes.append(f"shard: {cause(failed)}")
    else:
        err = f"{max(r['max_err'] for r in results['ranks'][name]):.1e}"
        err += {"close": " (≤1e-4 rel)", "wrong": " **WRONG**"}.get(verdict, "")
    if p["replicated"]:
        left = collections.Counter(re.sub(r" \(at [^)]*\)", "", w) for w in p["replicated"].values())
        notes.append("left whole: " + "; ".join(f"{w} ×{n}" if n > 1 else w for w, n in left.most_common()))
    return row + ["yes", "yes", coll, f"{p['sharded']} / {p['total']}", err, " · ".join(notes)]


def render(results: dict) -> str:
    meta, world = results["meta"], results["meta"]["world"]
    s = summarize(results)
    stats, planned = s["stats"], [n for n in results["names"] if results["plan"].get(n, {}).get("ok")]
    dirty = " with uncommitted changes in autotp/ or passes/" if meta["dirty"] else ""
    lines = [
        f"# Hugging Face causal-LM scan of autotp (world size {world}, CPU, gloo)",
        "",
        f"autotp at commit `{meta['commit']}`{dirty}, "
        f"torch {meta['torch']}, transformers {meta['transformers']}; {meta['date']}, {meta['minutes']:.1f} min. "
        f"Command: `{meta['command']}`.",
        "",
        "Every model: tiny config (`bench/hf_zoo/build.py`), random weights (seed 0), `eval()`, called on ids (2, 8) "
        "with `use_cache=False`. Plan: `autotp.plan` in one process. "
        f"World {world}: `autotp.shard` on {world} gloo ranks, the second call's logits against the unsharded model's; "
        f"exact means max |err| ≤ {checks.EXACT_REL:g} · max(1, max |ref|) on every rank "
        "(the test suite's tolerance).",
        "",
        "## Counts",
        "",
        *_counts_table(stats, world),
        "",
        f"Largest relative error over the models that ran on {world} ranks: {s['max_rel']:.1e}.",
        "",
        "## Failures, grouped by cause",
        "",
        *_failure_groups(s["groups"]),
        "",
    ]
    skipped = [(n, results["build"][n]["skip"]) for n in results["names"] if "skip" in results["build"][n]]
    if skipped:
        lines += ["## Not built (`SKIP` in build.py)", ""] + [f"* `{n}`: {why}" for n, why in skipped] + [""]

    gaps = collections.Counter(reason for n in planned
                               for reason in {gap(w) for w in results["plan"][n]["replicated"].values()})
    little = [f"`{n}` ({results['plan'][n]['sharded']}/{results['plan'][n]['total']})" for n in planned
              if results["plan"][n]["sharded"] < LITTLE_SHARDED * results["plan"][n]["total"]]
    lines += ["## Coverage gaps", "",
              "Reasons in `plan.replicated`, by the number of architectures in which each left at least one "
              "parameter whole:", ""]
    lines += [f"* {n} × {w}" for w, n in gaps.most_common()] or ["* none"]
    lines += ["", f"Architectures sharding fewer than {LITTLE_SHARDED:.0%} of their parameters: "
              + (", ".join(little) or "none") + ".", ""]

    lines += ["## Per-architecture table", "",
              "Collectives from `plan.counts(\"forward\")`; sharded params: `isinstance(placement, autotp.Shard)` over "
              "`plan.parameters`; error: the larger of the ranks' max |err|; \"left whole:\" summarises "
              "`plan.replicated` (reason ×number of parameters).", "",
              f"| architecture | class | built? | plan ok? | fwd all-reduce / all-gather | sharded params / total "
              f"| max abs err, world {world} | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for name in results["names"]:
        cells = _row(name, results, s["verdicts"])
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "out")
    (out / "report.md").write_text(render(json.loads((out / "results.json").read_text())))
    print(out / "report.md")
