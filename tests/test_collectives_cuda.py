"""paracomm.reduce_scatter / all_gather / hierarchical all_reduce on CUDA tensors over paracomm's NCCL executor,
and the NCCL per-call signature check (skipped without a GPU; bench/gpu_check.sh runs them in its test-nccl step).

Several ranks share the one GPU (docs/ARCHITECTURE.md, "Several ranks on one GPU"): each rank gets its own
NCCL_HOSTID and traffic goes through the socket transport. References are independent of paracomm: torch's own
``reduce_scatter_tensor`` / ``all_gather_into_tensor`` over NCCL on the same data (bitwise on integer-valued data,
where every order of summation is exact), and a float64 reduction of every rank's input on random normal data.
"""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks

pytestmark = pytest.mark.cuda

NCCL_ENV = {"NCCL_SOCKET_IFNAME": "lo", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64]
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


def _int_valued(seed, numel, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (numel,), generator=g).to(dtype)


def _normal(seed, numel):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g, dtype=torch.float64)


def _setup(rank, **kwargs):
    os.environ["NCCL_HOSTID"] = f"rank{rank}"  # before any NCCL communicator exists
    import paracomm

    torch.cuda.set_device(0)
    return paracomm, paracomm.Communicator(timeout=timedelta(seconds=120), **kwargs)


def _ranks_match_torch(rank, world_size):
    """Every algorithm x dtype x size: reduce_scatter / all_gather bitwise equal to torch's on integer data,
    sync and async (the async Work's input freed before wait())."""
    paracomm, comm = _setup(rank)
    n, dev = world_size, torch.device("cuda", 0)
    problems = []
    for dtype in DTYPES:
        for numel in (0, 1, 37, 4099, (1 << 20) + 3):
            full = [_int_valued(100 * r + numel, n * numel, dtype) for r in range(n)]
            inp = full[rank].to(dev)
            ref = torch.empty(numel, dtype=dtype, device=dev)
            dist.reduce_scatter_tensor(ref, inp.clone())
            ops = ("sum", "avg") if dtype.is_floating_point else ("sum",)
            for algorithm in ("auto", "ring", "direct", "one_shot"):
                for op in ops:
                    out = torch.full((numel,), 99, dtype=dtype, device=dev)
                    comm.reduce_scatter(out, inp, op, algorithm=algorithm)
                    want = ref if op == "sum" else ref / n
                    if not torch.equal(out, want):
                        problems.append(f"reduce_scatter {dtype} {numel} {algorithm} {op}")
                    if not torch.equal(inp.cpu(), full[rank]):
                        problems.append(f"reduce_scatter {dtype} {numel} {algorithm}: the input was written")
            shard = _int_valued(7 * rank + numel, numel, dtype).to(dev)
            gathered = torch.empty(n * numel, dtype=dtype, device=dev)
            dist.all_gather_into_tensor(gathered, shard)
            for algorithm in ("auto", "ring", "direct"):
                out = torch.full((n * numel,), 99, dtype=dtype, device=dev)
                comm.all_gather(out, shard, algorithm=algorithm)
                if not torch.equal(out, gathered):
                    problems.append(f"all_gather {dtype} {numel} {algorithm}")
                # in place: the input is this rank's segment of the output (FSDP2's layout)
                out = torch.full((n * numel,), 99, dtype=dtype, device=dev)
                out[rank * numel:(rank + 1) * numel] = shard
                comm.all_gather(out, out[rank * numel:(rank + 1) * numel], algorithm=algorithm)
                if not torch.equal(out, gathered):
                    problems.append(f"all_gather in place {dtype} {numel} {algorithm}")
    # async: the caller drops the input before wait(); record_stream keeps its block until the call is done.
    numel = (1 << 20) + 5
    full = [_int_valued(900 + r, n * numel, torch.float32) for r in range(n)]
    ref = sum(f.view(n, numel)[rank] for f in full).to(dev)
    out = torch.empty(numel, device=dev)
    inp = full[rank].to(dev)
    work = comm.reduce_scatter(out, inp, async_op=True)
    del inp
    scribble = [torch.full((n * numel,), 1e6, device=dev) for _ in range(4)]  # same size, same stream
    del scribble
    if work.wait() is not out or not torch.equal(out, ref):
        problems.append("async reduce_scatter with the input freed before wait()")
    out = torch.empty(n * numel, device=dev)
    shard = full[rank][:numel].to(dev)
    work = comm.all_gather(out, shard, async_op=True)
    del shard
    work.wait()
    if not torch.equal(out.cpu(), torch.cat([f[:numel] for f in full])):
        problems.append("async all_gather with the input freed before wait()")
    # The module-level functions take the same path.
    out = torch.empty(numel, device=dev)
    paracomm.reduce_scatter(out, full[rank].to(dev))
    if not torch.equal(out, ref):
        problems.append("paracomm.reduce_scatter (module level)")
    return problems


