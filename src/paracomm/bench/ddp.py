"""``python -m paracomm.bench ddp``: training step time of a small transformer under DDP, per comm hook.

Every variant trains the same model (a stack of ``torch.nn.TransformerEncoderLayer``, dropout off, the same
seed) on the same per-rank batches in one run, so their step times compare directly:

=====================  ==========================================================================
default                DDP's built-in bucketed all-reduce (no hook)
torch-allreduce        torch's ``default_hooks.allreduce_hook``
torch-fp16             torch's ``default_hooks.fp16_compress_hook``
torch-bf16             torch's ``default_hooks.bf16_compress_hook`` (torch allows it only on CUDA with
                       NCCL >= 2.10; elsewhere left out, and the header says so: "skipped: ...")
paracomm-allreduce     ``paracomm.hooks.allreduce_hook`` (the ring, avg fused into the reduction)
paracomm-fp16          ``paracomm.hooks.fp16_compress_hook``
paracomm-bf16          ``paracomm.hooks.bf16_compress_hook`` (works on gloo too)
ring                   ``paracomm.hooks.fused_hook``, no compression, no scaler
default+scaler         no hook, ``paracomm.amp.GradScaler`` unscaling after backward (reference for the next)
ring-bf16+scaler       ``fused_hook`` with a bf16 wire and the scaler: unscale and inf/nan check happen
                       inside the all-reduce
=====================  ==========================================================================

A step is ``zero_grad``, forward, MSE loss, backward (which runs the hook), optimizer step (SGD); the
scaler variants scale the loss and step through the scaler. The model is fp32 (the hooks compress fp32
gradients). Timing: warm-up steps, then timed steps each after a barrier; the median per rank, then the
slowest rank's. The ``loss`` column (rank 0's loss at the last step) is a sanity check that every variant
trained alike, not a convergence claim.
"""
from __future__ import annotations

import argparse

import torch

from . import launch as launch_mod
from . import report
from .timing import barrier, median, slowest_rank, time_iterations

VARIANTS = ("default", "torch-allreduce", "torch-fp16", "torch-bf16", "paracomm-allreduce", "paracomm-fp16",
            "paracomm-bf16", "ring", "default+scaler", "ring-bf16+scaler")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paracomm-bench ddp",
        description="DDP step time of a small transformer with each comm hook (torch's and paracomm's).")
    g = p.add_argument_group("model and data")
    g.add_argument("--layers", type=int, default=None,
                   help="TransformerEncoderLayers (default 4 on GPU, 2 on CPU)")
    g.add_argument("--d-model", type=int, default=None, help="model width (default 512 on GPU, 128 on CPU)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (default 8 on GPU, 4 on CPU)")
    g.add_argument("--ff", type=int, default=None, help="feed-forward width (default 4 x d-model)")
    g.add_argument("--seq", type=int, default=None, help="sequence length (default 128 on GPU, 32 on CPU)")
    g.add_argument("--batch", type=int, default=8, help="per-rank batch size (default 8)")
    g.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size (default 25)")
    g = p.add_argument_group("runs")
    report.add_iteration_args(g, iters=10, warmup=3, per="variant (a run: one training step)")
    g.add_argument("--variants", default="all", metavar="LIST",
                   help=f"comma-separated subset of: {', '.join(VARIANTS)} (default all that this backend "
                        "supports)")
    launch_mod.add_rank_args(p)
    g = p.add_argument_group("output")
    report.add_json_arg(g)
    return p


