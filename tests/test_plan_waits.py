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
CODES = {"ring": 0, "direct": 1, "one_shot": 2, "hierarchical": 3}
COLLECTIVES = {"all_reduce": 0, "reduce_scatter": 1, "all_gather": 2}
HEADER_WORDS = 16  # kMaxHeaderWords (csrc/kernels/header_check.h): one slot per rank

_SHIM = r"""
#include <cstdio>
#include <cstring>
#include <exception>
#include "allreduce/plan.h"
#include "allreduce/plan_waits.h"
using namespace paracomm;

static PlanSpec make_spec(int collective, long long numel, int dtype, int wire, long long n, long long rank,
                          int algorithm, int has_found_inf, int has_final_op, long long chunk_bytes,
                          const int* node_of, int nodes_len) {
  PlanSpec s;
  s.collective = static_cast<Collective>(collective);
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
  s.node_of.assign(node_of, node_of + nodes_len);
  return s;
}

// out: has_transfers, then per step comm_waits[i], stream_waits[i], record_transfer[i], record_reduce[i].
// Returns the step count, -1 on error, -2 when cap is too small.
extern "C" long long pw_waits(int collective, long long numel, int dtype, int wire, long long n, long long rank,
                              int algorithm, int has_found_inf, int has_final_op, long long chunk_bytes,
                              const int* node_of, int nodes_len, long long* out, long long cap, char* err,
                              int errlen) {
  try {
    const Plan plan = make_plan(make_spec(collective, numel, dtype, wire, n, rank, algorithm, has_found_inf,
                                          has_final_op, chunk_bytes, node_of, nodes_len));
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

// out: per schedule op (action, stream, event, step, with_header). Returns the op count, -1 on error, -2 when
// cap is too small.
extern "C" long long pw_schedule(int collective, long long numel, int dtype, int wire, long long n, long long rank,
                                 int algorithm, int has_found_inf, int has_final_op, long long chunk_bytes,
                                 const int* node_of, int nodes_len, int sync, int header, long long* out,
                                 long long cap, char* err, int errlen) {
  try {
    const Plan plan = make_plan(make_spec(collective, numel, dtype, wire, n, rank, algorithm, has_found_inf,
                                          has_final_op, chunk_bytes, node_of, nodes_len));
    const std::vector<SchedOp> ops = plan_schedule(plan, plan_waits(plan), sync != 0, header != 0);
    const long long k = static_cast<long long>(ops.size());
    if (5 * k > cap) return -2;
    for (long long i = 0; i < k; ++i) {
      out[5 * i] = static_cast<long long>(ops[i].action);
      out[5 * i + 1] = static_cast<long long>(ops[i].stream);
      out[5 * i + 2] = static_cast<long long>(ops[i].event);
      out[5 * i + 3] = ops[i].step;
      out[5 * i + 4] = ops[i].with_header ? 1 : 0;
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
    spec = [ctypes.c_int, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    so.pw_waits.argtypes = spec + [ctypes.POINTER(ctypes.c_longlong), ctypes.c_longlong, ctypes.c_char_p,
                                   ctypes.c_int]
    so.pw_waits.restype = ctypes.c_longlong
    so.pw_schedule.argtypes = spec + [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_longlong),
                                      ctypes.c_longlong, ctypes.c_char_p, ctypes.c_int]
    so.pw_schedule.restype = ctypes.c_longlong
    return so


def _node_array(node_map):
    arr = (ctypes.c_int * max(len(node_map), 1))(*node_map)
    return arr, len(node_map)


def _waits(lib, numel, dtype, wire, n, rank, algorithm, found, final, chunk, collective="all_reduce", node_map=()):
    cap = 1 << 16
    out = (ctypes.c_longlong * cap)()
    err = ctypes.create_string_buffer(1024)
    nodes, nodes_len = _node_array(node_map)
    steps = lib.pw_waits(COLLECTIVES[collective], numel, dtype, wire, n, rank, CODES[algorithm], int(found),
                         int(final), chunk, nodes, nodes_len, out, cap, err, 1024)
    assert steps >= 0, err.value.decode() or f"pw_waits returned {steps}"
    comm_waits = [out[1 + 4 * i] for i in range(steps)]
    stream_waits = [out[2 + 4 * i] for i in range(steps)]
    # Every event a wait refers to is recorded, and no other (the executor skips records nobody waits for).
    recorded_t = {i for i in range(steps) if out[3 + 4 * i]}
    recorded_r = {i for i in range(steps) if out[4 + 4 * i]}
    assert recorded_t == {t for t in stream_waits if t >= 0}
    assert recorded_r == {j for j in comm_waits if j >= 0}
    return bool(out[0]), comm_waits, stream_waits


# plan_waits.h's enums (HEADER_TRANSFERS: a kTransfers op with with_header set, a pseudo action of this test).
RECORD, WAIT, TRANSFERS, REDUCTIONS, KEEP_ALIVE, HEADER_FILL, HEADER_CHECK = range(7)
HEADER_TRANSFERS = 100
STREAMS = ("S", "R", "C")
START, BEGIN, TRANSFER, REDUCE, END, DONE = range(1, 7)


def _schedule(lib, numel, dtype, wire, n, rank, algorithm, found, final, chunk, sync, header=False,
              collective="all_reduce", node_map=()):
    cap = 1 << 18
    out = (ctypes.c_longlong * cap)()
    err = ctypes.create_string_buffer(1024)
    nodes, nodes_len = _node_array(node_map)
    k = lib.pw_schedule(COLLECTIVES[collective], numel, dtype, wire, n, rank, CODES[algorithm], int(found),
                        int(final), chunk, nodes, nodes_len, int(sync), int(header), out, cap, err, 1024)
    assert k >= 0, err.value.decode() or f"pw_schedule returned {k}"
    ops = []
    for i in range(k):
        action = out[5 * i]
        if action == TRANSFERS and out[5 * i + 4]:
            action = HEADER_TRANSFERS
        ops.append((action, STREAMS[out[5 * i + 1]], out[5 * i + 2], out[5 * i + 3]))
    return ops


class _Replay:
    """Vector clocks over S, R and C. An op is (stream, index); clock[s] = the latest op index on stream s that is
    known to precede the stream's next op."""

    def __init__(self):
        self.ops = {s: [] for s in STREAMS}  # (reads, writes, label, clock at the op)
        self.clock = {s: {t: -1 for t in STREAMS} for s in STREAMS}
        self.events = {}  # (event, step) -> clock snapshot at its latest record
        self.header_ops = {}  # call -> {"fill" | "group" | "check": op}

    def header_order(self):
        """Within each call the header is written, then sent and received, then compared: the direction matters
        here (ordered the other way round, the check would read the previous call's headers)."""
        bad = []
        for call, ops in self.header_ops.items():
            if set(ops) != {"fill", "group", "check"}:
                bad.append(f"call{call}: header ops {sorted(ops)}")
            elif not (self.precedes(ops["fill"], ops["group"]) and self.precedes(ops["group"], ops["check"])):
                bad.append(f"call{call}: header fill -> group -> check out of order")
        return bad

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
    """Byte ranges of the output ("d"), the input ("i"), the workspace ("w": kWire, kRecv, kStage at their byte
    offsets), scale ("x" 0-4) and found_inf ("x" 4-8)."""
    T = ITEMSIZE[plan["dtype"]]
    W = ITEMSIZE[plan["wire"]] if plan["wire"] >= 0 else T
    recv_off, stage_off = plan["recv_offset_bytes"], plan["stage_offset_bytes"]

    def span(buf, off, count):
        if buf == 0:
            return ("d", off * T, (off + count) * T)
        if buf == 3:
            return ("i", off * T, (off + count) * T)
        if buf == 4:
            return ("w", stage_off + off * T, stage_off + (off + count) * T)
        base = 0 if buf == 1 else recv_off
        return ("w", base + off * W, base + (off + count) * W)

    return span


