"""WorkerPool: calls with collectives on spawned ranks, tensors over pipes, no hangs, no orphans."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from autotp.launch import WorkerError, WorkerPool

TESTS = os.path.dirname(os.path.abspath(__file__))


class State:
    """Each rank's state; its methods are what the tests ``call``."""

    def __init__(self, rank: int, world_size: int, group, payload):
        self.rank, self.world_size, self.group, self.payload = rank, world_size, group, payload
        self.sent = None

    def all_reduce(self):
        x = torch.tensor([self.rank + 1.0])
        dist.all_reduce(x, group=self.group)
        return x

    def rank_of(self):
        return self.rank

    def echo(self, x, *, scale=1.0, tag=""):
        self.sent = x * scale
        return {"x": self.sent, "tag": tag, "arg_shared": x.is_shared(), "payload": self.payload}

    def sent_is_shared(self):
        return self.sent.is_shared()

    def raise_on_rank1(self):
        if self.rank == 1:
            raise ValueError("bad shard on rank 1")
        self.all_reduce()  # rank 0 waits here for a peer that never comes

    def exit_on_rank1(self):
        if self.rank == 1:
            os._exit(3)
        self.all_reduce()

    def sleep(self, seconds):
        time.sleep(seconds)


def make_state(rank, world_size, group, payload):
    return State(rank, world_size, group, payload)


def failing_setup(rank, world_size, group, payload):
    if rank == 1:
        raise KeyError("no weights for rank 1")
    return State(rank, world_size, group, payload)


def _reaped(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting to be reaped by whoever adopted it (it runs nothing)."""
    if _reaped(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _assert_no_workers(pool: WorkerPool) -> None:
    assert not pool.alive
    assert all(_reaped(pid) for pid in pool.pids), "a worker process outlived its pool"


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2, make_state, payload={"name": "tiny"}, timeout_s=120) as p:
        yield p


def test_call_runs_collectives_and_returns_rank0_result(pool):
    assert pool.backend == "gloo" and pool.alive
    assert pool.call("all_reduce").item() == 3.0
    assert pool.call("rank_of") == 0
    assert pool.call("all_reduce").item() == 3.0  # the pool serves call after call


def test_kwargs_and_large_tensor_round_trip_without_shared_memory(pool):
    x = torch.randn(1024, 1024)  # 4 MB each way
    out = pool.call("echo", x, scale=2.0, tag="big")
    assert out["tag"] == "big" and out["payload"] == {"name": "tiny"}
    torch.testing.assert_close(out["x"], x * 2.0, rtol=0, atol=0)
    # torch's multiprocessing reducers (ForkingPickler, mp queues) move a sent tensor's storage into
    # /dev/shm on the sending side and hand the receiver a shared tensor; plain pickle copies bytes.
    assert not x.is_shared() and not out["arg_shared"] and not out["x"].is_shared()
    assert pool.call("sent_is_shared") is False


def test_world_size_4_context_manager_and_idempotent_close():
    with WorkerPool(4, make_state, timeout_s=120) as pool:
        assert pool.call("all_reduce").item() == 10.0
        assert pool.call("rank_of") == 0
        pids = pool.pids
        assert len(set(pids)) == 4 and all(not _reaped(pid) for pid in pids)
    _assert_no_workers(pool)
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="the pool is closed: close"):
        pool.call("rank_of")


def test_error_on_one_rank_while_another_is_in_a_collective():
    pool = WorkerPool(2, make_state, timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1: ValueError: bad shard on rank 1") as info:
        pool.call("raise_on_rank1")
    assert time.monotonic() - t0 < 20
    assert "Traceback" in str(info.value) and "raise_on_rank1" in str(info.value)
    _assert_no_workers(pool)
    with pytest.raises(RuntimeError, match="the pool is closed: call\\('raise_on_rank1'\\) failed"):
        pool.call("rank_of")


def test_worker_dying_hard_names_the_exit_code():
    pool = WorkerPool(2, make_state, timeout_s=60)
    with pytest.raises(WorkerError, match=r"rank 1 \(pid \d+\) exited with exit code 3"):
        pool.call("exit_on_rank1")
    _assert_no_workers(pool)


def test_timeout_stops_a_stuck_call():
    pool = WorkerPool(2, make_state, timeout_s=120)
    pool.timeout_s = 1.0
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"no reply from rank\(s\) \[0, 1\] within timeout_s=1"):
        pool.call("sleep", 60)
    assert time.monotonic() - t0 < 10
    _assert_no_workers(pool)


def test_setup_error_surfaces_from_the_constructor():
    created = []

    class RecordingPool(WorkerPool):
        def __init__(self, *args, **kwargs):
            created.append(self)
            super().__init__(*args, **kwargs)

    with pytest.raises(WorkerError, match=r"setup failed(.|\n)*rank 1: KeyError: 'no weights for rank 1'"):
        RecordingPool(2, failing_setup, timeout_s=60)
    assert len(created[0].pids) == 2
    _assert_no_workers(created[0])


def test_bad_arguments_fail_before_starting_anything():
    with pytest.raises(ValueError, match="nccl"):
        WorkerPool(torch.cuda.device_count() + 1, make_state, backend="nccl")
    with pytest.raises(TypeError, match="picklable"):
        WorkerPool(2, lambda *a: None)


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)"])
def test_workers_exit_with_their_parent(exit_call, tmp_path):
    """sys.exit: the atexit hook closes the pool gracefully (exit codes 0, where multiprocessing's own
    hook would terminate them: -15); os._exit skips every hook, so the workers notice by themselves."""
    script = textwrap.dedent(f"""
        import atexit, os, sys
        atexit.register(lambda: print("exitcodes", *[p.exitcode for p in pool._procs], flush=True))  # runs last
        sys.path.insert(0, {TESTS!r})
        from autotp.launch import WorkerPool
        from test_launch import make_state
        pool = WorkerPool(2, make_state, timeout_s=120)
        assert pool.call("rank_of") == 0
        print("pids", *pool.pids, flush=True)
        {exit_call}
    """)
    with open(tmp_path / "stderr", "w+") as err:
        # read lines, not to EOF: workers that outlive the parent would hold its stdout open
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            first = proc.stdout.readline().split()
            last = proc.stdout.readline().split() if exit_call == "sys.exit(0)" else None
            returncode = proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            err.seek(0)
            stderr = err.read()
    assert returncode == 0 and first[:1] == ["pids"] and len(first) == 3, stderr
    assert last in (None, ["exitcodes", "0", "0"]), (last, stderr)
    pids = [int(p) for p in first[1:]]
    deadline = time.monotonic() + 10
    while not all(_dead(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_dead(pid) for pid in pids), f"workers {pids} outlived their parent"
