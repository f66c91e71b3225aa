"""The shared-memory CPU transport (csrc/shm/, paracomm/_shm.py) on real processes (tests/dist_utils.run_ranks).

Each spawn costs seconds, so every test batches its cases into one run and checks them inside the ranks; what
must agree across ranks comes back as digests.
"""
import glob
import hashlib
import itertools
import os
import re
import stat
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks, sigkill_after

ALGOS = ("ring", "direct", "one_shot")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _digest(t):
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _data(rank, numel, dtype, salt=0):
    g = torch.Generator().manual_seed(7919 * (rank + 1) + 31 * numel + salt)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-(1 << 20), 1 << 20, (numel,), generator=g).to(dtype)


def _segment_path(name):
    return "/dev/shm" + name


def _comm_pair(world_size):
    """A shm Communicator and a gloo one over the same ranks (PARACOMM_CPU_TRANSPORT is read at creation)."""
    import paracomm
    from paracomm import _shm

    os.environ["PARACOMM_CPU_TRANSPORT"] = "shm"
    shm = paracomm.Communicator(timeout=timedelta(seconds=60))
    assert _shm.transport_of(shm) == ("shm" if world_size > 1 else "none (world size 1)")
    os.environ["PARACOMM_CPU_TRANSPORT"] = "gloo"
    gloo = paracomm.Communicator(timeout=timedelta(seconds=60))
    assert _shm.transport_of(gloo) == ("gloo" if world_size > 1 else "none (world size 1)")
    os.environ["PARACOMM_CPU_TRANSPORT"] = "auto"
    return shm, gloo


# ------------------------------------------------------------------------------------------------------------
# Every algorithm x N = 1..8: float64 reference, the gloo path's bits, bitwise identical on every rank
# ------------------------------------------------------------------------------------------------------------


