"""The ring schedule (csrc/ring/schedule.cpp), simulated for every rank in Python.

Each element carries a bitmask of the ranks whose input it contains. Ops run in lock step (op i on every
rank, sends first, as the executors do: op i's send only reads data produced by op send_after < i), and the
checks are those the executors rely on: transfers pair up, every contribution is added exactly once, each
segment is completed once by its owner, and every rank ends with every owner's final values.
"""
import numpy as np
import pytest

from paracomm import _C

RS = _C.RingPhase.REDUCE_SCATTER
AG = _C.RingPhase.ALL_GATHER

PRIMES = [7, 13, 97, 1009]


def _numels(n):
    return sorted({0, 1, max(n - 1, 0), n, n + 1, 2 * n + 1, *PRIMES, 10_000})


def _simulate(n, numel, chunk_elems):
    """Run the schedule of every rank; return the per-rank ops after checking every invariant."""
    ops = [_C.ring_schedule(n, r, numel, chunk_elems) for r in range(n)]
    full = (1 << n) - 1
    if n == 1 or numel == 0:
        assert all(len(o) == 0 for o in ops)
        return ops

    # Geometry: segments tile [0, numel) in order, sizes differ by at most one.
    segs = [_C.ring_segment(n, numel, s) for s in range(n)]
    assert segs[0][0] == 0 and sum(size for _, size in segs) == numel
    for (o0, s0), (o1, _) in zip(segs, segs[1:]):
        assert o1 == o0 + s0
    assert max(s for _, s in segs) - min(s for _, s in segs) <= 1
    largest = max(s for _, s in segs)
    chunks = -(-largest // chunk_elems)

    # Every rank executes the same number of ops: 2 (N-1) steps of `chunks` chunks.
    for r in range(n):
        assert len(ops[r]) == 2 * (n - 1) * chunks

    data = [np.full(numel, 1 << r, dtype=np.int64) for r in range(n)]  # contributions held by each rank
    wire_mask = [d.copy() for d in data]  # what a rank sends (its latest value of each element)
    finalized_by = np.full(numel, -1, dtype=np.int64)  # rank that completed each element
    final_rank_of = [np.full(numel, -1, dtype=np.int64) for _ in range(n)]  # whose final bits a rank holds

    for i in range(len(ops[0])):
        sent = []
        for r in range(n):
            op, nxt = ops[r][i], ops[(r + 1) % n][i]
            # Pairing: what r sends in op i is what r+1 receives in op i.
            assert op.send_count == nxt.recv_count and op.send_offset == nxt.recv_offset
            assert op.send_segment == nxt.recv_segment
            assert op.send_count >= 0 and op.recv_count >= 0
            assert 0 <= op.send_offset <= numel and op.send_offset + op.send_count <= numel
            assert 0 <= op.recv_offset <= numel and op.recv_offset + op.recv_count <= numel
            assert op.step == (i // chunks) % (n - 1) and op.chunk == i % chunks
            assert op.phase == (RS if i < (n - 1) * chunks else AG)
            assert op.final_reduce == (op.phase == RS and op.step == n - 2)
            # Dependencies: reduce-scatter step 0 sends the input; later ops send what op send_after produced.
            if op.phase == RS and op.step == 0:
                assert op.send_after == -1
            else:
                assert 0 <= op.send_after < i
                producer = ops[r][op.send_after]
                assert producer.recv_offset == op.send_offset and producer.recv_count == op.send_count
                assert producer.recv_segment == op.send_segment
            s = slice(op.send_offset, op.send_offset + op.send_count)
            sent.append((wire_mask[r][s].copy(), final_rank_of[r][s].copy()))
        for r in range(n):
            op = ops[r][i]
            prev_mask, prev_final = sent[(r - 1) % n]
            assert len(prev_mask) == op.recv_count
            if op.recv_count == 0:
                continue
            rr = slice(op.recv_offset, op.recv_offset + op.recv_count)
            if op.phase == RS:
                # Exactly once: the incoming partial sum never overlaps what this rank already holds.
                assert not np.any(prev_mask & data[r][rr])
                data[r][rr] |= prev_mask
                wire_mask[r][rr] = data[r][rr]
                if op.final_reduce:
                    assert op.recv_segment == _C.ring_owned_segment(n, r)
                    assert np.all(data[r][rr] == full)
                    assert np.all(finalized_by[rr] == -1)  # completed exactly once, by one rank
                    finalized_by[rr] = r
                    final_rank_of[r][rr] = r
            else:
                assert np.all(prev_mask == full)
                assert np.all(prev_final == finalized_by[rr])  # a copy of the owner's final bits
                data[r][rr] = prev_mask
                wire_mask[r][rr] = prev_mask
                final_rank_of[r][rr] = prev_final

    for s in range(n):
        off, size = segs[s]
        owner = (s - 1) % n
        assert _C.ring_owned_segment(n, owner) == s
        assert np.all(finalized_by[off:off + size] == owner)
    for r in range(n):
        assert np.all(data[r] == full), f"rank {r} lacks contributions"
        assert np.array_equal(final_rank_of[r], finalized_by), f"rank {r} lacks an owner's final values"
    return ops


@pytest.mark.parametrize("num_ranks", list(range(1, 17)))
def test_schedule_invariants(num_ranks):
    for numel in _numels(num_ranks):
        for chunk_elems in (1, 3, 64, 1 << 20):
            # Keep the Python simulation small: at most ~20k ops over all ranks per case.
            largest = -(-numel // num_ranks)
            if num_ranks * 2 * (num_ranks - 1) * -(-largest // chunk_elems) > 20_000:
                continue
            _simulate(num_ranks, numel, chunk_elems)


def test_big_numel_few_chunks():
    _simulate(4, 3_000_017, 1 << 20)
    _simulate(3, 1_000_003, 100_000)


def test_zero_count_ops_are_kept_and_paired():
    # numel < N * chunks: several ranks own empty segments; their ops exist with zero counts.
    ops = _simulate(8, 3, 1)
    counts = [(o.send_count, o.recv_count) for r in range(8) for o in ops[r]]
    assert (0, 0) in counts and any(c != (0, 0) for c in counts)
    ops = _simulate(5, 12, 2)  # segments of 3 and 2 elements: the second chunk of short segments is 1 or 0
    sends = {o.send_count for r in range(5) for o in ops[r]}
    assert sends == {0, 1, 2}


@pytest.mark.parametrize("args, match", [
    ((0, 0, 10, 1), "num_ranks"),
    ((4, -1, 10, 1), "rank"),
    ((4, 4, 10, 1), "rank"),
    ((4, 0, -1, 1), "numel"),
    ((4, 0, 10, 0), "chunk_elems"),
])
def test_bad_arguments_raise(args, match):
    with pytest.raises(RuntimeError, match=f"paracomm: .*{match}"):
        _C.ring_schedule(*args)


def test_bad_segment_arguments_raise():
    with pytest.raises(RuntimeError, match="segment"):
        _C.ring_segment(4, 10, 4)
    with pytest.raises(RuntimeError, match="num_ranks"):
        _C.ring_segment(0, 10, 0)
