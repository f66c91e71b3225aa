"""CPU check of the NCCL executor's ordering (csrc/allreduce/plan_waits.cpp) on every algorithm's real plans.

The NCCL executor runs each step's transfer group on the comm stream C and its reductions on the caller's stream
S, with exactly the cross-stream waits plan_waits() computes (nccl_executor.cpp enqueues nothing else). This
test compiles plan_waits.cpp and plan.cpp with g++ behind a tiny C shim (no CUDA, no NCCL, no torch), takes the
same plans from paracomm._C.all_reduce_plan, and replays the two streams with vector clocks: every pair of
operations on different streams that touch overlapping bytes, one of them writing, must be ordered. (Operations
on one stream are ordered by the stream itself.) A mutation check shows the replay catches a missing wait.
"""
import ctypes
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
ITEMSIZE = {0: 4, 1: 2, 2: 2, 3: 8, 4: 4, 5: 8}
ALGORITHMS = {"ring": 0, "direct": 1, "one_shot": 2}

_SHIM = r"""
#include <cstdio>
#include <cstring>
#include <exception>
#include "allreduce/plan.h"
#include "allreduce/plan_waits.h"
using namespace paracomm;

// out: has_transfers, then per step comm_waits[i], stream_waits[i], record_transfer[i], record_reduce[i].
// Returns the step count, -1 on error, -2 when cap is too small.
extern "C" long long pw_waits(long long numel, int dtype, int wire, long long n, long long rank, int algorithm,
                              int has_found_inf, int has_final_op, long long chunk_bytes, long long* out,
                              long long cap, char* err, int errlen) {
  try {
    PlanSpec s;
    s.numel = numel;
    s.dtype = static_cast<DType>(dtype);
    s.wire_dtype = wire;
    s.world_size = n;
    s.rank = rank;
    s.algorithm = static_cast<Algorithm>(algorithm);
    s.backend = Backend::kNccl;
    s.has_found_inf = has_found_inf != 0;
    s.has_final_op = has_final_op != 0;
    s.chunk_bytes = chunk_bytes;
    const Plan plan = make_plan(s);
    const PlanWaits w = plan_waits(plan);
    const long long steps = static_cast<long long>(plan.steps.size());
    if (1 + 4 * steps > cap) return -2;
    out[0] = w.has_transfers ? 1 : 0;
    for (long long i = 0; i < steps; ++i) {
      out[1 + 4 * i] = w.comm_waits[i];
      out[2 + 4 * i] = w.stream_waits[i];
      out[3 + 4 * i] = w.record_transfer[i] ? 1 : 0;
      out[4 + 4 * i] = w.record_reduce[i] ? 1 : 0;
    }
    return steps;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return -1;
  }
}
"""


@pytest.fixture(scope="module")
def waits_lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    d = tmp_path_factory.mktemp("plan_waits")
    shim = d / "shim.cpp"
    shim.write_text(_SHIM)
    lib = d / "libplan_waits.so"
    # No CUDA include path and no PARACOMM_WITH_CUDA: plans and their waits must stay plain C++.
    subprocess.run(
        [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{CSRC}", str(shim), str(CSRC / "allreduce" / "plan.cpp"),
         str(CSRC / "allreduce" / "hierarchical.cpp"), str(CSRC / "allreduce" / "plan_waits.cpp"), "-o", str(lib)],
        check=True, capture_output=True, text=True,
    )
    so = ctypes.CDLL(str(lib))
    so.pw_waits.argtypes = [ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                            ctypes.POINTER(ctypes.c_longlong), ctypes.c_longlong, ctypes.c_char_p, ctypes.c_int]
    so.pw_waits.restype = ctypes.c_longlong
    return so


def _waits(lib, numel, dtype, wire, n, rank, algorithm, found, final, chunk):
    cap = 1 << 16
    out = (ctypes.c_longlong * cap)()
    err = ctypes.create_string_buffer(1024)
    steps = lib.pw_waits(numel, dtype, wire, n, rank, ALGORITHMS[algorithm], int(found), int(final), chunk, out,
                         cap, err, 1024)
    assert steps >= 0, err.value.decode() or f"pw_waits returned {steps}"
    comm_waits = [out[1 + 4 * i] for i in range(steps)]
    stream_waits = [out[2 + 4 * i] for i in range(steps)]
    # Every event a wait refers to is recorded, and no other (the executor skips records nobody waits for).
    recorded_t = {i for i in range(steps) if out[3 + 4 * i]}
    recorded_r = {i for i in range(steps) if out[4 + 4 * i]}
    assert recorded_t == {t for t in stream_waits if t >= 0}
    assert recorded_r == {j for j in comm_waits if j >= 0}
    return bool(out[0]), comm_waits, stream_waits


