"""Run a function on several real processes joined in a torch.distributed process group.

    results = run_ranks(4, my_fn, arg1, arg2)   # my_fn(rank, world_size, arg1, arg2) on each rank

``my_fn`` must be a module-level function (processes are spawned, so it is imported by name). Each rank's
return value comes back in rank order; an exception on any rank fails the call with that rank's traceback.
Every run has a deadline: a hang kills all ranks and fails instead of stalling the suite.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import time
import tempfile
import traceback
from datetime import timedelta

_CTX = mp.get_context("spawn")


def _worker(rank, world_size, init_file, backend, pg_timeout_s, env, fn, args, queue):
    try:
        os.environ.update(env)
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # several ranks share two cores
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001  (report everything, including SystemExit)
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(world_size, fn, *args, timeout=180.0, backend="gloo", pg_timeout_s=60.0, env=None,
              allow_missing=()):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the results by rank.

    Args:
        timeout: seconds for the whole run; past it every rank is killed and TimeoutError raised.
        pg_timeout_s: the process group's own timeout.
        env: extra environment variables for the ranks.
        allow_missing: ranks allowed to die without reporting (fault-injection tests); their result is None.
    """
    fd, init_file = tempfile.mkstemp(prefix="pc_rdzv_")
    os.close(fd)
    os.unlink(init_file)  # the file store wants to create it
    queue = _CTX.Queue()
    procs = [
        _CTX.Process(target=_worker,
                     args=(r, world_size, init_file, backend, pg_timeout_s, dict(env or {}), fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, failures = {}, {}
    deadline = time.monotonic() + timeout
    dead_since = {}  # rank -> when its process was first seen dead without having reported
    pending = set(range(world_size))
    try:
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"run_ranks: ranks {sorted(pending)} did not finish within {timeout} s")
            try:
                rank, ok, payload = queue.get(timeout=0.5)
            except queue_mod.Empty:
                now = time.monotonic()
                for r in sorted(pending):
                    if procs[r].is_alive():
                        continue
                    # A result can still be in the pipe just after exit: give it a moment before judging.
                    if now - dead_since.setdefault(r, now) < 2.0:
                        continue
                    pending.discard(r)
                    if r not in allow_missing:
                        failures[r] = f"rank {r} died without reporting (exit code {procs[r].exitcode})"
                continue
            pending.discard(rank)
            (results if ok else failures)[rank] = payload
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        try:
            os.unlink(init_file)
        except FileNotFoundError:
            pass
    if failures:
        report = "\n".join(f"rank {r} of {world_size} failed:\n{failures[r]}" for r in sorted(failures))
        raise AssertionError(report)
    return [results.get(r) for r in range(world_size)]


def sigkill_after(seconds: float, stamp_file: str) -> None:
    """In a rank: SIGKILL this process ``seconds`` from now (a timer thread), first writing the time.time() of
    the kill to ``stamp_file``, so the test can measure how soon the survivors noticed. Pair with
    ``run_ranks(..., allow_missing=(this rank,))``."""
    import signal
    import threading

    def kill():
        with open(stamp_file, "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Timer(seconds, kill).start()
