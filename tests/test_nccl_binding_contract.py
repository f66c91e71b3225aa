"""CPU tests of the NCCL executor's pure planning (csrc/ring/nccl_plan.cpp): no GPU, no NCCL, no CUDA headers.

The module is compiled on its own with g++ (plus the ring schedule it plans for) behind a tiny C shim and
driven through ctypes, so these checks run on the CPU-only CI machine even though the NCCL transport is only
built in CUDA builds. Checked against independent Python references:
  * the workspace layout (what nccl_workspace_bytes reports) for every dtype / wire / chunk combination;
  * argument refusals, each naming the argument;
  * the event plan: every transfer waits for the local steps it depends on (send_after and i-2), never for a
    later one (overlap is kept), and the event slot it waits on still holds that op's record.
"""
import ctypes
import itertools
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

F32, F16, BF16, F64, I32, I64 = range(6)
ITEMSIZE = {F32: 4, F16: 2, BF16: 2, F64: 8, I32: 4, I64: 8}
FLOATING = {F32, F16, BF16, F64}
NO_WIRE = -1
ALIGN = 256
RS, AG = 0, 1
LOCAL_SLOTS = 3

_SHIM = r"""
#include <cstdio>
#include <cstring>
#include <exception>
#include "ring/nccl_plan.h"
using namespace paracomm;

static int fail(const std::exception& e, char* err, int errlen) {
  std::snprintf(err, errlen, "%s", e.what());
  return 1;
}
static RingAllReduceSpec spec_of(long long numel, int dtype, int wire, double divisor, int has_scale,
                                 int has_found_inf, long long chunk) {
  RingAllReduceSpec s;
  s.numel = numel;
  s.dtype = dtype_from_code(dtype, "dtype");
  s.wire_dtype = wire;
  s.divisor = divisor;
  s.has_scale = has_scale != 0;
  s.has_found_inf = has_found_inf != 0;
  s.chunk_elems = chunk;
  return s;
}
extern "C" int pc_check(long long numel, int dtype, int wire, double divisor, int has_scale, int has_found_inf,
                        long long chunk, char* err, int errlen) {
  try { check_ring_all_reduce_spec(spec_of(numel, dtype, wire, divisor, has_scale, has_found_inf, chunk)); }
  catch (const std::exception& e) { return fail(e, err, errlen); }
  return 0;
}
// out: wire_offset, wire_bytes, recv_offset0, recv_offset1, recv_elems, recv_bytes, total_bytes
extern "C" int pc_layout(long long numel, int dtype, int wire, long long chunk, long long* out, char* err,
                         int errlen) {
  try {
    RingWorkspaceLayout l = ring_workspace_layout(spec_of(numel, dtype, wire, 1.0, 0, 0, chunk));
    long long v[7] = {l.wire_offset, l.wire_bytes, l.recv_offset[0], l.recv_offset[1], l.recv_elems,
                      l.recv_bytes, l.total_bytes};
    std::memcpy(out, v, sizeof v);
  } catch (const std::exception& e) { return fail(e, err, errlen); }
  return 0;
}
// Per op, 9 values: phase, send_count, recv_count, send_after, transfer, local, wait_local, wait_slot, local_slot
extern "C" long long pc_plan(long long n, long long rank, long long numel, long long chunk, int compressed,
                             int found_inf, long long* out, long long cap, char* err, int errlen) {
  try {
    std::vector<RingOp> ops = ring_schedule(n, rank, numel, chunk);
    std::vector<RingOpEvents> plan = plan_ring_events(ops, compressed != 0, found_inf != 0);
    if ((long long)ops.size() * 9 > cap) return -2;
    for (size_t i = 0; i < ops.size(); ++i) {
      long long v[9] = {(long long)ops[i].phase, ops[i].send_count, ops[i].recv_count, ops[i].send_after,
                        plan[i].transfer, plan[i].local, plan[i].wait_local, plan[i].wait_slot,
                        plan[i].local_slot};
      std::memcpy(out + 9 * i, v, sizeof v);
    }
    return (long long)ops.size();
  } catch (const std::exception& e) { fail(e, err, errlen); return -1; }
}
"""


@pytest.fixture(scope="module")
def plan_lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    d = tmp_path_factory.mktemp("nccl_plan")
    shim = d / "shim.cpp"
    shim.write_text(_SHIM)
    lib = d / "libnccl_plan.so"
    # No CUDA include path and no PARACOMM_WITH_CUDA: the plan must stay plain C++.
    subprocess.run(
        [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{CSRC}", str(shim), str(CSRC / "ring" / "nccl_plan.cpp"),
         str(CSRC / "ring" / "schedule.cpp"), "-o", str(lib)],
        check=True, capture_output=True, text=True,
    )
    so = ctypes.CDLL(str(lib))
    so.pc_check.argtypes = [ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int,
                            ctypes.c_int, ctypes.c_longlong, ctypes.c_char_p, ctypes.c_int]
    so.pc_layout.argtypes = [ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                             ctypes.POINTER(ctypes.c_longlong), ctypes.c_char_p, ctypes.c_int]
    so.pc_plan.argtypes = [ctypes.c_longlong] * 4 + [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_longlong),
                                                      ctypes.c_longlong, ctypes.c_char_p, ctypes.c_int]
    so.pc_plan.restype = ctypes.c_longlong
    return so


def _check(lib, numel=10, dtype=F32, wire=NO_WIRE, divisor=1.0, scale=False, found_inf=False, chunk=4):
    err = ctypes.create_string_buffer(512)
    rc = lib.pc_check(numel, dtype, wire, divisor, int(scale), int(found_inf), chunk, err, 512)
    return None if rc == 0 else err.value.decode()


