"""bench/harness.py on tiny presets: the one benchmark command must not rot.

Runs ``forward`` (every peer, the serial limit included), ``gather`` and ``sequence`` at world size 2, and ``kernels``,
through the command line a person types, and reads the JSON each writes: every peer ran, every sharded
peer's logits match the unsharded model's, the table names the command that made it.  No timing is
asserted (this is not a timed test)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _harness(tmp_path, *args):
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "bench/harness.py", *args, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "command: " in proc.stdout and "bench/harness.py " + args[0] in proc.stdout
    return json.loads(out.read_text()), proc.stdout


def test_forward_runs_every_peer_and_checks_logits(tmp_path):
    doc, text = _harness(tmp_path, "forward", "--preset", "llama-tiny", "--world-sizes", "2", "--batch", "2x16,1x8",
                         "--rounds", "2")
    rows = doc["results"]["2"]["rows"]
    assert set(rows) == {"2x16", "1x8"}
    for shape, peers in rows.items():
        by = {p["peer"]: p for p in peers}
        for name in ("unsharded", "autotp", "autotp-shm", "DTensor parallelize_module", 'HF tp_plan="auto"',
                     "serial limit"):
            assert name in by and by[name]["error"] is None and len(by[name]["times_ms"]) == 2, (shape, name, by.get(name))
        for name in ("autotp", "autotp-shm", "DTensor parallelize_module", 'HF tp_plan="auto"'):
            assert by[name]["max_abs_diff"] < 1e-4, (name, by[name]["max_abs_diff"])
            assert by[name]["param_mib"] < 0.75 * by["unsharded"]["param_mib"], name  # sharded, not a whole copy
    assert doc["results"]["2"]["forward_all_reduces"] == 5  # 2 per layer + the vocab-parallel embedding
    assert "autotp/HF" in text and "autotp/limit" in text


def test_gather_matches_all_gather_and_cat(tmp_path):
    doc, _ = _harness(tmp_path, "gather", "--world-sizes", "2", "--shapes", "2x8x33,1x4x64", "--rounds", "2")
    res = doc["results"]["2"]
    assert res["equal"] == {"2x8x33": True, "1x4x64": True}
    assert all(p["error"] is None and len(p["times_ms"]) == 2 for rows in res["rows"].values() for p in rows)


def test_sequence_runs_every_peer_on_one_loss(tmp_path):
    doc, text = _harness(tmp_path, "sequence", "--world-sizes", "2", "--small")
    peers = {p["peer"]: p for p in doc["results"]["2"]["peers"]}
    assert set(peers) == {"autotp TP", "autotp TP+SP", "autotp TP shm", "autotp TP+SP shm", "DTensor TP",
                          "DTensor TP+SP"}
    for name, p in peers.items():
        assert p["error"] is None and len(p["step_s"]) == 1 and p["activation_bytes"] > 0, (name, p)
        assert abs(p["loss"] - peers["autotp TP"]["loss"]) < 1e-4, (name, p["loss"])  # the same model and batch
    assert "reduce_scatter" in peers["autotp TP+SP"]["note"] and "activations autotp TP+SP / autotp TP" in text
    assert "step time autotp TP+SP shm / autotp TP shm" in text
    micro = doc["results"]["2"]["micro_ms"]
    assert set(micro) == {f"{t} {op}" for t in ("gloo", "shm") for op in ("all_reduce", "reduce_scatter", "all_gather")}
    assert all(v > 0 for v in micro.values()), micro


def test_kernels_runs_what_is_registered(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import kernel_micro as kernels
    finally:
        sys.path.remove(str(ROOT / "bench"))
    doc, text = _harness(tmp_path, "kernels", "--rounds", "2", "--small")
    res = doc["results"]["0"]
    assert res["registered"] == len(kernels.MICROBENCHMARKS)
    if not kernels.MICROBENCHMARKS:
        assert res["rows"] == [] and "no kernel micro-benchmarks to run" in text
    for row in res["rows"]:
        assert row["skip"] or (len(row["kernel_ms"]) == 2 and len(row["composite_ms"]) == 2)
        assert row["skip"] or row["max_abs_diff"] < 1e-4, row  # the kernel computed what its composite does
