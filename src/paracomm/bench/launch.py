"""Start the ranks of a benchmark: under torchrun, or by spawning local processes.

Two ways in, one per-rank path:

* **torchrun** (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``): this process is one rank; the process group starts from the environment (``env://``).
* **self-launch**: ``--nproc N`` local processes (``multiprocessing`` spawn), joined through a ``file://``
  rendezvous in a fresh temporary directory. The parent only waits: if a rank fails, the others are given a
  moment and then killed, so a dead peer cannot leave the run hanging.

Device placement. With CUDA, rank ``local_rank`` uses GPU ``local_rank // ranks_per_gpu``. NCCL refuses two
ranks on one GPU, so with ``ranks_per_gpu > 1`` every rank gets its own ``NCCL_HOSTID`` and the socket
transport over loopback (P2P, SHM and IB off) before NCCL starts: each rank then looks like its own node
(docs/ARCHITECTURE.md, "Several ranks on one GPU"). That transport is slow; it is for correctness and for
paracomm-vs-NCCL ratios on the same transport, not for absolute figures.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
MAX_DEFAULT_CPU_RANKS = 4  # default CPU ranks: one per core, at least 2, at most this many


@dataclasses.dataclass(frozen=True)
class RankContext:
    """What a benchmark's per-rank function knows about its place in the run."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str           # "gloo" | "nccl"
    ranks_per_gpu: int
    launcher: str          # "torchrun" | "spawn"