def _header_spans(n):
    """The communicator's header slots ("h": the send slot, then one receive row per rank) and the host-mapped
    mismatch record ("m")."""
    row = HEADER_WORDS * 8
    return ("h", 0, row), ("h", row, row * (1 + n)), ("m", 0, 8 + n * row)


def _run_call(rp, plan, schedule, call, found, drop=None, remap=None):
    """Replays one call's schedule into rp; returns (first op per stream of the call, keep-alive clock or None).
    `drop`: index of a schedule op to leave out (mutation check)."""
    span = _spans(plan)
    send_slot, recv_slots, record = _header_spans(plan["world_size"])
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
        elif action == HEADER_FILL:
            op = rp.push(stream, [], [send_slot], f"call{call} header fill")
            rp.header_ops.setdefault(call, {})["fill"] = op
            first.setdefault(stream, op[1])
        elif action == HEADER_CHECK:
            op = rp.push(stream, [recv_slots], [record], f"call{call} header check")
            rp.header_ops.setdefault(call, {})["check"] = op
            first.setdefault(stream, op[1])
        elif action in (TRANSFERS, HEADER_TRANSFERS):
            transfers = plan["steps"][step][1] if step >= 0 else []
            reads = [span(b, o, c) for send, _, b, o, c in transfers if send]
            writes = [span(b, o, c) for send, _, b, o, c in transfers if not send]
            if action == HEADER_TRANSFERS:
                reads.append(send_slot)
                writes.append(recv_slots)
            op = rp.push(stream, reads, writes, f"call{call} T{step}")
            if action == HEADER_TRANSFERS:
                rp.header_ops.setdefault(call, {})["group"] = op
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
    everything = [("d", 0, 1 << 62), ("i", 0, 1 << 62), ("x", 0, 8)]  # the caller's buffers
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
    problems += rp.header_order()
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


