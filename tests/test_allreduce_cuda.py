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


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_nccl_matches_torch_bitwise(world_size):
    digests = run_ranks(world_size, _cuda_ranks, backend="cpu:gloo,cuda:nccl", env=NCCL_ENV, timeout=540)
    for r in range(1, world_size):
        assert digests[r] == digests[0]