def _matrix(rank, world_size):
    shm, gloo = _comm_pair(world_size)
    n = world_size
    digests = {}
    if n > 1:
        # Unlinked as soon as every rank mapped it: nothing of this job is visible in /dev/shm while it runs.
        assert not os.path.exists(_segment_path(shm._cpu.name))
    for algo in ALGOS:
        for numel in (0, 1, 37, 1000, 10_007, 300_001):
            for dtype in DTYPES if numel <= 10_007 else (torch.float32, torch.int64):
                x = _data(rank, numel, dtype)
                exact = sum(_data(r, numel, dtype).double() for r in range(n))
                for op in ("sum", "avg") if dtype.is_floating_point else ("sum",):
                    ref = exact / n if op == "avg" else exact
                    y, z = x.clone(), x.clone()
                    shm.all_reduce(y, op, algorithm=algo)
                    gloo.all_reduce(z, op, algorithm=algo)
                    assert torch.equal(y, z), f"shm differs from gloo: {algo} {numel} {dtype} {op}"
                    if dtype.is_floating_point:
                        tol = TOL[dtype]
                        assert torch.allclose(y.double(), ref, rtol=tol, atol=tol * n), (algo, numel, dtype, op)
                    else:
                        assert torch.equal(y.double(), ref), (algo, numel, dtype, op)
                    digests[f"{algo}/{numel}/{dtype}/{op}"] = _digest(y)
        # Compressed wire, scale and found_inf, small pieces (many steps, many channel slots per transfer).
        numel = 70_001
        x = _data(rank, numel, torch.float32, salt=3)
        exact = sum(_data(r, numel, torch.float32, salt=3).double() for r in range(n))
        for chunk in ("", "4096"):
            os.environ["PARACOMM_CHUNK_BYTES"] = chunk
            for wire in (None, torch.float16, torch.bfloat16):
                y, z = x.clone(), x.clone()
                fy, fz = torch.zeros(1), torch.zeros(1)
                half = torch.tensor([0.5])
                shm.all_reduce(y, "avg", wire_dtype=wire, scale=half, found_inf=fy, algorithm=algo)
                gloo.all_reduce(z, "avg", wire_dtype=wire, scale=half, found_inf=fz, algorithm=algo)
                assert torch.equal(y, z) and fy.item() == fz.item() == 0.0, (algo, chunk, wire)
                tol = 2e-2 if wire is not None and n > 1 else 1e-5
                assert torch.allclose(y.double(), exact / n * 0.5, rtol=tol, atol=tol), (algo, chunk, wire)
                digests[f"{algo}/wire/{wire}/{chunk}"] = _digest(y)
                # inf on the last rank flags found_inf on every rank
                y = x.clone()
                if rank == n - 1:
                    y[numel // 2] = float("inf")
                found = torch.zeros(1)
                shm.all_reduce(y, wire_dtype=wire, found_inf=found, algorithm=algo)
                assert found.item() == 1.0, (algo, chunk, wire)
        os.environ.pop("PARACOMM_CHUNK_BYTES")
    return digests


@pytest.mark.parametrize("world_size,fuse", [(1, "1"), (2, "1"), (3, "1"), (3, "0"), (4, "1"), (5, "1"), (6, "1"),
                                             (7, "1"), (8, "1")])
def test_shm_matches_gloo_bitwise_and_float64_for_every_algorithm(world_size, fuse):
    # fuse "0": every receive copied into its workspace span (PARACOMM_SHM_FUSE=0); "1" (default): reductions
    # read received pieces in place from the channel slots where the plan allows it.
    digests = run_ranks(world_size, _matrix, timeout=900, env={"PARACOMM_SHM_FUSE": fuse})
    for r in range(1, world_size):
        assert digests[r] == digests[0], f"rank {r} differs from rank 0"


# ------------------------------------------------------------------------------------------------------------
# Two Communicators in one job, interleaved (each on its own worker thread), and mismatches
# ------------------------------------------------------------------------------------------------------------


def _two_comms(rank, world_size, salt):
    import paracomm

    a = paracomm.Communicator(timeout=timedelta(seconds=60))
    b = paracomm.Communicator(timeout=timedelta(seconds=60))
    n = world_size
    for i in range(60):
        xa = _data(rank, 5000 + i, torch.float32, salt=salt + i)
        xb = _data(rank, 900 + 3 * i, torch.int64, salt=salt - i)
        wa = a.all_reduce(xa, "avg", async_op=True, algorithm=ALGOS[i % 3])
        wb = b.all_reduce(xb, async_op=True, algorithm=ALGOS[(i + 1) % 3])
        wb.wait()
        wa.wait()
        ea = sum(_data(r, 5000 + i, torch.float32, salt=salt + i).double() for r in range(n)) / n
        eb = sum(_data(r, 900 + 3 * i, torch.int64, salt=salt - i) for r in range(n))
        assert torch.allclose(xa.double(), ea, rtol=1e-5, atol=1e-5), i
        assert torch.equal(xb, eb), i
    assert a._cpu.name != b._cpu.name
    # A mismatch is caught on every call on shm, even with the first-sight check off, before any data moves:
    # every rank raises naming the field, nothing is written, and the communicator stays usable.
    os.environ["PARACOMM_CHECK_SHAPES"] = "0"
    for t in (torch.ones(64 + rank), torch.ones(64, dtype=torch.float64 if rank else torch.float32)):
        before = t.clone()
        with pytest.raises(RuntimeError, match="different arguments"):
            a.all_reduce(t)
        assert torch.equal(t, before)
    with pytest.raises(RuntimeError, match="PARACOMM_CHUNK_BYTES"):
        os.environ["PARACOMM_CHUNK_BYTES"] = str(1024 * (rank + 1))
        a.all_reduce(torch.ones(100_000))
    os.environ.pop("PARACOMM_CHUNK_BYTES")
    ok = torch.full((33,), float(rank))
    a.all_reduce(ok)
    assert torch.equal(ok, torch.full((33,), float(sum(range(n)))))
    # Every collective runs on shm: there is no gloo fallback behind the executor.
    assert not hasattr(a._cpu, "pg")
    return _digest(xa)


def test_two_communicators_interleaved_and_two_jobs_at_once():
    results = {}

    def job(key, world_size, salt):
        results[key] = run_ranks(world_size, _two_comms, salt, timeout=600)

    threads = [threading.Thread(target=job, args=(k, w, s)) for k, w, s in (("a", 2, 11), ("b", 3, 97))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, world_size in (("a", 2), ("b", 3)):
        assert key in results, f"job {key} failed (see its traceback above)"
        assert len(set(results[key])) == 1


# ------------------------------------------------------------------------------------------------------------
# Segments: 0600, unguessable, refused when not private; transport selection
# ------------------------------------------------------------------------------------------------------------


def test_segment_is_private_and_refused_otherwise():
    from paracomm import _C

    c = _C.ShmComm("", True, 0, 2)
    path = _segment_path(c.name)
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        assert len(c.name) == len("/paracomm-") + 32  # 128 random bits
        other = _C.ShmComm("", True, 0, 2)
        assert other.name != c.name
        assert _C.ShmComm.unlink(other.name)
        peer = _C.ShmComm(c.name, False, 1, 2)  # the opener checks owner, mode and layout
        assert peer.segment_bytes == c.segment_bytes
        with pytest.raises(RuntimeError, match="does not hold a paracomm segment"):
            _C.ShmComm(c.name, False, 1, 3)
        os.chmod(path, 0o644)
        with pytest.raises(RuntimeError, match="not a private segment"):
            _C.ShmComm(c.name, False, 1, 2)
    finally:
        assert _C.ShmComm.unlink(c.name)
    assert not _C.ShmComm.unlink(c.name)
    with pytest.raises(RuntimeError, match="shm_open"):
        _C.ShmComm(c.name, False, 1, 2)


def _selection(rank, world_size, setting):
    import paracomm
    from paracomm import _shm

    os.environ["PARACOMM_CPU_TRANSPORT"] = setting
    comm = paracomm.Communicator(timeout=timedelta(seconds=30))
    try:
        return _shm.transport_of(comm)
    except ValueError as e:
        return f"ValueError: {e}"


def test_transport_selection():
    assert run_ranks(2, _selection, "auto") == ["shm", "shm"]
    assert run_ranks(2, _selection, "gloo") == ["gloo", "gloo"]
    for out in run_ranks(2, _selection, "fast"):
        assert "PARACOMM_CPU_TRANSPORT must be one of" in out


def _inconsistent(rank, world_size):
    import paracomm
    from paracomm import _shm

    os.environ["PARACOMM_CPU_TRANSPORT"] = "gloo" if rank else "shm"
    comm = paracomm.Communicator(timeout=timedelta(seconds=30))
    with pytest.raises(ValueError, match="differs between ranks"):
        _shm.transport_of(comm)
    return True


def test_inconsistent_transport_setting_raises_on_every_rank():
    assert run_ranks(2, _inconsistent) == [True, True]


# ------------------------------------------------------------------------------------------------------------
# A peer killed with SIGKILL mid-call, or stalled
# ------------------------------------------------------------------------------------------------------------


def _killed(rank, world_size, stamp_file):
    import paracomm

    comm = paracomm.Communicator(timeout=timedelta(seconds=60))
    x = torch.ones(1 << 22)
    comm.all_reduce(x)
    name = comm._cpu.name
    victim = world_size - 1
    if rank == victim:
        sigkill_after(0.5, stamp_file)
    calls = 0
    try:
        while True:  # back-to-back large calls (several steps each): the kill lands inside one of them
            comm.all_reduce(x, algorithm=ALGOS[calls % 3])
            calls += 1
    except RuntimeError as e:
        raised = time.time()
        message = str(e)
    with pytest.raises(RuntimeError, match="failed earlier"):
        comm.all_reduce(x)
    return name, raised, message, calls


@pytest.mark.parametrize("world_size", [2, 4])
def test_peer_killed_mid_call_every_survivor_raises_within_a_second(world_size, tmp_path):
    stamp = str(tmp_path / "killed_at")
    results = run_ranks(world_size, _killed, stamp, timeout=300, allow_missing=(world_size - 1,))
    assert results[-1] is None
    with open(stamp) as f:
        killed_at = float(f.read())
    victim = world_size - 1
    # Every survivor names a peer: the victim (it died) or a survivor that noticed first (it failed).
    assert any(f"rank {victim} (pid" in message and "died" in message for _, _, message, _ in results[:-1]), \
        [message for _, _, message, _ in results[:-1]]
    for name, raised, message, calls in results[:-1]:
        assert "paracomm" in message and ("died" in message or "failed" in message), message
        assert re.search(r"peer rank \d+", message), message
        assert calls > 0
        delay = raised - killed_at
        print(f"world size {world_size}: survivor raised {delay * 1e3:.0f} ms after the kill")
        # Detection is a 20 ms sleep slice plus a pidfd poll; generous slack for a loaded machine.
        assert delay < 5.0, f"took {delay:.2f} s to notice the kill"
        assert not os.path.exists(_segment_path(name))
    assert not glob.glob(_segment_path(results[0][0]) + "*")


def _stalled(rank, world_size, timeout_s):
    import paracomm

    comm = paracomm.Communicator(timeout=timedelta(seconds=timeout_s))
    comm.all_reduce(torch.ones(1000))
    if rank == world_size - 1:
        time.sleep(timeout_s + 3)  # alive but silent
        return None
    start = time.monotonic()
    # The first rank whose deadline passes times out and fails the transport; a rank still waiting then
    # raises because that peer failed (every rank raises, none hangs), at about the same moment.
    with pytest.raises(RuntimeError, match=r"timed out|peer rank \d+ failed") as info:
        comm.all_reduce(torch.ones(1000))
    return time.monotonic() - start, str(info.value)


def test_stalled_peer_raises_at_the_timeout():
    timeout_s = 2.0
    results = run_ranks(3, _stalled, timeout_s, timeout=120)
    # The rank that times out names the stalled peer it waited for (rank 2), in comm.py's words and the transport's.
    assert any("timed out" in message and "no answer from rank 2" in message and "peer rank 2" in message
               for _, message in results[:-1]), results
    for elapsed, message in results[:-1]:
        assert timeout_s - 0.5 <= elapsed < timeout_s + 5, (elapsed, message)


# ------------------------------------------------------------------------------------------------------------
# Exit: no "terminate called without an active exception", nothing left behind
# ------------------------------------------------------------------------------------------------------------

_EXIT_SCRIPT = r"""
import os, sys
from datetime import timedelta
import torch, torch.distributed as dist
import paracomm
rank, world, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world,
                        timeout=timedelta(seconds=60))
comm = paracomm.Communicator(timeout=timedelta(seconds=60))
works = [comm.all_reduce(torch.full((1000 + i,), float(rank)), async_op=True) for i in range(20)]
works[-1].wait()
x = torch.ones(1 << 16)
comm.all_reduce(x)
assert x[0].item() == world
print("name", comm._cpu.name, flush=True)
# exit without destroy_process_group and with the worker thread still alive
"""


def test_exit_is_clean_and_leaves_nothing(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "exit_rank.py"
    script.write_text(_EXIT_SCRIPT)
    env = dict(os.environ)
    for run in range(3):
        init = str(tmp_path / f"rdzv{run}")
        procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", init], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err
            assert "terminate called" not in err, err
            name = out.split("name ", 1)[1].split()[0]
            assert not os.path.exists(_segment_path(name))


# ------------------------------------------------------------------------------------------------------------
# reduce_scatter / all_gather and node-map (hierarchical) plans on shm: every algorithm, float64 reference,
# the gloo path's bits (the same plans), bitwise identical across ranks where the collective says so
# ------------------------------------------------------------------------------------------------------------


def _collectives(rank, world_size, node_size):
    import paracomm
    from paracomm import _shm

    n = world_size
    os.environ["PARACOMM_CPU_TRANSPORT"] = "shm"  # read when the CPU executor is made (transport_of makes it)
    shm = paracomm.Communicator(timeout=timedelta(seconds=60), node_size=node_size)
    assert _shm.transport_of(shm) == ("shm" if n > 1 else "none (world size 1)")
    os.environ["PARACOMM_CPU_TRANSPORT"] = "gloo"
    gloo = paracomm.Communicator(timeout=timedelta(seconds=60), node_size=node_size)
    assert _shm.transport_of(gloo) == ("gloo" if n > 1 else "none (world size 1)")
    os.environ["PARACOMM_CPU_TRANSPORT"] = "auto"
    nodes = node_size is not None and 1 < node_size < n
    equal = nodes and n % node_size == 0
    digests = {}
    rs_algos = ("auto", "ring", "direct", "one_shot") + (("hierarchical",) if equal else ())
    ag_algos = ("auto", "ring", "direct") + (("hierarchical",) if equal else ())
    ar_algos = ("auto",) + (("hierarchical",) if nodes else ())
    half = torch.tensor([0.5])
    for numel in (0, 1, 37, 4099, 65_537):
        for dtype in DTYPES if numel in (37, 4099) else (torch.float32,):
            xs = [_data(r, n * numel, dtype, salt=5) for r in range(n)]
            exact = sum(x[rank * numel:(rank + 1) * numel].double() for x in xs)
            for algo, op in itertools.product(rs_algos, ("sum", "avg", "scale") if dtype.is_floating_point
                                              else ("sum",)):
                kwargs = {"scale": half} if op == "scale" else {}
                outs = []
                for comm in (shm, gloo):
                    out = torch.full((numel,), 7, dtype=dtype)
                    comm.reduce_scatter(out, xs[rank].clone(), "avg" if op == "avg" else "sum", algorithm=algo,
                                        **kwargs)
                    outs.append(out)
                assert torch.equal(outs[0], outs[1]), ("reduce_scatter", numel, dtype, algo, op)
                want = {"sum": exact, "avg": exact / n, "scale": exact * 0.5}[op]
                if dtype.is_floating_point:
                    tol = TOL[dtype] * (4 if dtype in (torch.float16, torch.bfloat16) else 1)
                    assert torch.allclose(outs[0].double(), want, rtol=tol, atol=tol * n), (numel, dtype, algo, op)
                else:
                    assert torch.equal(outs[0].double(), want), (numel, dtype, algo, op)
            inp = _data(rank, numel, dtype, salt=9)
            for algo in ag_algos:
                outs = []
                for comm in (shm, gloo):
                    out = torch.full((n * numel,), 3, dtype=dtype)
                    comm.all_gather(out, inp.clone(), algorithm=algo)
                    outs.append(out)
                want = torch.cat([_data(r, numel, dtype, salt=9) for r in range(n)])
                assert torch.equal(outs[0], want) and torch.equal(outs[1], want), ("all_gather", numel, dtype, algo)
                digests[f"ag/{algo}/{numel}/{dtype}"] = _digest(outs[0])
            # In place, as FSDP2 gathers: the input is this rank's segment of the output.
            out = torch.full((n * numel,), 3, dtype=dtype)
            out[rank * numel:(rank + 1) * numel] = inp
            shm.all_gather(out, out[rank * numel:(rank + 1) * numel])
            assert torch.equal(out, want), ("all_gather in place", numel, dtype)
            for algo in ar_algos:
                y, z = xs[rank][:numel].clone(), xs[rank][:numel].clone()
                shm.all_reduce(y, algorithm=algo)
                gloo.all_reduce(z, algorithm=algo)
                assert torch.equal(y, z), ("all_reduce", numel, dtype, algo)
                digests[f"ar/{algo}/{numel}/{dtype}"] = _digest(y)
    # Compressed wire with scale and found_inf (reduce_scatter: this rank's shard only; all_reduce: every rank).
    numel = 20_011
    xs = [_data(r, n * numel, torch.float32, salt=11) for r in range(n)]
    exact = sum(x[rank * numel:(rank + 1) * numel].double() for x in xs)
    for wire, algo in itertools.product((torch.float16, torch.bfloat16), rs_algos):
        outs, flags = [], []
        for comm in (shm, gloo):
            out, found = torch.zeros(numel), torch.zeros(1)
            comm.reduce_scatter(out, xs[rank].clone(), "avg", wire_dtype=wire, scale=half, found_inf=found,
                                algorithm=algo)
            outs.append(out)
            flags.append(found.item())
        assert torch.equal(outs[0], outs[1]) and flags == [0.0, 0.0], ("rs wire", wire, algo)
        tol = 2e-2 if n > 1 else 1e-6
        assert torch.allclose(outs[0].double(), exact / n * 0.5, rtol=tol, atol=tol), ("rs wire", wire, algo)
        bad = xs[rank].clone()
        if rank == n - 1:
            bad[-1] = float("inf")  # in the last rank's shard only
        out, found = torch.zeros(numel), torch.zeros(1)
        shm.reduce_scatter(out, bad, wire_dtype=wire, found_inf=found, algorithm=algo)
        assert found.item() == (1.0 if rank == n - 1 else 0.0), ("rs found_inf", wire, algo)
        for ar in ar_algos:
            y, z = xs[rank][:numel].clone(), xs[rank][:numel].clone()
            fy, fz = torch.zeros(1), torch.zeros(1)
            if rank == 0:
                y[3] = z[3] = float("nan")
            shm.all_reduce(y, "avg", wire_dtype=wire, scale=half, found_inf=fy, algorithm=ar)
            gloo.all_reduce(z, "avg", wire_dtype=wire, scale=half, found_inf=fz, algorithm=ar)
            assert torch.equal(y.nan_to_num(), z.nan_to_num()) and fy.item() == fz.item() == 1.0, ("ar wire", ar)
            digests[f"ar/wire/{wire}/{ar}"] = _digest(y.nan_to_num())
    # A reduce_scatter signature mismatch raises on every rank and writes nothing; the communicator stays usable.
    if n > 1:
        out = torch.full((8,), 5.0)
        with pytest.raises(RuntimeError, match="different arguments"):
            shm.reduce_scatter(out, torch.ones(n * 8), "avg" if rank == 0 else "sum")
        assert torch.equal(out, torch.full((8,), 5.0))
        shm.reduce_scatter(out, torch.ones(n * 8))
        assert torch.equal(out, torch.full((8,), float(n)))
    return digests


@pytest.mark.parametrize("world_size,node_size,eager", [
    (1, None, "1"), (2, None, "1"), (2, None, "0"), (3, None, "1"), (4, 2, "1"), (4, 2, "0"),
    pytest.param(5, 2, "1", marks=pytest.mark.slow), pytest.param(6, 3, "1", marks=pytest.mark.slow),
    pytest.param(7, None, "1", marks=pytest.mark.slow), pytest.param(8, 4, "1", marks=pytest.mark.slow)])
def test_shm_collectives_and_node_maps_match_gloo_and_float64(world_size, node_size, eager):
    # eager "0": the first transfer step goes through the channels like every other (PARACOMM_SHM_EAGER=0);
    # "1" (default): its sends are published with the call's entry (csrc/shm/shm_comm.cpp, "eager sends").
    digests = run_ranks(world_size, _collectives, node_size, timeout=900, env={"PARACOMM_SHM_EAGER": eager})
    for r in range(1, world_size):
        assert digests[r] == digests[0], f"rank {r} differs from rank 0"


# ------------------------------------------------------------------------------------------------------------
# The cached all_reduce fast path (comm.py, Communicator._all_reduce_shm_fast): the full path's errors
# ------------------------------------------------------------------------------------------------------------


def _fast_path(rank, world_size):
    import paracomm

    n = world_size
    comm = paracomm.Communicator(timeout=timedelta(seconds=60))
    x = _data(rank, 1000, torch.float32, salt=1)
    want = sum(_data(r, 1000, torch.float32, salt=1).double() for r in range(n))
    for _ in range(3):
        y = x.clone()
        comm.all_reduce(y)
        assert torch.allclose(y.double(), want, rtol=1e-6, atol=1e-6)
    assert comm._shm_fast, "the fast path was not filled"
    first = y.clone()
    y = x.clone()
    paracomm.all_reduce(y)  # the module-level call: its own cached Communicator, the same bits
    assert torch.equal(y, first)
    # Arguments the fast path's key cannot see are still refused by the full validation, nothing written.
    strided = torch.ones(2000)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        comm.all_reduce(strided)
    assert torch.equal(strided, torch.ones(1000))
    os.environ["PARACOMM_CHUNK_BYTES"] = "lots"
    with pytest.raises(ValueError, match="PARACOMM_CHUNK_BYTES"):
        comm.all_reduce(x.clone())
    os.environ.pop("PARACOMM_CHUNK_BYTES")
    # A mismatch where one rank takes the fast path (a known call) and the other the full one (a new op).
    y = x.clone()
    with pytest.raises(RuntimeError, match="different arguments"):
        comm.all_reduce(y, "avg" if rank == 0 else "sum")
    assert torch.equal(y, x)
    comm.all_reduce(y)
    assert torch.equal(y, first)
    return _digest(first)


def test_fast_path_keeps_every_check():
    digests = run_ranks(2, _fast_path, timeout=300)
    assert digests[0] == digests[1]


# ------------------------------------------------------------------------------------------------------------
# Waits: sleep instead of spinning for an absent peer, adapt the spin, never stay on a core shared with a peer
# ------------------------------------------------------------------------------------------------------------

def _waits(rank, world_size):
    import paracomm

    comm = paracomm.Communicator(timeout=timedelta(seconds=60))
    want = float(sum(range(1, world_size + 1)))

    def call():
        x = torch.full((256,), float(rank + 1))
        comm.all_reduce(x)
        assert torch.equal(x, torch.full((256,), want))

    call()
    shm = comm._cpu
    out = {}
    # 1. A peer away for 0.3 s: the waiter sleeps on its futex (its CPU time stays far below the wait).
    dist.barrier()
    before, cpu0, t0 = shm.wait_stats(), time.process_time(), time.monotonic()
    if rank == 1:
        time.sleep(0.3)
    call()
    out["away"] = (shm.wait_stats()["sleeps"] - before["sleeps"], time.process_time() - cpu0,
                   time.monotonic() - t0)
    # 2. A peer ~0.2 ms late at every call: the spin budget outgrows the gap after a few sleeps (a fixed 50 us
    #    spin would sleep at every one of the 200 calls).
    dist.barrier()
    before = shm.wait_stats()
    for _ in range(200):
        if rank == 1:
            end = time.perf_counter() + 2e-4
            while time.perf_counter() < end:
                pass
        call()
    out["late"] = shm.wait_stats()["sleeps"] - before["sleeps"]
    # 3. Both ranks on one CPU, rank 0 allowed its whole mask again: rank 0 leaves the shared core (moves at
    #    least once, the kernel would leave the pair stacked) and its affinity mask is what it was.
    original = os.sched_getaffinity(0)
    if len(original) >= 2:
        first = min(original)
        moved = 0
        for _ in range(3):
            os.sched_setaffinity(0, {first})
            call()
            dist.barrier()
            before = shm.wait_stats()
            if rank == 0:
                os.sched_setaffinity(0, original)
            for _ in range(100):
                call()
            moved += shm.wait_stats()["moves"] - before["moves"]
            dist.barrier()
        out["stacked"] = (moved, os.sched_getaffinity(0) == (original if rank == 0 else {first}))
        # 4. Both pinned to one CPU (no free CPU): no move, every result right (the waits sleep instead).
        os.sched_setaffinity(0, {first})
        before = shm.wait_stats()
        for _ in range(100):
            call()
        out["pinned"] = (shm.wait_stats()["moves"] - before["moves"], os.sched_getaffinity(0) == {first})
        os.sched_setaffinity(0, original)
    return out


def test_waits_sleep_adapt_and_leave_a_shared_core():
    results = run_ranks(2, _waits, timeout=300, env={"PARACOMM_CPU_TRANSPORT": "shm"})
    sleeps, cpu_s, wall_s = results[0]["away"]
    assert wall_s >= 0.25 and sleeps >= 1, results[0]
    assert cpu_s < 0.15, f"rank 0 burned {cpu_s:.3f} s of CPU while waiting {wall_s:.3f} s for an absent peer"
    assert results[0]["late"] <= 50, f"rank 0 slept {results[0]['late']} times in 200 calls 0.2 ms apart: {results}"
    if "stacked" not in results[0]:
        pytest.skip("one CPU: the shared-core checks need two")
    moved, restored = results[0]["stacked"]
    assert moved >= 1, f"rank 0 never moved off the CPU it shared with rank 1 (pinned there): {results}"
    assert restored, "a move changed rank 0's affinity mask"
    assert results[1]["stacked"] == (0, True), results[1]["stacked"]  # pinned rank 1 has nowhere to go
    for r in (0, 1):
        assert results[r]["pinned"] == (0, True), results[r]["pinned"]