def under_torchrun() -> bool:
    """True when the environment names this process's rank (torchrun, or a cluster launcher that mimics it)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def resolve_device_kind(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``. Raises ValueError for cuda without a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {device!r}")
    return device


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def add_rank_args(parser) -> None:
    """The flags every benchmark mode shares for placing its ranks: --nproc, --ranks-per-gpu, --device, --timeout."""
    g = parser.add_argument_group("ranks")
    g.add_argument("--nproc", type=int, default=None,
                   help="local ranks to spawn (ignored under torchrun; default: one per GPU times "
                        f"--ranks-per-gpu; on CPU one per core, at least 2, at most {MAX_DEFAULT_CPU_RANKS}: "
                        f"{default_cpu_ranks()} here)")
    g.add_argument("--ranks-per-gpu", type=int, default=1, metavar="K",
                   help="K ranks share each GPU (NCCL over loopback sockets; slow, for ratios)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA/NCCL when a GPU is visible, else CPU/gloo")
    g.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="process-group timeout: a stuck collective fails its rank (default 300)")


def check_rank_args(parser, args) -> None:
    """Resolve ``args.device`` ("auto" -> "cpu"/"cuda") and refuse bad rank flags through ``parser.error``
    (usage message, exit status 2)."""
    try:
        args.device = resolve_device_kind(args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.nproc is not None and args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    if args.ranks_per_gpu < 1:
        parser.error(f"--ranks-per-gpu must be at least 1, got {args.ranks_per_gpu}")
    if args.ranks_per_gpu > 1 and args.device != "cuda":
        parser.error("--ranks-per-gpu needs CUDA (on CPU, use --nproc)")
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    if args.device == "cuda" and not under_torchrun():
        problem = gpu_rank_problem(args.nproc, args.ranks_per_gpu, torch.cuda.device_count())
        if problem:
            parser.error(problem)


def gpu_rank_problem(nproc: int | None, ranks_per_gpu: int, device_count: int) -> str | None:
    """Why ``nproc`` ranks at ``ranks_per_gpu`` per GPU do not fit on ``device_count`` GPUs, with the flags that
    would (rank r runs on GPU r // ranks_per_gpu); None when they fit or ``nproc`` is left to the default."""
    if nproc is None or nproc <= device_count * ranks_per_gpu:
        return None
    gpus = "1 GPU is" if device_count == 1 else f"{device_count} GPUs are"
    per = -(-nproc // max(device_count, 1))
    return (f"--nproc {nproc} needs {-(-nproc // ranks_per_gpu)} GPUs at --ranks-per-gpu {ranks_per_gpu} "
            f"(rank r runs on GPU r // ranks-per-gpu), but {gpus} visible: pass --nproc "
            f"{device_count * ranks_per_gpu} or fewer, or --ranks-per-gpu {per} to put {per} ranks on each GPU "
            "(NCCL over loopback sockets), or --device cpu")


def check_output_path(parser, args, flag: str) -> None:
    """Make ``args.<flag>`` absolute and refuse it now, not after the whole run, if its directory is missing."""
    path = getattr(args, flag)
    if path is None:
        return
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.dirname(path)):
        parser.error(f"--{flag} {getattr(args, flag)}: directory {os.path.dirname(path)} does not exist")
    setattr(args, flag, path)


def default_cpu_ranks() -> int:
    """CPU ranks when ``--nproc`` is not given: one per core, at least 2 (an all-reduce needs a peer), at most
    MAX_DEFAULT_CPU_RANKS. More ranks than cores time the scheduler, not the all-reduce: ratios then jump
    from size to size."""
    return max(2, min(cpu_cores(), MAX_DEFAULT_CPU_RANKS))


def default_nproc(device_kind: str, ranks_per_gpu: int) -> int:
    """One rank per GPU (times ``ranks_per_gpu``) with CUDA; :func:`default_cpu_ranks` CPU ranks without."""
    if device_kind == "cuda":
        return torch.cuda.device_count() * ranks_per_gpu
    return default_cpu_ranks()


def multi_rank_gpu_env(rank: int) -> dict:
    """Environment that lets NCCL accept several ranks on one GPU: each rank poses as its own host."""
    return {
        "NCCL_HOSTID": f"rank{rank}",
        "NCCL_SOCKET_IFNAME": "lo",
        "NCCL_P2P_DISABLE": "1",
        "NCCL_SHM_DISABLE": "1",
        "NCCL_IB_DISABLE": "1",
    }


def _run_rank(worker: Callable[[RankContext, Any], int], args: Any, *, rank: int, world_size: int,
              local_rank: int, local_world_size: int, device_kind: str, ranks_per_gpu: int,
              init_method: str, timeout_s: float, launcher: str) -> int:
    """Set up this rank (environment, device, process group), run ``worker``, tear down; returns its code."""
    import torch.distributed as dist

    if device_kind == "cuda":
        if ranks_per_gpu > 1:
            # Must precede the first NCCL communicator: NCCL reads these once, at init.
            os.environ.update(multi_rank_gpu_env(rank))
        gpu = local_rank // ranks_per_gpu
        if gpu >= torch.cuda.device_count():
            problem = gpu_rank_problem(local_world_size, ranks_per_gpu, torch.cuda.device_count())
            raise RuntimeError(f"rank {rank} (local rank {local_rank}) would run on cuda:{gpu}: "
                               + (problem or f"only {torch.cuda.device_count()} GPUs are visible"))
        device = torch.device("cuda", gpu)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # Ranks on one host share its cores; oversubscribing intra-op threads only adds contention.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))
    kwargs = dict(backend=backend, init_method=init_method, timeout=timedelta(seconds=timeout_s))
    if init_method != "env://":
        kwargs.update(rank=rank, world_size=world_size)
    dist.init_process_group(**kwargs)
    ctx = RankContext(rank=rank, world_size=dist.get_world_size(), local_rank=local_rank,
                      local_world_size=local_world_size, device=device, backend=backend,
                      ranks_per_gpu=ranks_per_gpu, launcher=launcher)
    try:
        return int(worker(ctx, args) or 0)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (teardown after a failure must not mask it)
            pass


def _spawned_entry(worker, args, rank, world_size, device_kind, ranks_per_gpu, init_method, timeout_s):
    try:
        code = _run_rank(worker, args, rank=rank, world_size=world_size, local_rank=rank,
                         local_world_size=world_size, device_kind=device_kind, ranks_per_gpu=ranks_per_gpu,
                         init_method=init_method, timeout_s=timeout_s, launcher="spawn")
    except BaseException:  # noqa: BLE001  (report everything, including KeyboardInterrupt)
        sys.stderr.write(f"[rank {rank}] failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        code = 1
    sys.stdout.flush()
    sys.exit(code)


def launch(worker: Callable[[RankContext, Any], int], args: Any, *, nproc: int | None, device: str = "auto",
           ranks_per_gpu: int = 1, timeout_s: float = 300.0) -> int:
    """Run ``worker(ctx, args)`` on every rank; returns the process exit code (0 when every rank returned 0).

    Under torchrun this process is one rank and ``nproc`` is ignored (torchrun decides). Otherwise ``nproc``
    processes are spawned (``None``: :func:`default_nproc`). ``worker`` must be a module-level function and
    ``args`` picklable (spawned processes import the worker by name).

    Args:
        device: ``"auto"``, ``"cpu"`` (gloo) or ``"cuda"`` (NCCL).
        ranks_per_gpu: ranks sharing each GPU (CUDA only; > 1 switches NCCL to per-rank host ids, sockets).
        timeout_s: the process group's timeout: a collective stuck longer than this fails its rank.
    """
    device_kind = resolve_device_kind(device)
    if under_torchrun():
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ["LOCAL_RANK"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        try:
            return _run_rank(worker, args, rank=rank, world_size=int(os.environ["WORLD_SIZE"]),
                             local_rank=local_rank, local_world_size=local_world, device_kind=device_kind,
                             ranks_per_gpu=ranks_per_gpu, init_method="env://", timeout_s=timeout_s,
                             launcher="torchrun")
        except BaseException:  # noqa: BLE001
            sys.stderr.write(f"[rank {rank}] failed:\n{traceback.format_exc()}")
            return 1

    world_size = default_nproc(device_kind, ranks_per_gpu) if nproc is None else nproc
    if world_size < 1:
        raise ValueError(f"nproc: need at least 1 rank, got {world_size}"
                         + (" (no GPU visible)" if device_kind == "cuda" else ""))
    if device_kind == "cuda":
        problem = gpu_rank_problem(world_size, ranks_per_gpu, torch.cuda.device_count())
        if problem:
            raise ValueError(problem)
    ctx = mp.get_context("spawn")
    rdzv_dir = tempfile.mkdtemp(prefix="paracomm_bench_")
    init_method = f"file://{os.path.join(rdzv_dir, 'rendezvous')}"
    procs = [ctx.Process(target=_spawned_entry,
                         args=(worker, args, r, world_size, device_kind, ranks_per_gpu, init_method, timeout_s))
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        return _wait(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(rdzv_dir, ignore_errors=True)


def _wait(procs, grace_s: float = 10.0) -> int:
    """Wait for every rank. Once one fails, the rest get ``grace_s`` to finish (they usually cannot: their
    peer is gone) and are then killed. Returns 0, or the first failing rank's exit code (1 if it was killed)."""
    failed_at = None
    first_code = 0
    while True:
        alive = [p for p in procs if p.is_alive()]
        for p in procs:
            if not p.is_alive() and p.exitcode not in (0, None) and failed_at is None:
                failed_at = time.monotonic()
                first_code = p.exitcode if p.exitcode > 0 else 1
        if not alive:
            return first_code
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for p in alive:
                p.kill()
            for p in alive:
                p.join()
            return first_code
        alive[0].join(timeout=0.2)


def describe_device(device: torch.device) -> str:
    """A human-readable device name: the GPU's name and memory, or the CPU model and core count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        import platform
        model = platform.processor() or model
    return f"{model} ({cpu_cores()} cores)"


def backend_version(backend: str) -> str:
    """``"NCCL 2.x.y"`` (the library torch loaded) or ``"gloo (torch <version>)"``: gloo has no version of its
    own; it is the copy vendored into torch."""
    if backend == "nccl":
        v = torch.cuda.nccl.version()
        return "NCCL " + (".".join(str(x) for x in v) if isinstance(v, tuple) else str(v))
    return f"gloo (bundled with torch {torch.__version__})"


def run_header(ctx: RankContext) -> dict:
    """Facts every benchmark prints and stores: world size, backend and version, device, paracomm build."""
    import paracomm

    from .timing import git_commit, now_iso

    return {
        "world_size": ctx.world_size,
        "launcher": ctx.launcher,
        "backend": ctx.backend,
        "backend_version": backend_version(ctx.backend),
        "device": describe_device(ctx.device),
        "ranks_per_gpu": ctx.ranks_per_gpu if ctx.device.type == "cuda" else None,
        "cpu_cores": cpu_cores(),
        "local_ranks": ctx.local_world_size,
        "torch": torch.__version__,
        "paracomm": paracomm.build_info(),
        "git_commit": git_commit(),
        "date": now_iso(),
    }


def run_mode(parse_args, run_rank, argv=None) -> int:
    """The ``main()`` of a launched benchmark mode: parse ``argv`` (sys.argv[1:] when None) with ``parse_args``
    (which exits through argparse on a bad flag: returned here as its exit code, 2 by default) and run
    ``run_rank`` on the ranks the flags ask for (:func:`launch`). Returns the exit code."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return launch(run_rank, args, nproc=args.nproc, device=args.device, ranks_per_gpu=args.ranks_per_gpu,
                  timeout_s=args.timeout)
