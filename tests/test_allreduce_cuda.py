"""paracomm.all_reduce on CUDA tensors over paracomm's NCCL communicator (skipped without a GPU).

Several ranks share the one GPU: each rank gets its own NCCL_HOSTID and traffic goes through the socket
transport (docs/ARCHITECTURE.md, "Several ranks on one GPU"). Integer-valued data, so sums are exact and paracomm must
match torch.distributed.all_reduce (NCCL) bit for bit.
"""
import hashlib
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64]
NCCL_ENV = {"NCCL_SOCKET_IFNAME": "lo", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1"}


def _int_valued(rank, numel, dtype):
    g = torch.Generator().manual_seed(1000 * rank + numel)
    return torch.randint(-8, 9, (numel,), generator=g).to(dtype)


def _digest(t):
    return hashlib.sha256(t.cpu().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _cuda_ranks(rank, world_size):
    os.environ["NCCL_HOSTID"] = f"rank{rank}"  # before any NCCL communicator exists
    import paracomm

    torch.cuda.set_device(0)
    comm = paracomm.Communicator(timeout=timedelta(seconds=120))
    assert comm.backend == "nccl"
    n, dev = world_size, torch.device("cuda", 0)
    digests = {}
    for dtype in DTYPES:
        for numel in (0, 1, n + 1, (1 << 20) + 3, (64 << 20) // dtype.itemsize):
            x = _int_valued(rank, numel, dtype).to(dev)
            ref = x.clone()
            dist.all_reduce(ref)
            for op in ("sum", "avg") if dtype.is_floating_point else ("sum",):
                y = x.clone()
                comm.all_reduce(y, op)
                expected = ref if op == "sum" else ref / n
                assert torch.equal(y, expected), (dtype, numel, op)
                digests[f"{dtype}/{numel}/{op}"] = _digest(y)
    # Compressed wire, scale and found_inf on the device, an async call and its CUDA-aware future.
    x = torch.randn(1 << 20, device=dev, generator=torch.Generator(dev).manual_seed(rank))
    exact = x.double().clone()
    dist.all_reduce(exact)
    for wire in (torch.float16, torch.bfloat16):
        y = x.clone()
        found = torch.zeros(1, device=dev)
        work = comm.all_reduce(y, "avg", wire_dtype=wire, async_op=True, scale=torch.ones(1, device=dev),
                               found_inf=found)
        value = work.get_future().wait()
        assert value is y
        assert work.wait() is y
        torch.cuda.synchronize()
        assert found.item() == 0.0
        assert ((y.double() - exact / n).abs() <= 2e-2 * (exact / n).abs() + 2e-2).all()
        digests[f"wire/{wire}"] = _digest(y)
    # CuPy arrays through __dlpack__.
    import cupy

    a = cupy.asarray(_int_valued(rank, 4097, torch.float32).numpy())
    assert paracomm.all_reduce(a) is a
    expected = sum(_int_valued(r, 4097, torch.float32) for r in range(n))
    assert torch.equal(torch.from_dlpack(a).cpu(), expected)
    return digests


@pytest.mark.parametrize("world_size", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_nccl_matches_torch_bitwise(world_size):
    digests = run_ranks(world_size, _cuda_ranks, backend="cpu:gloo,cuda:nccl", env=NCCL_ENV, timeout=540)
    for r in range(1, world_size):
        assert digests[r] == digests[0]


# ---- stream semantics of torch's WorkNCCL (csrc/allreduce/nccl_executor.h) ---------------------------------------
# Rank 1 joins each call DELAY_S late, so rank 0's call stays pending that long: what rank 0's current stream can
# run meanwhile shows what the call blocks. No timing thresholds: a small kernel finishes in microseconds, the
# call cannot finish before rank 1 joins.
DELAY_S = 3.0


def _ranks_stream_semantics(rank, world_size):
    os.environ["NCCL_HOSTID"] = f"rank{rank}"
    import gc
    import time

    import paracomm

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    comm = paracomm.Communicator(timeout=timedelta(seconds=120))
    n = world_size
    data = [_int_valued(r, (1 << 20) + 5, torch.float32) for r in range(n)]
    expected = sum(data)
    warm = data[rank].to(dev)
    comm.all_reduce(warm)  # connects the peers: later calls enqueue without NCCL setup
    torch.cuda.synchronize()
    out = {}

    def late():
        dist.barrier()
        if rank == 1:
            time.sleep(DELAY_S)

    # 1. async: the caller's stream is free until wait(); wait() orders the then-current stream after the call.
    y = data[rank].to(dev)
    torch.cuda.synchronize()
    late()
    work = comm.all_reduce(y, async_op=True)
    z = torch.ones(16, device=dev) * 2  # later work on the caller's stream
    ev = torch.cuda.Event()
    ev.record()
    t0 = time.monotonic()
    while not ev.query() and time.monotonic() - t0 < 60:
        time.sleep(0.001)
    out["later_work_done_first"] = bool(ev.query()) and (rank != 0 or not work.is_completed())
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert work.wait() is y  # the side stream waits (not the host)
        out["wait_then_use"] = torch.equal(y.cpu(), expected)  # .cpu() on the side stream: ordered after wait()
    out["later_value"] = float(z.sum().item())
    fut = comm.all_reduce(data[rank].to(dev), async_op=True).get_future().then(lambda f: f.value() * 1)
    out["future_then"] = torch.equal(fut.wait().cpu(), expected)

    # 2. sync: the caller's stream waits before the call returns.
    y = data[rank].to(dev)
    torch.cuda.synchronize()
    late()
    comm.all_reduce(y)
    ev = torch.cuda.Event()
    ev.record()
    out["sync_ordered"] = (not ev.query()) if rank == 0 else True
    out["sync_value"] = torch.equal(y.cpu(), expected)

    # 3. rank 0 drops the Work and the tensor before the call is done and reallocates: the freed block is not
    # reused under the call (record_stream keep-alive), so what rank 1 receives from it is intact.
    y = data[rank].to(dev)
    torch.cuda.synchronize()
    late()
    work = comm.all_reduce(y, async_op=True)
    if rank == 0:
        probe = work._done_event
        del work, y
        scribble = [torch.full(((1 << 20) + 5,), 1e6, device=dev) for _ in range(4)]  # same size, same stream
        del scribble
        probe.synchronize()
        out["keep_alive"] = True
    else:
        work.wait()
        out["keep_alive"] = torch.equal(y.cpu(), expected)
    # 4. the Communicator goes away with healthy work pending: destruction waits, nothing aborts.
    y = data[rank].to(dev)
    torch.cuda.synchronize()
    late()
    w = comm.all_reduce(y, async_op=True)
    del comm
    gc.collect()
    w.wait()
    out["del_comm_then_wait"] = torch.equal(y.cpu(), expected)
    # 5. module level, then the process group goes away.
    y = data[rank].to(dev)
    w = paracomm.all_reduce(y, async_op=True)
    dist.destroy_process_group()
    w.wait()
    out["module_then_destroy"] = torch.equal(y.cpu(), expected)
    return out


def test_async_call_leaves_the_stream_free_and_keeps_buffers_alive():
    results = run_ranks(2, _ranks_stream_semantics, backend="cpu:gloo,cuda:nccl", env=NCCL_ENV, timeout=300)
    for rank, out in enumerate(results):
        assert out == {"later_work_done_first": True, "wait_then_use": True, "later_value": 32.0,
                       "future_then": True, "sync_ordered": True, "sync_value": True, "keep_alive": True,
                       "del_comm_then_wait": True, "module_then_destroy": True}, (rank, out)