def _unordered(plan, has_transfers, comm_waits, stream_waits):
    """Replays S and C with vector clocks; returns the conflicting (reduction step, transfer step) pairs that no
    wait orders."""
    T = ITEMSIZE[plan["dtype"]]
    W = ITEMSIZE[plan["wire"]] if plan["wire"] >= 0 else T
    recv_off = plan["recv_offset_bytes"]

    def span(buf, off, count):  # byte range in the data ("d") or the workspace ("w")
        if buf == 0:
            return ("d", off * T, (off + count) * T)
        base = 0 if buf == 1 else recv_off
        return ("w", base + off * W, base + (off + count) * W)

    ops = {"S": [], "C": []}
    clock = {"S": [-1, -1], "C": [-1, -1]}  # per stream: the latest S op and C op known to precede its next op

    def push(stream, reads, writes, step):
        k = clock[stream]
        k[0 if stream == "S" else 1] = len(ops[stream])
        ops[stream].append((reads, writes, step, tuple(k)))

    def wait(stream, other):
        k = clock[stream]
        k[0], k[1] = max(k[0], other[0]), max(k[1], other[1])

    reduce_clock, transfer_clock = {}, {}
    if has_transfers:
        wait("C", tuple(clock["S"]))  # start
    for i, (_, transfers, reductions) in enumerate(plan["steps"]):
        if transfers:
            if comm_waits[i] >= 0:
                wait("C", reduce_clock[comm_waits[i]])
            push("C", [span(b, o, c) for send, _, b, o, c in transfers if send],
                 [span(b, o, c) for send, _, b, o, c in transfers if not send], i)
            transfer_clock[i] = ops["C"][-1][3]
        if reductions:
            if stream_waits[i] >= 0:
                wait("S", transfer_clock[stream_waits[i]])
            for count, inputs, out, _, _, wire_out, _ in reductions:
                writes = [span(out[0], out[1], count)]
                if wire_out is not None:
                    writes.append(span(wire_out[0], wire_out[1], count))
                push("S", [span(b, o, count) for b, o in inputs], writes, i)
            reduce_clock[i] = ops["S"][-1][3]

    def overlap(a, b):
        return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]

    bad = []
    for ia, (ra, wa, sa, ca) in enumerate(ops["S"]):
        for ib, (rb, wb, sb, cb) in enumerate(ops["C"]):
            conflict = any(overlap(x, y) for x in wa for y in rb + wb) or any(overlap(x, y) for x in ra for y in wb)
            if conflict and cb[0] < ia and ca[1] < ib:
                bad.append((sa, sb))
    return bad


def _plan(numel, dtype, wire, n, rank, algorithm, found, final, chunk):
    import paracomm._C as C

    p = C.all_reduce_plan(numel, dtype, wire, n, rank, algorithm, "nccl", found, final, chunk)
    return dict(p, dtype=dtype, wire=wire)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_conflicting_pair_is_ordered(waits_lib, n, algorithm):
    checked = 0
    for dtype, wire in ((0, -1), (0, 1), (2, -1), (3, -1), (5, -1)):
        for numel in (1, 1000, 50007):
            for chunk in (0, 4096):
                for found in (False, True):
                    for rank in sorted({0, n // 2, n - 1}):
                        args = (numel, dtype, wire, n, rank, algorithm, found, found, chunk)
                        plan = _plan(*args)
                        has_transfers, comm_waits, stream_waits = _waits(waits_lib, *args)
                        assert len(comm_waits) == len(plan["steps"])
                        assert has_transfers == any(step[1] for step in plan["steps"])
                        # A wait never points past what the plan allows (overlap is kept).
                        for i, (after, transfers, reductions) in enumerate(plan["steps"]):
                            assert comm_waits[i] <= after and (comm_waits[i] < 0 or transfers), (args, i)
                            assert stream_waits[i] <= i and (stream_waits[i] < 0 or reductions), (args, i)
                        bad = _unordered(plan, has_transfers, comm_waits, stream_waits)
                        assert not bad, f"{args}: unordered (reduction step, transfer step) pairs {bad[:5]}"
                        checked += 1
    assert checked > 0


def test_replay_catches_a_missing_wait(waits_lib):
    """Dropping any one wait of a pipelined ring or direct plan leaves some conflicting pair unordered."""
    for algorithm in ("ring", "direct"):
        args = (50007, 0, 1, 4, 1, algorithm, True, True, 4096)
        plan = _plan(*args)
        has_transfers, comm_waits, stream_waits = _waits(waits_lib, *args)
        assert not _unordered(plan, has_transfers, comm_waits, stream_waits)
        for waits in (comm_waits, stream_waits):
            for i in [k for k, w in enumerate(waits) if w >= 0][:6]:
                saved, waits[i] = waits[i], -1
                assert _unordered(plan, has_transfers, comm_waits, stream_waits), (algorithm, i)
                waits[i] = saved