def _plan(numel, dtype, wire, n, rank, algorithm, found, final, chunk, collective="all_reduce", node_map=()):
    import paracomm._C as C

    p = C.collective_plan(collective, numel, dtype, wire, n, rank, algorithm, "nccl", found, final, chunk,
                          list(node_map))
    return dict(p, dtype=dtype, wire=wire, world_size=n)


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


# ---- every collective, hierarchical plans, and the per-call signature header ---------------------------------------
def _node_map(sizes):
    """rank -> node for nodes of the given sizes (numbered by first appearance, as hierarchical.h wants)."""
    return [m for m, k in enumerate(sizes) for _ in range(k)]


def _check_schedules(lib, args, collective, node_map, header):
    """One rank's plan: its waits, both schedules (with or without the header) and both replays. Returns the
    number of replays run."""
    numel, dtype, wire, n, rank, algorithm, found, final, chunk = args
    plan = _plan(*args, collective=collective, node_map=node_map)
    where = (collective, node_map, header, args)
    # The input is only ever read: no receive and no reduction output (or wire_out) names kInput (buffer 3).
    for after, transfers, reductions in plan["steps"]:
        assert all(send or b != 3 for send, _, b, _, _ in transfers), where
        assert all(out[0] != 3 and (wire_out is None or wire_out[0] != 3)
                   for _, _, out, _, _, wire_out, _ in reductions), where
    has_transfers, comm_waits, stream_waits = _waits(lib, *args, collective=collective, node_map=node_map)
    assert has_transfers == any(step[1] for step in plan["steps"]), where
    for i, (after, transfers, reductions) in enumerate(plan["steps"]):
        assert comm_waits[i] <= after and (comm_waits[i] < 0 or transfers), (where, i)
        assert stream_waits[i] <= i and (stream_waits[i] < 0 or reductions), (where, i)
    sched_sync = _schedule(lib, *args, True, header, collective, node_map)
    sched_async = _schedule(lib, *args, False, header, collective, node_map)
    for sched in (sched_sync, sched_async):
        assert all(st != "S" or (a, e) in ((RECORD, START), (WAIT, DONE)) for a, st, e, _ in sched), where
        kinds = [a for a, _, _, _ in sched]
        if header and n > 1:
            # One fill before `begin`, one header group (the first group of the call), one check after it.
            assert kinds.count(HEADER_FILL) == kinds.count(HEADER_TRANSFERS) == kinds.count(HEADER_CHECK) == 1
            assert kinds.index(HEADER_FILL) < sched.index((RECORD, "R", BEGIN, -1)), where
            assert HEADER_TRANSFERS in kinds[:kinds.index(TRANSFERS)] if TRANSFERS in kinds else True
            assert kinds.index(HEADER_CHECK) > kinds.index(HEADER_TRANSFERS), where
        else:
            assert not {HEADER_FILL, HEADER_TRANSFERS, HEADER_CHECK} & set(kinds), where
    has_work = any(st[1] or st[2] for st in plan["steps"]) or (header and n > 1)
    assert bool(sched_sync) == bool(sched_async) == has_work, where
    for sync in (True, False):
        problems = _violations(plan, sched_sync, sched_async, found, sync)
        assert not problems, f"{where} sync={sync}: {problems[:5]}"
    return 2


