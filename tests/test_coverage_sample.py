"""CI's sample of the coverage scan (``bench/coverage.py``): a fixed handful of architectures, world 2.

The full scan (every Hugging Face causal LM, worlds 2 and 4) takes tens of minutes and writes
``docs/coverage.md``; this runs the same tool end to end on one architecture per class the
coverage issue names and checks what the table would say: exact, at most 60 % of the parameters
per rank, and the forward all-reduces per layer at the optimum.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# parallel residual (GPT-NeoX), interleaved rotary (GPT-J), mixture of experts (Qwen3-MoE)
SAMPLE = ["gpt_neox", "gptj", "qwen3_moe"]


@pytest.fixture(scope="module")
def coverage(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("coverage")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "coverage.py"), "--only", ",".join(SAMPLE),
                           "--worlds", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "coverage.md").read_text().startswith("# Coverage")
    return json.loads((out / "coverage.json").read_text())["worlds"]["2"]


@pytest.mark.parametrize("arch", SAMPLE)
def test_sample(coverage, arch):
    r = coverage[arch]
    assert r["ok"] and r["verdict"] == "exact", r
    assert r["share"] <= 0.60, r
    assert r["per_layer"] == r["optimum"], r
