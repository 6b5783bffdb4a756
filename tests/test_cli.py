"""The ``autotp`` command line, run as a user runs it: a subprocess (``python -m autotp``, what the
``autotp`` console script calls).  ``plan`` from a preset, a checkpoint/config directory and a
``module:callable``; ``demo`` end to end on 2 CPU ranks; failures as one line, or a traceback
with ``--debug``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from autotp.report import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def autotp_cli(*args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return subprocess.run([sys.executable, "-m", "autotp", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def test_help_on_every_command(capsys):
    from autotp.cli import main

    for command, expected in (((), "plan a model on the meta device"), (("plan",), "--world-size"),
                              (("demo",), "--model")):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and expected in out and out.startswith("usage: autotp"), out


def _check_dump(out, world: int) -> dict:
    names = set(os.listdir(out))
    assert {"plan.json", "graph.dot", "plan.html"} <= names, names
    doc = json.loads((out / "plan.json").read_text())
    assert validate(doc) == [] and doc["world_size"] == world
    return doc


def test_plan_a_preset_on_meta(tmp_path):
    run = autotp_cli("plan", "llama-tiny", "--world-size", "2", "--batch", "2", "--seq-len", "16",
                     "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    doc = _check_dump(tmp_path / "out", 2)
    assert doc["example_inputs"][0]["shape"] == [2, 16]
    assert [b["name"] for b in doc["blocks"]] == ["model.layers.0", "model.layers.1"]  # the preset's 2 layers
    assert f"open {tmp_path / 'out' / 'plan.html'}" in run.stdout
    assert "planning for world_size=2" in run.stdout  # progress lines


def test_plan_a_config_directory_and_a_callable(tmp_path):
    import transformers

    transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=50, bos_token_id=49,
                            eos_token_id=49).save_pretrained(tmp_path / "ckpt")
    run = autotp_cli("plan", str(tmp_path / "ckpt"), "--world-size", "4", "--seq-len", "8",
                     "--out", str(tmp_path / "a"))
    assert run.returncode == 0, run.stderr
    doc = _check_dump(tmp_path / "a", 4)
    assert len(doc["blocks"]) == 3 and doc["parameters"]["transformer.h.0.mlp.c_fc.weight"]["local_shape"] == [32, 32]

    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def mlp():
            return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)), (torch.randn(4, 8),)
    """))
    run = autotp_cli("plan", "mymodels:mlp", "--world-size", "2", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    doc = _check_dump(tmp_path / "b", 2)
    assert doc["parameters"]["0.weight"]["placement"] == "S(0)" and doc["parameters"]["2.weight"]["placement"] == "S(1)"
    # column -> row: one all-reduce forward; none backward, as the input needs no gradient
    assert [(t["op"], t["phase"], t["count"]) for t in doc["collective_totals"]] == [("all_reduce", "forward", 1)]


@pytest.mark.parametrize("args, says", [
    (("plan", "no-such-model", "--world-size", "2", "--out", "x"), "is not a directory, a module:callable or a preset"),
    (("plan", "gpt2-tiny", "--world-size", "0", "--out", "x"), "--world-size must be at least 1"),
])
def test_a_failure_is_one_clear_line_and_a_traceback_with_debug(args, says, tmp_path):
    run = autotp_cli(*args, cwd=tmp_path)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotp: error: ") and says in lines[0], run.stderr
    run = autotp_cli(*args, "--debug", cwd=tmp_path)
    assert run.returncode != 0 and "Traceback (most recent call last)" in run.stderr and says in run.stderr


def test_demo(tmp_path):
    run = autotp_cli("demo", "--out", str(tmp_path / "demo"), timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "starting 2 CPU ranks" in run.stdout
    assert "(OK)" in run.stdout and "the same as the unsharded model's" in run.stdout
    doc = _check_dump(tmp_path / "demo", 2)
    assert [b["name"] for b in doc["blocks"]] == [f"transformer.h.{i}" for i in range(4)]  # gpt2-tiny: 4 layers
    assert f"open {tmp_path / 'demo' / 'plan.html'}" in run.stdout
