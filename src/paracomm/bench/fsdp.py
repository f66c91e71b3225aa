"""``python -m paracomm.bench fsdp``: step time and final loss of a small transformer under FSDP2, with torch's
collectives and with paracomm's, on the same ranks in one run.

=================  =======================================================================================
torch              FSDP2's own reduce-scatter and all-gather (torch.distributed on the group's backend)
paracomm           ``paracomm.fsdp.use_paracomm(model, all_gather=True)``: both collectives on paracomm, fp32
paracomm-bf16      the same with ``wire_dtype=torch.bfloat16``: gradients travel in bf16, summed in fp32
torch-hsdp         torch's own HSDP: ``fully_shard(mesh=(2 replicas) x (world / 2 shards))``
paracomm-hsdp      the same HSDP from paracomm: 1-D FSDP over the shard dim with ``use_paracomm(all_gather=True)``
                   and ``all_reduce_hook`` averaging over the replicas (tests/test_fsdp_combos.py: the parameters
                   equal torch's HSDP run); its "vs torch" is against the torch-hsdp row
=================  =======================================================================================

The two HSDP rows need an even world size (at 2 ranks the shard dim has one rank: pure replication); "all"
leaves them out otherwise.

Every variant trains the same model (``layers`` x ``TransformerEncoderLayer``, dropout off, one ``fully_shard``
per layer and one at the root, the same seed) on the same per-rank batches with SGD. Timing: warm-up steps,
then timed steps each after a barrier; the median per rank, then the slowest rank's. ``loss`` is rank 0's
loss at the last step (a check that the variants train alike, not a convergence claim).

:func:`train` is also what tests/test_fsdp.py runs (with more knobs: mixed precision, gradient accumulation,
divide factor, forced sum reduction, reshard_after_forward).
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch

from . import launch as launch_mod
from . import report
from .timing import barrier, median, slowest_rank, time_iterations

VARIANTS = ("torch", "paracomm", "paracomm-bf16", "torch-hsdp", "paracomm-hsdp")
HSDP_VARIANTS = ("torch-hsdp", "paracomm-hsdp")


class Net(torch.nn.Module):
    """``layers`` encoder layers (batch first, no dropout) between an input projection and a linear head."""

    def __init__(self, layers: int, d_model: int, heads: int, ff: int, d_in: int = 16):
        super().__init__()
        self.inp = torch.nn.Linear(d_in, d_model)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=ff, dropout=0.0, batch_first=True)
            for _ in range(layers))
        self.out = torch.nn.Linear(d_model, 1)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h).mean(dim=1).squeeze(-1)


def batches_for(rank: int, count: int, batch: int, seq: int, d_in: int = 16, device="cpu") -> list:
    """``count`` (input, target) batches of this rank's data shard (seeded by rank)."""
    g = torch.Generator().manual_seed(4321 + rank)
    return [(torch.randn(batch, seq, d_in, generator=g).to(device), torch.randn(batch, generator=g).to(device))
            for _ in range(count)]


