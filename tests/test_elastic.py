"""Elastic resume: torchrun restarts the ranks after one of them dies, and they resume from the last checkpoint.

``examples/pretrain_gpt.py --fail-at-iteration 3`` makes rank 1 exit with status 1 right after
iteration 3, once (a marker file in ``--save`` keeps the restarted run from failing again).
Under ``torchrun --max-restarts 1`` with ``--load`` = ``--save`` (checkpoints every 2
iterations), torchrun restarts both ranks, they load iteration 2's checkpoint and train
iterations 3-5 again.  With no dropout, the same data order and the optimizer state in the
checkpoint, the losses are those of an uninterrupted run with the same arguments, to the
printed precision.

Rendezvous: ``--standalone`` (c10d on localhost, a free port) with
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``.  Without that variable, or with torchrun's default
static rendezvous, the rendezvous store outlives the first attempt and a restarted rank can
read the dead attempt's gloo addresses: on this machine about half of the restarts then fail
to connect or hang (pytorch/pytorch#135712).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "examples", "data", "corpus.jsonl")
ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?learning rate: (\S+) \|.*?lm loss: (\S+) \|")
RESUMED = re.compile(r"resumed from (\S+) at iteration (\d+) \((\d+) samples consumed\)")

ARGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1",
        "--train-iters", "5", "--log-interval", "1", "--eval-iters", "0",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--save-interval", "2"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error",
                TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stdlib"
    proc = subprocess.run([sys.executable, "examples/preprocess_data.py", "--input", CORPUS, "--output-prefix",
                           str(out), "--vocab-size", "512", "--append-eod"],
                          env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return f"{out}_text_document", f"{out}-vocab.json"


def _torchrun(corpus, ckpt, *extra):
    """Start ``pretrain_gpt.py`` on 2 ranks under an elastic torchrun; its output goes to ``ckpt``.log."""
    data, vocab = corpus
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--standalone", "examples/pretrain_gpt.py", "--data-path", data, "--vocab-file", vocab, *ARGS,
           "--save", str(ckpt), "--load", str(ckpt), *extra]
    log = f"{ckpt}.log"
    with open(log, "w") as f:  # a file, not a pipe: nothing blocks while the other run is awaited
        return cmd, log, subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                          start_new_session=True)


def _stop(run) -> None:
    """Kill a run still going: torchrun and its workers (its own process group)."""
    proc = run[2]
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _finish(run, timeout: float = 400) -> str:
    cmd, log, proc = run
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(run)
    text = open(log).read()
    assert proc.returncode == 0, f"{' '.join(cmd)} (exit status {proc.returncode})\n{text[-8000:]}"
    return text


def _iterations(log: str) -> list[tuple[int, str, str]]:
    """(iteration, learning rate, loss) of every logged iteration, in order, as printed."""
    return [(int(i), lr, loss) for i, lr, loss in ITER.findall(log)]


def test_killed_rank_restarts_and_resumes_exactly(corpus, tmp_path):
    # the two runs at once: together they take less time than one after the other (much of a run is
    # start-up and torchrun's restart, not computing)
    runs = [_torchrun(corpus, tmp_path / "whole"), _torchrun(corpus, tmp_path / "elastic", "--fail-at-iteration", "3")]
    try:
        whole, failed = [_finish(run) for run in runs]
    finally:
        for run in runs:
            _stop(run)

    ref = _iterations(whole)
    assert [i for i, _, _ in ref] == [1, 2, 3, 4, 5], whole
    assert "starting from scratch" in whole and not RESUMED.search(whole), whole

    # rank 1 died once, after iteration 3 ...
    assert " > --fail-at-iteration 3: rank 1 exits with status 1" in failed, failed
    assert os.path.exists(tmp_path / "elastic" / "failed_at_iteration_3")
    assert "starting from scratch" in failed, failed  # the first attempt
    # ... torchrun restarted the ranks, and they resumed from iteration 2's checkpoint
    resumed = RESUMED.findall(failed)
    assert resumed == [(str(tmp_path / "elastic" / "iter_0000002"), "2", "8")], failed
    before, after = failed.split(RESUMED.search(failed).group(0))
    assert [i for i, _, _ in _iterations(before)][:2] == [1, 2], failed
    rerun = _iterations(after)
    assert [i for i, _, _ in rerun] == [3, 4, 5], failed
    assert "training iterations 3 .. 5" in after, failed
    assert os.path.exists(tmp_path / "elastic" / "iter_0000004" / "autotp.json")

    # the resumed iterations are the uninterrupted run's, to the printed precision: the final loss too
    assert rerun == ref[2:], (rerun, ref)
    assert rerun[-1][2] == ref[-1][2]