def _layout(lib, numel, dtype, wire, chunk):
    out = (ctypes.c_longlong * 7)()
    err = ctypes.create_string_buffer(512)
    rc = lib.pc_layout(numel, dtype, wire, chunk, out, err, 512)
    assert rc == 0, err.value.decode()
    keys = ["wire_offset", "wire_bytes", "recv_offset0", "recv_offset1", "recv_elems", "recv_bytes", "total"]
    return dict(zip(keys, list(out)))


def _plan(lib, n, rank, numel, chunk, compressed, found_inf):
    cap = 9 * (2 * n * (numel // max(1, chunk) + 2) + 16)
    out = (ctypes.c_longlong * cap)()
    err = ctypes.create_string_buffer(512)
    count = lib.pc_plan(n, rank, numel, chunk, int(compressed), int(found_inf), out, cap, err, 512)
    assert count >= 0, (count, err.value.decode())
    keys = ["phase", "send_count", "recv_count", "send_after", "transfer", "local", "wait_local", "wait_slot",
            "local_slot"]
    return [dict(zip(keys, out[9 * i: 9 * i + 9])) for i in range(count)]


def _align(b):
    return (b + ALIGN - 1) // ALIGN * ALIGN


def test_workspace_layout_matches_reference(plan_lib):
    for dtype, numel, chunk in itertools.product(range(6), [0, 1, 7, 255, 256, 4097, 1 << 20], [1, 3, 256, 1 << 18]):
        wires = [NO_WIRE] + ([F16, BF16] if dtype == F32 else [])
        for wire in wires:
            got = _layout(plan_lib, numel, dtype, wire, chunk)
            travel = ITEMSIZE[dtype if wire == NO_WIRE else wire]
            if numel == 0:
                assert got["total"] == 0, got
                continue
            recv_elems = min(chunk, numel)
            staging = numel * travel if wire != NO_WIRE else 0
            r0 = _align(staging)
            r1 = _align(r0 + recv_elems * travel)
            expect = dict(wire_offset=0, wire_bytes=staging, recv_offset0=r0, recv_offset1=r1, recv_elems=recv_elems,
                          recv_bytes=recv_elems * travel, total=_align(r1 + recv_elems * travel))
            assert got == expect, (dtype, numel, chunk, wire)
            # Buffers are aligned and disjoint.
            assert r0 % ALIGN == 0 and r1 % ALIGN == 0
            assert staging <= r0 and r0 + recv_elems * travel <= r1


def test_refusals_name_the_argument(plan_lib):
    assert _check(plan_lib) is None
    assert _check(plan_lib, dtype=I64, numel=0, chunk=1) is None
    assert _check(plan_lib, wire=BF16, divisor=4.0, scale=True, found_inf=True) is None
    refused = {
        "numel": dict(numel=-1),
        "chunk_elems": dict(chunk=0),
        "dtype": dict(dtype=6),
        "wire_dtype": dict(wire=F64),
        "float32 data": dict(dtype=F16, wire=BF16),
        "divisor must be finite": dict(divisor=0.0),
        "divisor must be 1": dict(dtype=I32, divisor=2.0),
        "scale": dict(dtype=I64, scale=True),
    }
    for needle, kwargs in refused.items():
        msg = _check(plan_lib, **kwargs)
        assert msg is not None and needle in msg and msg.startswith("paracomm:"), (kwargs, msg)
    assert "divisor" in _check(plan_lib, divisor=float("nan"))
    assert "divisor" in _check(plan_lib, divisor=float("inf"))


@pytest.mark.parametrize("compressed,found_inf", [(False, False), (False, True), (True, False), (True, True)])
def test_event_plan_covers_every_dependency(plan_lib, compressed, found_inf):
    for n, numel, chunk in itertools.product([1, 2, 3, 4, 5], [0, 1, 2, 3, 5, 17, 64, 1000], [1, 2, 3, 7, 64]):
        for rank in range(n):
            ops = _plan(plan_lib, n, rank, numel, chunk, compressed, found_inf)
            slots = [None] * LOCAL_SLOTS  # which op's local step each slot currently holds
            locals_before = []  # ops with a local step, in order
            for i, op in enumerate(ops):
                # Which ops have a local step (executor.md, step 3).
                has_local = op["recv_count"] > 0 and (op["phase"] == RS or compressed or found_inf)
                assert op["local"] == int(has_local), (n, rank, numel, chunk, i, op)
                assert op["transfer"] == int(op["send_count"] > 0 or op["recv_count"] > 0)
                if op["transfer"]:
                    need = max(op["send_after"], i - 2)
                    covered = [j for j in locals_before[-4:] if j <= need]
                    assert len(locals_before) < 4 or covered, "need reaches further back than 3 local steps"
                    expected_wait = covered[-1] if covered else -1
                    # Waits for the newest local step it needs (so every older one too, in stream order) and
                    # for nothing newer (op i-1's reduction may overlap this transfer unless send_after == i-1).
                    assert op["wait_local"] == expected_wait, (n, rank, numel, chunk, i, op)
                    for dep in (op["send_after"], i - 2):
                        if dep >= 0 and ops[dep]["local"]:
                            assert dep <= op["wait_local"]
                    if expected_wait >= 0:
                        assert slots[op["wait_slot"]] == expected_wait, "slot re-recorded before its waiter"
                    else:
                        assert op["wait_slot"] == -1
                if op["local"]:
                    assert 0 <= op["local_slot"] < LOCAL_SLOTS
                    slots[op["local_slot"]] = i
                    locals_before.append(i)
                else:
                    assert op["local_slot"] == -1