def train(*, steps: int, layers: int = 2, d_model: int = 32, heads: int = 4, ff: int = 64, seq: int = 8,
          batch: int = 4, lr: float = 0.05, comms: str = "torch", wire_dtype=None, mp_policy=None,
          reshard_after_forward: bool = True, divide_factor: Optional[float] = None, force_sum: bool = False,
          accumulate: int = 1, reduce_scatter_comm=None, device="cpu", scaler=None, fuse_scaler: bool = False,
          data_hook: Optional[Callable[[int, list], None]] = None,
          step_hook: Optional[Callable[[], None]] = None, time_steps: Optional[tuple] = None,
          mesh=None, offload_policy=None, all_reduce_hook: Optional[Callable[[torch.Tensor], None]] = None,
          unshard_async: bool = False) -> dict:
    """Train :class:`Net` under FSDP2 on this rank (the process group must be up) and report.

    Args:
        comms: "torch" (FSDP2's own collectives), "paracomm" (use_paracomm, reduce-scatter and all-gather),
            "paracomm-rs" (reduce-scatter only).
        wire_dtype: paracomm's reduce-scatter wire dtype. mp_policy: a MixedPrecisionPolicy or None.
        divide_factor / force_sum: ``set_gradient_divide_factor`` / ``set_force_sum_reduction_for_comms``.
        accumulate: micro-batches per step; all but the last with ``set_requires_gradient_sync(False)``.
        reduce_scatter_comm: a custom ReduceScatter to install instead (tests use a recording one).
        scaler: a GradScaler to step through (loss scaled, ``scaler.step`` / ``update``); ``fuse_scaler``:
            hand it to use_paracomm (the unscale and check happen in the reduce-scatter).
        data_hook: ``data_hook(step, batches)`` may alter this rank's batches before the run (tests: inject
            a nan).
        time_steps: (warmup, iters): time the steps instead (the result then has ``step_ms``).
        mesh: the DeviceMesh for ``fully_shard`` (None: the default group; a 2-D (replicate, shard) mesh: HSDP).
        offload_policy: ``fully_shard``'s offload_policy (e.g. ``CPUOffloadPolicy(pin_memory=False)``).
        all_reduce_hook: installed on every FSDP unit with ``set_all_reduce_hook`` (after the reduce-scatter in
            1-D FSDP, after the replicas' all-reduce in HSDP).
        unshard_async: before each forward, ``unshard(async_op=True)`` every FSDP unit (all-gathers in flight
            together; FSDP2 waits on each one's Work before the unit's forward).

    Returns:
        dict: ``losses`` (per step, this rank), ``params`` (full parameters after training, float64 copies),
        ``units`` (FSDP units configured by use_paracomm, or 0), ``step_ms`` when timed.
    """
    from torch.distributed.fsdp import fully_shard

    from paracomm.fsdp import use_paracomm

    torch.manual_seed(0)  # the same initial weights on every rank and for every variant
    model = Net(layers, d_model, heads, ff).to(device)
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if mesh is not None:
        kwargs["mesh"] = mesh
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    units = 0
    if comms in ("paracomm", "paracomm-rs"):
        units = use_paracomm(model, all_gather=comms == "paracomm", wire_dtype=wire_dtype,
                             scaler=scaler if fuse_scaler else None)
    elif comms != "torch":
        raise ValueError(f"train: comms must be 'torch', 'paracomm' or 'paracomm-rs', got {comms!r}")
    if reduce_scatter_comm is not None:
        for m in model.modules():
            if hasattr(m, "set_custom_reduce_scatter"):
                m.set_custom_reduce_scatter(reduce_scatter_comm)
    units_all = [m for m in model.modules() if hasattr(m, "set_gradient_divide_factor")]  # the FSDP units
    for m in units_all:
        if divide_factor is not None:
            m.set_gradient_divide_factor(divide_factor)
        if force_sum:
            m.set_force_sum_reduction_for_comms(True)
        if all_reduce_hook is not None:
            m.set_all_reduce_hook(all_reduce_hook)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rank = torch.distributed.get_rank()
    data = batches_for(rank, max(steps, 1) * accumulate, batch, seq, device=device)
    if data_hook is not None:
        data_hook(rank, data)
    losses, scales = [], []

    def step(i):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        if unshard_async:
            handles = [m.unshard(async_op=True) for m in units_all]  # noqa: F841  (FSDP2 waits on them)
        for k in range(accumulate):
            x, y = data[(i * accumulate + k) % len(data)]
            model.set_requires_gradient_sync(k == accumulate - 1)
            loss = torch.nn.functional.mse_loss(model(x).float(), y) / accumulate
            (loss if scaler is None else scaler.scale(loss)).backward()
            total += float(loss.detach())
        if scaler is None:
            opt.step()
        else:
            scales.append(float(scaler.get_scale()))
            scaler.step(opt)
            scaler.update()
        losses.append(total)
        if step_hook is not None:
            step_hook()

    result = {"units": units}
    if time_steps is None:
        for i in range(steps):
            step(i)
    else:
        dev = torch.device(device)
        times = time_iterations(step, device=dev, warmup=time_steps[0], iters=time_steps[1],
                                before_each=lambda: barrier(dev))
        result["step_ms"] = slowest_rank(median(times), dev) * 1e3
    result["losses"] = losses
    result["scales"] = scales
    # What paracomm's Comm objects ran (FSDP2 keeps them on its param groups): reduce-scatters, those with the
    # AMP fusion, all-gathers and those issued async. 0 for torch's own comms (they keep no counts).
    groups = [g for m in model.modules() if hasattr(m, "_get_fsdp_state")
              for g in m._get_fsdp_state()._fsdp_param_groups]
    for key, attr, counter in (("rs_calls", "_reduce_scatter_comm", "calls"),
                               ("fused_calls", "_reduce_scatter_comm", "fused_calls"),
                               ("ag_calls", "_all_gather_comm", "calls"),
                               ("ag_async_calls", "_all_gather_comm", "async_calls")):
        result[key] = sum(getattr(getattr(g, attr, None), counter, 0) for g in groups)
    result["params"] = [p.full_tensor().detach().double().cpu() for p in model.parameters()]
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paracomm-bench fsdp",
        description="FSDP2 step time and final loss of a small transformer: torch's collectives vs paracomm's.")
    g = p.add_argument_group("model and data")
    g.add_argument("--layers", type=int, default=2, help="TransformerEncoderLayers (default 2)")
    g.add_argument("--d-model", type=int, default=128, help="model width (default 128)")
    g.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    g.add_argument("--ff", type=int, default=None, help="feed-forward width (default 4 x d-model)")
    g.add_argument("--seq", type=int, default=32, help="sequence length (default 32)")
    g.add_argument("--batch", type=int, default=8, help="per-rank batch size (default 8)")
    g.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    g = p.add_argument_group("runs")
    report.add_iteration_args(g, iters=10, warmup=3, per="variant (a run: one training step)")
    g.add_argument("--variants", default="all", metavar="LIST",
                   help=f"comma-separated subset of: {', '.join(VARIANTS)} (default all)")
    launch_mod.add_rank_args(p)
    g = p.add_argument_group("output")
    report.add_json_arg(g)
    return p


