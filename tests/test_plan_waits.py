"""CPU check of the NCCL executor's stream schedule (csrc/allreduce/plan_waits.cpp) on every algorithm's real plans.

The NCCL executor enqueues exactly the operations plan_schedule() lists (nccl_executor.cpp walks that list): the
caller's stream S records `start` (and, in a synchronous call, waits for `done`), paracomm's reduce stream R runs
the reductions, paracomm's comm stream C the transfer groups, with the events between them. This test compiles
plan_waits.cpp and plan.cpp with g++ behind a tiny C shim (no CUDA, no NCCL, no torch), takes the same plans from
paracomm._C.all_reduce_plan, and replays the three streams with vector clocks, together with what surrounds a
call in a training step: the caller's earlier work (which produced the data), two calls in a row on the same
tensor and the same workspace block (the caching allocator hands R's released block to the next call), the
caller's later work (before and after Work.wait()), and the caller freeing its buffers early (the allocator then
reuses them on S once the keep-alive's events have completed). It checks that
  * every two operations on different streams that touch overlapping bytes, one of them writing, are ordered
    (operations on one stream are ordered by the stream itself), which covers every buffer's last use against
    its release and reuse;
  * after an async call, the caller's later work is ordered after no transfer and no reduction of the call,
    until wait(); after a synchronous call it is ordered after all of them;
and that dropping any single wait, record or keep-alive of the schedule (or Work.wait's wait) is caught.
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

// out: per schedule op (action, stream, event, step). Returns the op count, -1 on error, -2 when cap is too small.
extern "C" long long pw_schedule(long long numel, int dtype, int wire, long long n, long long rank, int algorithm,
                                 int has_found_inf, int has_final_op, long long chunk_bytes, int sync,
                                 long long* out, long long cap, char* err, int errlen) {
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
    const std::vector<SchedOp> ops = plan_schedule(plan, plan_waits(plan), sync != 0);
    const long long k = static_cast<long long>(ops.size());
    if (4 * k > cap) return -2;
    for (long long i = 0; i < k; ++i) {
      out[4 * i] = static_cast<long long>(ops[i].action);
      out[4 * i + 1] = static_cast<long long>(ops[i].stream);
      out[4 * i + 2] = static_cast<long long>(ops[i].event);
      out[4 * i + 3] = ops[i].step;
    }
    return k;
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
    so.pw_schedule.argtypes = [ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                               ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_int,
                               ctypes.POINTER(ctypes.c_longlong), ctypes.c_longlong, ctypes.c_char_p, ctypes.c_int]
    so.pw_schedule.restype = ctypes.c_longlong
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


# plan_waits.h's enums.
RECORD, WAIT, TRANSFERS, REDUCTIONS, KEEP_ALIVE = range(5)
STREAMS = ("S", "R", "C")
START, BEGIN, TRANSFER, REDUCE, END, DONE = range(1, 7)


def _schedule(lib, numel, dtype, wire, n, rank, algorithm, found, final, chunk, sync):
    cap = 1 << 18
    out = (ctypes.c_longlong * cap)()
    err = ctypes.create_string_buffer(1024)
    k = lib.pw_schedule(numel, dtype, wire, n, rank, ALGORITHMS[algorithm], int(found), int(final), chunk,
                        int(sync), out, cap, err, 1024)
    assert k >= 0, err.value.decode() or f"pw_schedule returned {k}"
    return [(out[4 * i], STREAMS[out[4 * i + 1]], out[4 * i + 2], out[4 * i + 3]) for i in range(k)]


class _Replay:
    """Vector clocks over S, R and C. An op is (stream, index); clock[s] = the latest op index on stream s that is
    known to precede the stream's next op."""

    def __init__(self):
        self.ops = {s: [] for s in STREAMS}  # (reads, writes, label, clock at the op)
        self.clock = {s: {t: -1 for t in STREAMS} for s in STREAMS}
        self.events = {}  # (event, step) -> clock snapshot at its latest record

    def push(self, stream, reads, writes, label):
        self.clock[stream][stream] = len(self.ops[stream])
        self.ops[stream].append((reads, writes, label, dict(self.clock[stream])))
        return (stream, len(self.ops[stream]) - 1)

    def snapshot(self, stream):
        return dict(self.clock[stream])

    def join(self, stream, other):
        for t in STREAMS:
            self.clock[stream][t] = max(self.clock[stream][t], other[t])

    def precedes(self, a, b):
        """Op a = (stream, index) is ordered before op b."""
        return self.ops[b[0]][b[1]][3][a[0]] >= a[1] if a[0] != b[0] else a[1] < b[1]

    def unordered_conflicts(self):
        def overlap(x, y):
            return x[0] == y[0] and x[1] < y[2] and y[1] < x[2]

        bad = []
        for si, sa in enumerate(STREAMS):  # pairs on different streams only (one stream orders its own ops)
            for sb in STREAMS[si + 1:]:
                for ia, (ra, wa, la, _) in enumerate(self.ops[sa]):
                    for ib, (rb, wb, lb, _) in enumerate(self.ops[sb]):
                        if not (any(overlap(x, y) for x in wa for y in rb + wb)
                                or any(overlap(x, y) for x in ra for y in wb)):
                            continue
                        if not (self.precedes((sa, ia), (sb, ib)) or self.precedes((sb, ib), (sa, ia))):
                            bad.append((la, lb))
        return bad