@pytest.mark.parametrize("world_size", [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                        pytest.param(4, marks=pytest.mark.slow)])
def test_collectives_match_torch_bitwise(world_size):
    results = run_ranks(world_size, _ranks_match_torch, backend="cpu:gloo,cuda:nccl", env=NCCL_ENV, timeout=540)
    problems = [p for r in results for p in r]
    assert not problems, "\n".join(problems[:20])


def _within(got, ref64, mag64, unit, n):
    bound = (n + 3) * unit * mag64 + 1e-300
    return bool(((got.double().cpu() - ref64).abs() <= bound).all())


def _ranks_float64_reference(rank, world_size, node_size):
    """Random normal data: reduce_scatter (fp32, bf16 / fp16 wire), all_gather and, with a node map, the
    hierarchical all_reduce / reduce_scatter / all_gather, each against a float64 reduction."""
    paracomm, comm = _setup(rank, node_size=node_size)
    n, dev = world_size, torch.device("cuda", 0)
    problems = []
    numel = 300_007
    full = [_normal(50 + r, n * numel) for r in range(n)]
    exact = sum(full)
    mag = sum(f.abs() for f in full)
    algorithms = ["auto", "direct", "ring"] + (["hierarchical"] if node_size else [])
    for algorithm in algorithms:
        for wire in (None, torch.bfloat16, torch.float16):
            out = torch.empty(numel, device=dev)
            comm.reduce_scatter(out, full[rank].float().to(dev), "avg", wire_dtype=wire, algorithm=algorithm)
            seg = slice(rank * numel, (rank + 1) * numel)
            unit = UNIT[wire] if wire is not None else UNIT[torch.float32]
            if not _within(out, exact[seg] / n, mag[seg] / n, unit, n):
                problems.append(f"reduce_scatter {algorithm} wire={wire}: outside the float64 bound")
        shard = full[rank][:numel].float().to(dev)
        out = torch.empty(n * numel, device=dev)
        comm.all_gather(out, shard, algorithm=algorithm)
        if not torch.equal(out.cpu(), torch.cat([f[:numel].float() for f in full])):
            problems.append(f"all_gather {algorithm}")
    if node_size:
        x_all = [f[:numel] for f in full]
        ref = sum(x_all) / n
        ref_mag = sum(x.abs() for x in x_all) / n
        for wire in (None, torch.bfloat16):
            x = x_all[rank].float().to(dev)
            found = torch.zeros(1, device=dev)
            work = comm.all_reduce(x, "avg", wire_dtype=wire, algorithm="hierarchical", found_inf=found,
                                   async_op=True)
            work.wait()
            unit = UNIT[wire] if wire is not None else UNIT[torch.float32]
            if not _within(x, ref, ref_mag, unit, n) or found.item() != 0.0:
                problems.append(f"hierarchical all_reduce wire={wire}: outside the float64 bound")
            digests = [None] * n
            dist.all_gather_object(digests, x.cpu().view(torch.int32).sum().item())
            if len(set(digests)) != 1:
                problems.append(f"hierarchical all_reduce wire={wire}: ranks differ")
    return problems


@pytest.mark.parametrize("world_size,node_size", [(2, None), (4, 2), pytest.param(6, 3, marks=pytest.mark.slow)])
def test_collectives_and_hierarchical_against_float64(world_size, node_size):
    results = run_ranks(world_size, _ranks_float64_reference, node_size, backend="cpu:gloo,cuda:nccl",
                        env=NCCL_ENV, timeout=540)
    problems = [p for r in results for p in r]
    assert not problems, "\n".join(problems[:20])


def _ranks_mismatch(rank, world_size, collective):
    """Two signatures both ranks have seen (so the first-sight store handshake is skipped), then each rank calls
    with the other one: the per-call device check makes every rank raise, naming numel."""
    paracomm, comm = _setup(rank)
    dev = torch.device("cuda", 0)
    n = world_size

    def call(numel, async_op):
        if collective == "all_reduce":
            return comm.all_reduce(torch.ones(numel, device=dev), async_op=async_op)
        if collective == "reduce_scatter":
            return comm.reduce_scatter(torch.empty(numel, device=dev), torch.ones(n * numel, device=dev),
                                       async_op=async_op)
        return comm.all_gather(torch.empty(n * numel, device=dev), torch.ones(numel, device=dev),
                               async_op=async_op)

    call(1024, False)
    call(512, False)
    torch.cuda.synchronize()
    try:
        work = call(1024 if rank == 0 else 512, True)
        work.wait()
        torch.cuda.synchronize()
        # A mismatch may also surface at the next call, once the watchdog has seen the record.
        for _ in range(200):
            call(1024, False)
            torch.cuda.synchronize()
        return None
    except RuntimeError as e:
        return str(e)


@pytest.mark.parametrize("collective", ["all_reduce", "reduce_scatter", "all_gather"])
def test_seen_signature_mismatch_raises_on_every_rank(collective):
    results = run_ranks(2, _ranks_mismatch, collective, backend="cpu:gloo,cuda:nccl", env=NCCL_ENV, timeout=300)
    for rank, error in enumerate(results):
        assert error is not None, f"rank {rank} returned without an error"
        assert "different arguments" in error and "numel differs" in error, (rank, error)