def parse_args(argv) -> argparse.Namespace:
    """Parse and cross-check the flags; any error prints the usage and raises SystemExit(2)."""
    p = build_parser()
    args = p.parse_args(argv)
    launch_mod.check_rank_args(p, args)
    if args.ff is None:
        args.ff = 4 * args.d_model
    for name in ("layers", "d_model", "heads", "ff", "seq", "batch", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_iters < 0:
        p.error("--warmup_iters must be >= 0")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    if args.d_model % args.heads:
        p.error("--d-model must be a multiple of --heads")
    if args.variants == "all":
        args.variants = list(VARIANTS)
    else:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in args.variants if v not in VARIANTS]
        if bad or not args.variants:
            p.error(f"--variants: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(VARIANTS)}")
    if args.device == "cuda":
        p.error("--device cuda: paracomm's reduce-scatter / all-gather serve CPU tensors only so far")
    launch_mod.check_output_path(p, args, "json")
    return args


def run_rank(ctx, args) -> int:
    """The FSDP benchmark on one rank; rank 0 prints each variant's row as soon as it is measured."""
    lead = ctx.rank == 0
    header = launch_mod.run_header(ctx)
    n_params = sum(p.numel() for p in Net(args.layers, args.d_model, args.heads, args.ff).parameters())
    header["model"] = {"layers": args.layers, "d_model": args.d_model, "heads": args.heads, "ff": args.ff,
                       "seq": args.seq, "batch_per_rank": args.batch, "params": n_params}
    header["settings"] = {"iters": args.iters, "warmup_iters": args.warmup_iters, "optimizer": f"SGD(lr={args.lr})"}
    fmt = "{:>16} {:>11} {:>9} {:>14}"
    if lead:
        m = header["model"]
        print("\n".join([
            "# paracomm FSDP2 step-time benchmark",
            f"#  world size {header['world_size']} ({header['launcher']}), backend {header['backend']}: "
            f"{header['backend_version']}",
            f"#  device: {header['device']}",
            f"#  model: {m['layers']} x TransformerEncoderLayer(d_model={m['d_model']}, heads={m['heads']}, "
            f"ff={m['ff']}), {m['params'] / 1e6:.2f} M params, fully_shard per layer + root, batch "
            f"{m['batch_per_rank']} x seq {m['seq']} per rank",
            f"#  step: median of {args.iters} after {args.warmup_iters} warm-up, slowest rank; "
            "vs torch = torch step time / this step time (HSDP rows: torch-hsdp's)",
            "#",
            "#" + fmt.format("variant", "step (ms)", "vs torch", "loss (last)")[1:],
        ]), flush=True)
    rows = []
    variants = list(args.variants)
    if ctx.world_size % 2:
        skipped = [v for v in variants if v in HSDP_VARIANTS]
        variants = [v for v in variants if v not in HSDP_VARIANTS]
        if lead and skipped:
            print(f"# skipped {', '.join(skipped)}: HSDP needs an even world size (2 replicas), got "
                  f"{ctx.world_size}", flush=True)
    mesh = None
    if any(v in HSDP_VARIANTS for v in variants):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(ctx.device.type, (2, ctx.world_size // 2), mesh_dim_names=("replicate", "shard"))
        header["hsdp_mesh"] = {"replicate": 2, "shard": ctx.world_size // 2}
    for variant in variants:
        comms = "torch" if variant.startswith("torch") else "paracomm"
        wire = torch.bfloat16 if variant == "paracomm-bf16" else None
        extra = {}
        if variant == "torch-hsdp":
            extra = {"mesh": mesh}
        elif variant == "paracomm-hsdp":
            from paracomm.fsdp import all_reduce_hook

            extra = {"mesh": mesh["shard"], "all_reduce_hook": all_reduce_hook(group=mesh.get_group("replicate"))}
        r = train(steps=args.warmup_iters + args.iters, layers=args.layers, d_model=args.d_model,
                  heads=args.heads, ff=args.ff, seq=args.seq, batch=args.batch, lr=args.lr, comms=comms,
                  wire_dtype=wire,
                  device=ctx.device, time_steps=(args.warmup_iters, args.iters), **extra)
        row = {"variant": variant, "step_ms": r["step_ms"], "loss": r["losses"][-1]}
        baseline = "torch-hsdp" if variant in HSDP_VARIANTS else "torch"
        ref = next((x for x in rows if x["variant"] == baseline), None)
        row["vs_torch"] = ref["step_ms"] / row["step_ms"] if ref is not None else None
        rows.append(row)
        if lead:
            print(fmt.format(variant, f"{row['step_ms']:.2f}",
                             "-" if row["vs_torch"] is None else f"{row['vs_torch']:.2f}",
                             f"{row['loss']:.6f}"), flush=True)
    if lead:
        report.write_json(args.json, "fsdp", header, rows)
    return 0


def main(argv=None) -> int:
    """Entry point for ``python -m paracomm.bench fsdp``; returns the exit code (2 for bad flags)."""
    return launch_mod.run_mode(parse_args, run_rank, argv)
