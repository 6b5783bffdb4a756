"""Run ``world_size`` torch.distributed ranks as worker processes of one ordinary Python process.

This is the machinery behind notebook use: ``WorkerPool(world_size, setup, payload)``
spawns one process per rank; each joins a process group (gloo, or nccl with one GPU
per rank), builds its state with ``setup(rank, world_size, group, payload)`` and then
serves ``pool.call(method, *args, **kwargs)``: every rank runs
``getattr(state, method)(*args, **kwargs)`` (so methods may run collectives) and rank
0's result is returned.

No shared memory.  Each worker has one ``multiprocessing.Pipe`` to the parent, and
every message is bytes made by the standard ``pickle`` module.  torch.multiprocessing
queues and multiprocessing's ``ForkingPickler`` are avoided on purpose: torch registers
reducers there that move each tensor's storage into ``/dev/shm``, whose small docker
default makes shm-based launchers die with bus errors or hang.  Plain pickle copies a
tensor's bytes into the message instead (``setup`` itself is pickled by reference).

No hangs.  The parent waits for replies on the pipes *and* the process sentinels, in
short slices, until ``timeout_s``.  A rank that raises (its peers may then block in a
collective it never enters), dies (segfault, out-of-memory kill, ``os._exit``) or does
not answer in time makes the parent kill every worker and raise ``WorkerError`` naming
the rank.  Workers leave when the parent does: an idle worker reads EOF from its pipe,
a busy one is stopped by a watchdog thread that sees its parent process id change.
Live pools are closed at interpreter exit (``atexit``) and when garbage collected.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

__all__ = ["WorkerPool", "WorkerError"]

_POLL_S = 0.2     # longest single wait between checks of the deadline
_SETTLE_S = 0.5   # after a first failure, how long to collect the other ranks' errors
_GRACE_S = 5.0    # how long close() lets workers exit on their own before killing them


class WorkerError(RuntimeError):
    """A worker raised, died or did not answer in time; the pool has been shut down."""


def _dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _exit_parent_gone(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _worker(rank: int, world_size: int, conn, init_method: str, backend: str, env: dict, parent_pid: int) -> None:
    """One rank: serve ("setup", fn, payload), ("call", method, args, kwargs) and ("close",) messages."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the parent's to handle
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    threading.Thread(target=_exit_parent_gone, args=(parent_pid,), daemon=True).start()
    state = None
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            os._exit(1)
        try:
            message = pickle.loads(data)
            if message[0] == "close":
                break
            if message[0] == "setup":
                if backend == "nccl":
                    torch.cuda.set_device(rank)
                dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
                state = message[1](rank, world_size, dist.group.WORLD, message[2])
                result = None
            else:
                _, method, args, kwargs = message
                result = getattr(state, method)(*args, **kwargs)
            reply = _dumps(("ok", result if rank == 0 else None))
        except BaseException as e:  # reported to the parent, which shuts the pool down
            reply = _dumps(("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        try:
            conn.send_bytes(reply)
        except OSError:
            os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
    conn.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "closed its pipe but is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code}; -9 is often the out-of-memory killer)"
    return f"exited with exit code {code}"


_live_pools: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_live_pools):
        pool.close()


class WorkerPool:
    """``world_size`` spawned ranks, each holding the state built by ``setup``.

    Args:
        world_size: number of ranks (processes).
        setup: module-level function ``setup(rank, world_size, group, payload) -> state``,
            run in every worker after the default process group is initialized.
        payload: any object picklable with ``pickle``; sent to every worker.
        backend: "gloo" or "nccl"; by default nccl when there is one GPU per rank
            (rank r then uses ``cuda:r``), else gloo.
        timeout_s: longest wait for the workers to start, and for each ``call``.
        env: environment variables set in each worker (default ``OMP_NUM_THREADS=1``).

    Attributes:
        world_size / backend: as resolved above.
        timeout_s: may be changed between calls.

    Not thread-safe: make one ``call`` at a time.

    Raises:
        ValueError: bad ``world_size`` / ``timeout_s``, or nccl without enough GPUs.
        TypeError: ``setup`` or ``payload`` cannot be pickled for the workers.
        WorkerError: a worker failed while starting (e.g. ``setup`` raised).
    """

    def __init__(self, world_size: int, setup, payload=None, *, backend: str | None = None,
                 timeout_s: float = 600.0, env: dict | None = None):
        self._procs: list = []
        self._conns: list = []
        self._closed = True
        self._closed_reason = "it failed to start"
        self._tmp = None
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if backend is None:
            backend = "nccl" if gpus >= world_size else "gloo"
        elif backend == "nccl" and gpus < world_size:
            raise ValueError(f"backend='nccl' needs one GPU per rank, but world_size={world_size} and {gpus} CUDA "
                             f"device(s) are visible; use backend='gloo' or a smaller world_size")
        main = sys.modules.get("__main__")
        if getattr(setup, "__module__", None) == "__main__" and not hasattr(main, "__file__"):
            raise TypeError(f"setup={getattr(setup, '__name__', setup)!r} is defined in an interactive session, which "
                            "spawned workers cannot import; define it in a module (a .py file) and import it")
        try:
            setup_message = _dumps(("setup", setup, payload))
        except Exception as e:
            raise TypeError(f"setup and payload must be picklable with the standard pickle module (setup as a "
                            f"module-level function): {type(e).__name__}: {e}") from e
        self.world_size, self.backend, self.timeout_s = world_size, backend, float(timeout_s)
        self._tmp = tempfile.TemporaryDirectory(prefix="autotp-launch-", ignore_cleanup_errors=True)
        init_method = "file://" + os.path.join(self._tmp.name, "init")
        worker_env = {"OMP_NUM_THREADS": "1", **(env or {})}
        ctx = multiprocessing.get_context("spawn")
        self._closed = False
        _live_pools.add(self)
        try:
            for rank in range(world_size):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(target=_worker, name=f"autotp-rank{rank}", daemon=True,
                                   args=(rank, world_size, child_end, init_method, backend, worker_env, os.getpid()))
                proc.start()
                child_end.close()  # so that a dead worker shows as EOF / a broken pipe here
                self._procs.append(proc)
                self._conns.append(parent_end)
            self._broadcast(setup_message)
            self._collect("setup")
        except BaseException:
            self._shutdown("it failed to start", grace_s=0.0)
            raise

    @property
    def alive(self) -> bool:
        """Whether the pool is open and every worker process is running."""
        return not self._closed and all(p.is_alive() for p in self._procs)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers, in rank order."""
        return [p.pid for p in self._procs]

    def call(self, method: str, *args, **kwargs):
        """Run ``getattr(state, method)(*args, **kwargs)`` on every rank and return rank 0's result.

        Returns:
            Rank 0's return value (other ranks' values are discarded, not sent).

        Raises:
            RuntimeError: the pool is closed, or rank 0's result cannot be unpickled here.
            TypeError: the arguments cannot be pickled.
            WorkerError: a rank raised, died or did not answer within ``timeout_s``; the pool is then closed.
        """
        if self._closed:
            raise RuntimeError(f"the pool is closed: {self._closed_reason}; create a new WorkerPool")
        try:
            message = _dumps(("call", method, args, kwargs))
        except Exception as e:
            raise TypeError(f"the arguments of call({method!r}) must be picklable with the standard pickle module: "
                            f"{type(e).__name__}: {e}") from e
        what = f"call({method!r})"
        try:
            self._broadcast(message)
            result, load_error = self._collect(what)
        except WorkerError:
            raise
        except BaseException:  # e.g. KeyboardInterrupt: the ranks are left mid-call, out of step
            self._shutdown(f"{what} was interrupted", grace_s=0.0)
            raise
        if load_error is not None:
            raise RuntimeError(f"rank 0's result of {what} cannot be unpickled in this process "
                               f"({type(load_error).__name__}: {load_error}); return tensors or plain Python "
                               "objects whose classes this process can import") from load_error
        return result

    def close(self) -> None:
        """Ask every worker to leave the process group and exit; kill those still running after a grace
        period. Calling it again does nothing."""
        if self._closed:
            return
        for conn in self._conns:
            try:
                conn.send_bytes(_dumps(("close",)))
            except OSError:
                pass
        self._shutdown("close() was called", grace_s=_GRACE_S)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"WorkerPool(world_size={getattr(self, 'world_size', '?')}, alive={self.alive})"

    def _broadcast(self, data: bytes) -> None:
        for conn in self._conns:
            try:
                conn.send_bytes(data)
            except OSError:
                pass  # that worker is dead: _collect reports it

    def _collect(self, what: str):
        """Wait for every rank's reply; return (rank 0's result, its unpickling error or None)."""
        deadline = time.monotonic() + self.timeout_s
        pending, errors, lost = set(range(self.world_size)), [], set()
        result, load_error, settle_until = None, None, None
        while True:
            for r in sorted(pending):
                if not self._conns[r].poll():
                    continue
                pending.discard(r)
                try:
                    data = self._conns[r].recv_bytes()
                except (EOFError, OSError):  # it died; reap it to learn the exit code
                    self._procs[r].join(1.0)
                    lost.add(r)
                    continue
                try:
                    status, value = pickle.loads(data)
                except Exception as e:  # error replies are strings, so this is rank 0's result
                    load_error = e
                    continue
                if status == "error":
                    errors.append(value)
                elif r == 0:
                    result = value
            dead = [r for r, p in enumerate(self._procs) if p.exitcode is not None or r in lost]
            now = time.monotonic()
            if (errors or dead) and settle_until is None:
                settle_until = now + _SETTLE_S
            if settle_until is None and not pending:
                return result, load_error
            if settle_until is not None and (now >= settle_until or not pending):
                lines = [f"rank {r} (pid {self._procs[r].pid}) {_exit_text(self._procs[r].exitcode)}; its output, "
                         "if any, went to this process's stderr (under Jupyter: the server's terminal)" for r in dead]
                self._fail(what, lines + errors, "fix the cause and create a new pool")
            if settle_until is None and now >= deadline:
                self._fail(what, [f"no reply from rank(s) {sorted(pending)} within timeout_s={self.timeout_s:g}"],
                           "a rank may be waiting in a collective that another rank never entered (every rank must "
                           "run the same collectives in the same order); if the work is just slow, pass a larger "
                           "timeout_s")
            sentinels = [p.sentinel for p in self._procs if p.exitcode is None] if settle_until is None else []
            wait([self._conns[r] for r in pending] + sentinels, timeout=min(_POLL_S, max(0.0, deadline - now)))

    def _fail(self, what: str, problems: list[str], advice: str) -> None:
        self._shutdown(f"{what} failed (see the WorkerError it raised)", grace_s=0.0)
        raise WorkerError(f"{what} failed; the worker pool has been shut down.\n" + "\n".join(problems)
                          + f"\nWhat to do: {advice}.")

    def _shutdown(self, reason: str, grace_s: float) -> None:
        """Join the workers for up to ``grace_s``, then terminate, then kill; release the pipes and files."""
        self._closed, self._closed_reason = True, reason
        end = time.monotonic() + grace_s
        for p in self._procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for conn in self._conns:
            conn.close()
        if self._tmp is not None:
            self._tmp.cleanup()
        _live_pools.discard(self)