def parse_args(argv) -> argparse.Namespace:
    """Parse and cross-check the flags; any error prints the usage and raises SystemExit(2)."""
    p = build_parser()
    args = p.parse_args(argv)
    launch_mod.check_rank_args(p, args)
    # A GPU step is cheap: a larger model keeps it comm-bound enough to compare hooks. On CPU ranks share a
    # few cores, so a small one keeps the whole run within a minute or two.
    gpu = args.device == "cuda"
    for name, on_gpu, on_cpu in (("layers", 4, 2), ("d_model", 512, 128), ("heads", 8, 4), ("seq", 128, 32)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.ff is None:
        args.ff = 4 * args.d_model
    for name in ("layers", "d_model", "heads", "ff", "seq", "batch", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.d_model % args.heads:
        p.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    if args.warmup_iters < 0:
        p.error(f"-w/--warmup_iters must be >= 0, got {args.warmup_iters}")
    if args.bucket_cap_mb <= 0:
        p.error(f"--bucket-cap-mb must be positive, got {args.bucket_cap_mb}")
    if args.variants == "all":
        args.variants = None  # decided per backend on the ranks
    else:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or not names:
            p.error(f"--variants: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(VARIANTS)}")
        # default first, so every other row has its reference when it prints
        args.variants = sorted(dict.fromkeys(names), key=lambda v: v != "default")
    launch_mod.check_output_path(p, args, "json")
    return args


def skipped_variants(backend: str) -> dict:
    """Variants this backend cannot run -> why (printed in the header and stored in the JSON)."""
    skipped = {}
    if not torch_bf16_hook_allowed(backend):
        skipped["torch-bf16"] = ("torch allows its bf16_compress_hook only on CUDA with NCCL >= 2.10 "
                                 f"(this run: {backend}); paracomm-bf16 runs everywhere")
    return skipped


def torch_bf16_hook_allowed(backend: str) -> bool:
    """torch refuses its own ``bf16_compress_hook`` unless the group is NCCL >= 2.10 on a CUDA build."""
    if backend != "nccl":
        return False
    v = torch.cuda.nccl.version()
    return tuple(v) >= (2, 10) if isinstance(v, tuple) else True


def build_model(args, device) -> torch.nn.Module:
    """The benchmark's model: ``args.layers`` encoder layers (batch first, no dropout) and a linear head."""
    layers = [torch.nn.TransformerEncoderLayer(args.d_model, args.heads, dim_feedforward=args.ff, dropout=0.0,
                                               batch_first=True) for _ in range(args.layers)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(args.d_model, args.d_model)).to(device)


def _register(ddp, variant: str, device):
    """Register ``variant``'s hook on ``ddp``; returns the scaler it steps with (or None)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as th

    if variant == "default":
        return None
    if variant == "torch-allreduce":
        ddp.register_comm_hook(None, th.allreduce_hook)
        return None
    if variant == "torch-fp16":
        ddp.register_comm_hook(None, th.fp16_compress_hook)
        return None
    if variant == "torch-bf16":
        ddp.register_comm_hook(None, th.bf16_compress_hook)
        return None

    from paracomm.amp import GradScaler

    if variant == "default+scaler":
        return GradScaler(device.type)

    from paracomm import hooks

    if variant == "paracomm-allreduce":
        ddp.register_comm_hook(None, hooks.allreduce_hook)
        return None
    if variant == "paracomm-fp16":
        ddp.register_comm_hook(None, hooks.fp16_compress_hook)
        return None
    if variant == "paracomm-bf16":
        ddp.register_comm_hook(None, hooks.bf16_compress_hook)
        return None
    if variant == "ring":
        ddp.register_comm_hook(hooks.FusedHookState(), hooks.fused_hook)
        return None
    if variant == "ring-bf16+scaler":
        scaler = GradScaler(device.type)
        ddp.register_comm_hook(hooks.FusedHookState(wire_dtype=torch.bfloat16, scaler=scaler), hooks.fused_hook)
        return scaler
    raise ValueError(f"unknown variant {variant!r}")


def measure_variant(ctx, args, variant: str, batches) -> dict:
    """Build a fresh DDP model with ``variant``'s hook, train it, and return its timing row (every rank)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = ctx.device
    torch.manual_seed(0)  # the same initial weights for every variant (DDP broadcasts rank 0's anyway)
    model = build_model(args, device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              bucket_cap_mb=args.bucket_cap_mb)
    scaler = _register(ddp, variant, device)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)
    losses = []

    def step(i):
        x, target = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(ddp(x), target)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(loss.detach())

    times = time_iterations(step, device=device, warmup=args.warmup_iters, iters=args.iters,
                            before_each=lambda: barrier(device))
    seconds = slowest_rank(median(times), device)
    del ddp, model, opt
    return {"variant": variant, "step_ms": seconds * 1e3,
            "samples_per_s": args.batch * ctx.world_size / seconds,
            "loss": float(losses[-1])}


def run_rank(ctx, args) -> int:
    """The DDP benchmark on one rank; rank 0 prints each variant's row as soon as it is measured."""
    variants = args.variants
    skipped = skipped_variants(ctx.backend)
    if variants is None:
        variants = [v for v in VARIANTS if v not in skipped]
    else:
        asked = [v for v in variants if v in skipped]
        if asked:
            raise RuntimeError("; ".join(f"--variants {v}: {skipped[v]}" for v in asked))
        skipped = {}  # the user chose the variants: nothing was left out behind their back
    gen = torch.Generator(device=ctx.device).manual_seed(4321 + ctx.rank)  # each rank its own data shard
    shape = (args.batch, args.seq, args.d_model)
    batches = [(torch.randn(shape, generator=gen, device=ctx.device),
                torch.randn(shape, generator=gen, device=ctx.device)) for _ in range(4)]
    lead = ctx.rank == 0
    header = launch_mod.run_header(ctx)
    n_params = sum(p.numel() for p in build_model(args, torch.device("cpu")).parameters())
    header["model"] = {"layers": args.layers, "d_model": args.d_model, "heads": args.heads, "ff": args.ff,
                       "seq": args.seq, "batch_per_rank": args.batch, "params": n_params,
                       "grad_mb_fp32": n_params * 4 / 2**20, "bucket_cap_mb": args.bucket_cap_mb}
    header["settings"] = {"iters": args.iters, "warmup_iters": args.warmup_iters, "optimizer": "SGD(momentum)"}
    header["skipped"] = skipped
    fmt = "{:>20} {:>11} {:>10} {:>13} {:>12}"
    if lead:
        m = header["model"]
        print("\n".join([
            "# paracomm DDP step-time benchmark",
            f"#  world size {header['world_size']} ({header['launcher']}), backend {header['backend']}: "
            f"{header['backend_version']}",
            f"#  device: {header['device']}",
            f"#  paracomm {header['paracomm'].get('version')} (cuda build {header['paracomm'].get('cuda')})",
            f"#  model: {m['layers']} x TransformerEncoderLayer(d_model={m['d_model']}, heads={m['heads']}, "
            f"ff={m['ff']}) + Linear, {m['params'] / 1e6:.2f} M params ({m['grad_mb_fp32']:.1f} MB of fp32 "
            f"grads), batch {m['batch_per_rank']} x seq {m['seq']} per rank, buckets {m['bucket_cap_mb']} MB",
            f"#  step: median of {args.iters} after {args.warmup_iters} warm-up, slowest rank; "
            "vs default = default step time / this step time",
        ] + [f"#  skipped: {v}: {why}" for v, why in skipped.items()] + [
            "#",
            "#" + fmt.format("variant", "step (ms)", "vs default", "samples/s", "loss (last)")[1:],
        ]), flush=True)
    rows = []
    for variant in variants:
        row = measure_variant(ctx, args, variant, batches)
        rows.append(row)
        ref = next((r for r in rows if r["variant"] == "default"), None)
        row["vs_default"] = ref["step_ms"] / row["step_ms"] if ref is not None else None
        if lead:
            print(fmt.format(variant, f"{row['step_ms']:.2f}",
                             "-" if row["vs_default"] is None else f"{row['vs_default']:.2f}",
                             f"{row['samples_per_s']:.1f}", f"{row['loss']:.5f}"), flush=True)
    if lead:
        report.write_json(args.json, "ddp", header, rows)
    return 0


def main(argv=None) -> int:
    """Entry point for ``python -m paracomm.bench ddp``; returns the exit code (2 for bad flags)."""
    return launch_mod.run_mode(parse_args, run_rank, argv)