def _spans(plan):
    """Byte ranges of the data ("d"), the workspace ("w"), scale ("x" 0-4) and found_inf ("x" 4-8)."""
    T = ITEMSIZE[plan["dtype"]]
    W = ITEMSIZE[plan["wire"]] if plan["wire"] >= 0 else T
    recv_off = plan["recv_offset_bytes"]

    def span(buf, off, count):
        if buf == 0:
            return ("d", off * T, (off + count) * T)
        base = 0 if buf == 1 else recv_off
        return ("w", base + off * W, base + (off + count) * W)

    return span


def _run_call(rp, plan, schedule, call, found, drop=None, remap=None):
    """Replays one call's schedule into rp; returns (first op per stream of the call, keep-alive clock or None).
    `drop`: index of a schedule op to leave out (mutation check)."""
    span = _spans(plan)
    first = {}
    alive = None
    scale, found_inf = ("x", 0, 4), ("x", 4, 8)
    for k, (action, stream, event, step) in enumerate(schedule):
        if k == drop:
            continue
        stream = (remap or {}).get(stream, stream)
        key = (event, step if event in (TRANSFER, REDUCE) else -1)
        if action == RECORD:
            rp.events[key] = rp.snapshot(stream)
        elif action == WAIT:
            if key in rp.events:  # a dropped record leaves the previous call's record (or none) in place
                rp.join(stream, rp.events[key])
        elif action == KEEP_ALIVE:
            alive = rp.snapshot(stream)
        elif action == TRANSFERS:
            _, transfers, _ = plan["steps"][step]
            op = rp.push(stream, [span(b, o, c) for send, _, b, o, c in transfers if send],
                         [span(b, o, c) for send, _, b, o, c in transfers if not send], f"call{call} T{step}")
            first.setdefault(stream, op[1])
        elif action == REDUCTIONS:
            for count, inputs, out, final, _, wire_out, check_inf in plan["steps"][step][2]:
                reads = [span(b, o, count) for b, o in inputs] + ([scale] if final and found else [])
                writes = [span(out[0], out[1], count)] + ([span(wire_out[0], wire_out[1], count)] if wire_out else [])
                if check_inf and found:
                    writes.append(found_inf)
                op = rp.push(stream, reads, writes, f"call{call} R{step}")
                first.setdefault(stream, op[1])
    return first, alive


def _violations(plan, sched_sync, sched_async, found, sync, drop=None, drop_work_wait=False, remap=None):
    """Both scenarios for one plan; returns a list of what went wrong (empty when the schedule is right)."""
    schedule = sched_sync if sync else sched_async
    everything = [("d", 0, 1 << 62), ("x", 0, 8)]
    problems = []
    # Scenario 1: earlier work, two calls in a row (same tensor, same workspace block), later work, wait, use.
    rp = _Replay()
    rp.push("S", [], everything, "caller produces the data")
    works = []
    for call in (1, 2):
        first, _ = _run_call(rp, plan, schedule, call, found, drop, remap)
        probe = rp.push("S", [], [], f"caller's work after call {call}")
        if sync:
            # Ordered after every transfer and reduction of the call: the caller may use the result now.
            rp.ops["S"][-1] = ([], everything, f"caller uses the result of call {call}", rp.ops["S"][-1][3])
        else:
            for stream, index in first.items():
                if rp.precedes((stream, index), probe):
                    problems.append(f"the caller's work after async call {call} waits for its {stream} op {index}")
            works.append(call)
    if not sync and not drop_work_wait:
        for _ in works:  # Work.wait(): the current stream waits for the future's event, recorded on R after done
            rp.join("S", rp.events.get((DONE, -1), {t: -1 for t in STREAMS}))
    if not sync:
        rp.push("S", [], everything, "caller uses the result after wait()")
    problems += [f"unordered: {a} / {b}" for a, b in rp.unordered_conflicts()]
    # Scenario 2: the caller frees data, scale and found_inf right after the call returns (async: before wait()).
    # The caching allocator reuses a block on S once the events of its recorded streams (the keep-alive on R)
    # have completed; a sync call needs none (S waited for done).
    rp = _Replay()
    rp.push("S", [], everything, "caller produces the data")
    _, alive = _run_call(rp, plan, schedule, 1, found, drop, remap)
    if alive is not None:
        rp.join("S", alive)
    rp.push("S", [], everything, "allocator reuses the freed blocks")
    problems += [f"unordered after release: {a} / {b}" for a, b in rp.unordered_conflicts()]
    return problems