@pytest.mark.parametrize("header", [False, True])
@pytest.mark.parametrize("collective,algorithm", [("reduce_scatter", "ring"), ("reduce_scatter", "direct"),
                                                  ("reduce_scatter", "one_shot"), ("all_gather", "ring"),
                                                  ("all_gather", "direct")])
def test_collective_schedules_order_every_conflict(waits_lib, collective, algorithm, header):
    """reduce_scatter / all_gather plans (out-of-place: kInput read only, kData written), N = 1-8: every
    conflicting pair ordered, the caller free after an async call, the input kept alive until its last read."""
    dtypes = ((0, -1), (0, 2), (2, -1), (5, -1)) if collective == "reduce_scatter" else ((0, -1), (2, -1), (5, -1))
    checked = 0
    for n in (1, 2, 3, 5, 8):
        for dtype, wire in dtypes:
            for numel, chunk in ((0, 0), (1, 0), (1000, 0), (20011, 4096)):
                if True:
                    found = collective == "reduce_scatter" and numel == 1000
                    for rank in sorted({0, n // 2, n - 1}):
                        args = (numel, dtype, wire, n, rank, algorithm, found, found, chunk)
                        checked += _check_schedules(waits_lib, args, collective, (), header)
    assert checked > 0


HIER_LAYOUTS = [(2, 2), (2, 3), (3, 2), (2, 4), (4, 2), (3, 2, 0), (4, 1, 0), (1, 3, 0)]  # trailing 0: uneven


@pytest.mark.parametrize("header", [False, True])
@pytest.mark.parametrize("collective", ["all_reduce", "reduce_scatter", "all_gather"])
def test_hierarchical_schedules_order_every_conflict(waits_lib, collective, header):
    """hierarchical plans over node maps (equal nodes, and uneven ones for the all-reduce), every wire dtype
    (the compressed all-reduce's exact intra-node receives land in kStage), every rank."""
    checked = 0
    for layout in HIER_LAYOUTS:
        if layout[-1] == 0:
            if collective != "all_reduce":
                continue  # reduce_scatter / all_gather take nodes of equal size only
            sizes = list(layout[:-1])
        else:
            sizes = [layout[1]] * layout[0]
        node_map = _node_map(sizes)
        n = len(node_map)
        dtypes = ((0, -1), (2, -1)) if collective == "all_gather" else ((0, -1), (0, 2), (0, 1), (5, -1))
        for k, (dtype, wire) in enumerate(dtypes):
            # Small pieces (many pipelined steps) for the first two dtypes only: the replay is quadratic in ops.
            sizes_chunks = ((1, 0), (5000, 0)) + (((30011, 4096),) if k < 2 else ())
            for numel, chunk in sizes_chunks:
                for rank in sorted({0, n - 1}):
                    found = collective != "all_gather" and numel == 5000
                    args = (numel, dtype, wire, n, rank, "hierarchical", found, found, chunk)
                    checked += _check_schedules(waits_lib, args, collective, node_map, header)
    assert checked > 0


def test_header_schedule_without_a_plan_still_exchanges_headers(waits_lib):
    """numel 0 (an empty plan) with N > 1: the header still travels (a header-only group) so a rank whose
    peers call with more elements finds the mismatch; N = 1 has no peers and no header."""
    for collective in COLLECTIVES:
        args = (0, 0, -1, 3, 1, "direct", False, False, 0)
        plain = _schedule(waits_lib, *args, True, False, collective)
        with_header = _schedule(waits_lib, *args, True, True, collective)
        assert plain == []
        assert (HEADER_TRANSFERS, "C", 0, -1) in with_header and (WAIT, "R", END, -1) in with_header
        plan = _plan(*args, collective=collective)
        for sync in (True, False):
            sched = _schedule(waits_lib, *args, sync, True, collective)
            assert not _violations(plan, sched, sched, False, sync), (collective, sync)
        one = _schedule(waits_lib, 0, 0, -1, 1, 0, "direct", False, False, 0, True, True, collective)
        assert one == []


@pytest.mark.parametrize("collective,algorithm,node_map", [
    ("all_reduce", "ring", ()), ("all_reduce", "one_shot", ()), ("reduce_scatter", "direct", ()),
    ("all_gather", "direct", ()), ("all_gather", "ring", ()), ("all_reduce", "hierarchical", (0, 0, 1, 1))])
def test_replay_catches_a_misplaced_header_check_or_a_dropped_header_wait(waits_lib, collective, algorithm,
                                                                          node_map):
    """The header ops are really checked: a check moved before the header group's completion (right after the
    fill), or the fill moved after `begin`, or any dropped wait/record of a header schedule, leaves a conflict
    on the header slots (or on the data) unordered -- in some plan and mode for every kind of op."""
    n = len(node_map) or 4
    args = (20011, 0, -1, n, 1, algorithm, False, False, 4096)
    plan = _plan(*args, collective=collective, node_map=node_map)
    for sync in (True, False):
        sched = _schedule(waits_lib, *args, sync, True, collective, node_map)
        assert not _violations(plan, sched, sched, False, sync)
        kinds = [a for a, _, _, _ in sched]
        check = sched[kinds.index(HEADER_CHECK)]
        early = [op for op in sched if op != check]
        early.insert(kinds.index(HEADER_FILL) + 1, check)
        assert any("header" in p for p in _violations(plan, early, early, False, sync)), (collective, sync)
        fill = sched[kinds.index(HEADER_FILL)]
        late = [op for op in sched if op != fill]
        late.insert(late.index((WAIT, "C", BEGIN, -1)) + 1, (HEADER_FILL, "C", 0, -1))  # on C, after begin
        assert not _violations(plan, late, late, False, sync)  # C's own order still serialises it
        late_r = [op for op in sched if op != fill]
        late_r.insert(late_r.index((RECORD, "R", BEGIN, -1)) + 1, fill)  # on R, after begin: races the group
        assert any("header" in p for p in _violations(plan, late_r, late_r, False, sync)), (collective, sync)
        dropped = 0
        for k, (action, stream, event, step) in enumerate(sched):
            if action in (RECORD, WAIT) and _violations(plan, sched, sched, False, sync, drop=k):
                dropped += 1
        assert dropped > 0