def _plan(numel, dtype, wire, n, rank, algorithm, found, final, chunk):
    import paracomm._C as C

    p = C.all_reduce_plan(numel, dtype, wire, n, rank, algorithm, "nccl", found, final, chunk)
    return dict(p, dtype=dtype, wire=wire)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_schedule_orders_every_conflict_and_leaves_the_caller_free(waits_lib, n, algorithm):
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
                        sched_sync = _schedule(waits_lib, *args, True)
                        sched_async = _schedule(waits_lib, *args, False)
                        # Nothing of the call runs on the caller's stream: S only records start (and waits in a
                        # synchronous call).
                        for sched in (sched_sync, sched_async):
                            assert all(st != "S" or (a, e) in ((RECORD, START), (WAIT, DONE))
                                       for a, st, e, _ in sched), args
                        assert bool(sched_sync) == bool(sched_async) == any(st[1] or st[2] for st in plan["steps"])
                        if sched_sync:
                            assert (WAIT, "S", DONE, -1) in sched_sync and (WAIT, "S", DONE, -1) not in sched_async
                            assert (KEEP_ALIVE, "R", 0, -1) in sched_async
                        for sync in (True, False):
                            problems = _violations(plan, sched_sync, sched_async, found, sync)
                            assert not problems, f"{args} sync={sync}: {problems[:5]}"
                        checked += 1
    assert checked > 0


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_replay_catches_any_dropped_wait_record_or_keep_alive(waits_lib, algorithm):
    """Dropping a wait, record or keep-alive of the schedule (or Work.wait's wait) is caught: some conflicting pair
    is left unordered. The first six per-step waits and records of each kind are caught on their own; every kind
    of op (per-step or call protocol: start, begin, end, done, keep-alive) in at least one of the plans and modes
    tried (a few are redundant in some plans, e.g. `begin` when the first transfer group already waits for a
    reduction, or a late all-gather wait that C's own order already covers)."""
    uncaught = set()
    caught = set()
    for args in ((50007, 0, 1, 4, 1, algorithm, True, True, 4096), (50007, 0, -1, 4, 2, algorithm, True, True, 4096),
                 (1000, 0, -1, 3, 0, algorithm, False, False, 0)):
        plan = _plan(*args)
        sched_sync = _schedule(waits_lib, *args, True)
        sched_async = _schedule(waits_lib, *args, False)
        found = args[6]
        for sync in (True, False):
            sched = sched_sync if sync else sched_async
            assert not _violations(plan, sched_sync, sched_async, found, sync)
            seen = {}
            for k, (action, stream, event, step) in enumerate(sched):
                if action not in (RECORD, WAIT, KEEP_ALIVE):
                    continue
                hit = bool(_violations(plan, sched_sync, sched_async, found, sync, drop=k))
                seen[(action, event)] = seen.get((action, event), 0) + 1
                if event in (TRANSFER, REDUCE) and seen[(action, event)] <= 6:
                    assert hit, (args, sync, sched[k])
                if hit:
                    caught.add((action, stream, event))
                else:
                    uncaught.add((action, stream, event))
        assert _violations(plan, sched_sync, sched_async, found, False, drop_work_wait=True), args
    assert uncaught <= caught, f"never caught: {sorted(uncaught - caught)}"
    protocol = {(RECORD, "S", START), (WAIT, "R", START), (RECORD, "R", BEGIN), (WAIT, "C", BEGIN),
                (RECORD, "R", DONE), (WAIT, "S", DONE), (KEEP_ALIVE, "R", 0)}
    if algorithm != "one_shot":  # one_shot ends with a reduction that already waited for the last group
        protocol |= {(RECORD, "C", END), (WAIT, "R", END)}
    assert caught >= protocol, sorted(caught)


def test_replay_flags_reductions_on_the_caller_stream(waits_lib):
    """The design this schedule replaced ran the reductions on the caller's stream: the replay must see that an
    async call then blocks the caller's later work (the check is not vacuous)."""
    for algorithm in ALGORITHMS:
        args = (50007, 0, -1, 4, 1, algorithm, False, False, 0)
        plan = _plan(*args)
        sched_sync = _schedule(waits_lib, *args, True)
        sched_async = _schedule(waits_lib, *args, False)
        assert not _violations(plan, sched_sync, sched_async, False, False)
        problems = _violations(plan, sched_sync, sched_async, False, False, remap={"R": "S"})
        assert any("waits for" in p for p in problems), (algorithm, problems[:3])
