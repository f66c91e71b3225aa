"""paracomm.hooks against the torch hooks they replace: DDP training on real gloo process groups.

Every rank trains the same small MLP with DDP and several buckets (a tiny bucket_cap_mb) on its own data, once
with torch's hook and once with paracomm's, and returns its parameters; the test compares them across
implementations (fp32: 1e-6; compressed wires: a bound from the wire dtype's rounding) and across ranks
(bitwise). All cases of one kind share one multi-process run: spawning ranks costs seconds, training is fast.
"""
import math

import pytest
from datetime import timedelta
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as torch_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from paracomm import hooks
from dist_utils import run_ranks

STEPS = 10
LR = 0.05
BUCKET_CAP_MB = 4096 / 2**20  # 4 KiB: the MLP's ~23 KiB of parameters fall into several buckets


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 48), torch.nn.Tanh(),
        torch.nn.Linear(48, 48), torch.nn.Tanh(),
        torch.nn.Linear(48, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 8),
    )


def _batch(rank, step, poison=False):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(12, 16, generator=g)
    y = torch.randn(12, 8, generator=g)
    if poison:
        x[3, 5] = float("inf")  # the forward turns it into inf/nan gradients
    return x, y


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _portable(obj):
    """Tensors as numpy arrays: a tensor sent back through a multiprocessing queue would point into the
    exiting rank's shared memory."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_portable(v) for v in obj)
    return obj


def _tensors(obj):
    """The inverse of _portable, in the test process."""
    if hasattr(obj, "__array__") and not isinstance(obj, (list, tuple, dict)):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v) for v in obj)
    return obj


def _renamed(fn, name):
    """torch's bf16 hooks under another __name__: DDP refuses the originals without CUDA + NCCL."""
    def hook(state, bucket):
        return fn(state, bucket)
    hook.__name__ = hook.__qualname__ = name
    return hook


def _train(rank, state, hook):
    """10 SGD-with-momentum steps of DDP with ``hook`` (None: DDP's built-in all-reduce); the final params."""
    model = _mlp()
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    for step in range(STEPS):
        x, y = _batch(rank, step)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rebuilt = ddp._get_ddp_logging_data().get("rebuilt_bucket_sizes", "")
    return _flat_params(model), len(rebuilt.split(",")) if rebuilt else 0


def _deprecated_state():
    import warnings

    from paracomm import hooks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = hooks.RingHookState()
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert isinstance(state, hooks.FusedHookState)
    return state


def _hook_cases(rank, world_size):
    world_copy = dist.new_group(list(range(world_size)))  # a ProcessGroup as the hooks' state
    torch_bf16 = _renamed(torch_hooks.bf16_compress_hook, "torch_bf16_hook")
    torch_bf16_wrapped = _renamed(torch_hooks.bf16_compress_wrapper(torch_hooks.allreduce_hook), "torch_bf16_wrap")
    cases = {
        "reference": (None, None),  # DDP's own all-reduce
        "torch.allreduce": (None, torch_hooks.allreduce_hook),
        "torch.fp16": (None, torch_hooks.fp16_compress_hook),
        "torch.bf16": (None, torch_bf16),
        "torch.fp16_wrapper": (None, torch_hooks.fp16_compress_wrapper(torch_hooks.allreduce_hook)),
        "torch.bf16_wrapper": (None, torch_bf16_wrapped),
        "allreduce": (None, hooks.allreduce_hook),
        "allreduce.group": (world_copy, hooks.allreduce_hook),
        "fp16": (None, hooks.fp16_compress_hook),
        "bf16": (world_copy, hooks.bf16_compress_hook),
        "fp16_wrapper": (None, hooks.fp16_compress_wrapper(hooks.allreduce_hook)),
        "bf16_wrapper": (None, hooks.bf16_compress_wrapper(hooks.allreduce_hook)),
        # The wrappers' general path (any inner hook): cast the bucket, run the hook, copy back.
        "fp16_wrapper.torch_inner": (None, hooks.fp16_compress_wrapper(torch_hooks.allreduce_hook)),
        "bf16_wrapper.ring_inner": (hooks.FusedHookState(), hooks.bf16_compress_wrapper(hooks.fused_hook)),
        "ring": (hooks.FusedHookState(), hooks.fused_hook),
        "ring.group": (hooks.FusedHookState(world_copy), hooks.fused_hook),
        "ring.direct": (hooks.FusedHookState(algorithm="direct"), hooks.fused_hook),
        "ring.one_shot": (hooks.FusedHookState(algorithm="one_shot"), hooks.fused_hook),
        "ring.fp16": (hooks.FusedHookState(wire_dtype=torch.float16), hooks.fused_hook),
        "ring.bf16": (hooks.FusedHookState(wire_dtype=torch.bfloat16), hooks.fused_hook),
        # The deprecated names still work (and run the same all-reduce).
        "ring.alias": (_deprecated_state(), hooks.ring_hook),
    }
    out = {name: _train(rank, state, hook) for name, (state, hook) in cases.items()}
    init = _flat_params(_mlp())
    return _portable({"init": init, "num_buckets": {name: n for name, (_, n) in out.items()},
                      **{name: params for name, (params, _) in out.items()}})


@pytest.fixture(scope="module")
def hook_results():
    return _tensors(run_ranks(3, _hook_cases, timeout=240))


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_bf16_hooks_have_names_ddp_accepts_without_nccl():
    assert hooks.bf16_compress_hook.__name__ == "paracomm_bf16_compress_hook"
    assert hooks.bf16_compress_wrapper(hooks.allreduce_hook).__name__ == "paracomm_bf16_compress_wrapper_hook"
    assert hooks.fp16_compress_wrapper(hooks.allreduce_hook).__name__ == "fp16_compress_wrapper_hook"


def test_ranks_never_diverge(hook_results):
    names = [k for k in hook_results[0] if k not in ("init", "num_buckets")]
    assert len(names) == 21
    for name in names:
        for rank in range(1, len(hook_results)):
            assert torch.equal(hook_results[rank][name], hook_results[0][name]), (name, rank)


def test_training_moved_the_parameters_through_several_buckets(hook_results):
    r = hook_results[0]
    assert all(n >= 3 for n in r["num_buckets"].values()), r["num_buckets"]
    assert _max_diff(r["reference"], r["init"]) > 0.05  # the comparisons below are not between idle models


@pytest.mark.parametrize("name", ["allreduce", "allreduce.group", "ring", "ring.group", "ring.direct",
                                  "ring.one_shot", "ring.alias"])
def test_fp32_hooks_match_torch_allreduce(hook_results, name):
    r = hook_results[0]
    assert _max_diff(r["torch.allreduce"], r["reference"]) <= 1e-6
    assert _max_diff(r[name], r["torch.allreduce"]) <= 1e-6, name


def test_wrapper_around_a_torch_hook_matches_torch_wrapper(hook_results):
    # Same casts, same gloo float16 all-reduce: the general wrapper path agrees with torch's wrapper.
    r = hook_results[0]
    assert _max_diff(r["fp16_wrapper.torch_inner"], r["torch.fp16_wrapper"]) <= 1e-6


# paracomm name -> (torch counterpart, wire dtype)
_COMPRESSED = {
    "fp16": ("torch.fp16", torch.float16),
    "bf16": ("torch.bf16", torch.bfloat16),
    "fp16_wrapper": ("torch.fp16_wrapper", torch.float16),
    "bf16_wrapper": ("torch.bf16_wrapper", torch.bfloat16),
    "bf16_wrapper.ring_inner": ("torch.bf16_wrapper", torch.bfloat16),
    "ring.fp16": ("torch.fp16", torch.float16),
    "ring.bf16": ("torch.bf16", torch.bfloat16),
}


@pytest.mark.parametrize("name", sorted(_COMPRESSED))
def test_compressed_hooks_within_wire_rounding(hook_results, name):
    """Every gradient is rounded to the wire dtype a few times (unit roundoff u = eps/2 each).

    Over the run the parameters move by ``movement``; relative gradient errors of a few u then move them by at
    most a few u * movement. The bound allows 8 u * movement against torch's compressed hook and against the
    fp32 reference, and torch's own hook must satisfy the same bound (so it is not vacuous or too tight).
    """
    r = hook_results[0]
    torch_name, wire = _COMPRESSED[name]
    u = torch.finfo(wire).eps / 2
    movement = (r["reference"] - r["init"]).abs().max().item()
    bound = 8 * u * movement
    torch_err = _max_diff(r[torch_name], r["reference"])
    assert 0 < torch_err <= bound, (torch_name, torch_err, bound)
    assert 0 < _max_diff(r[name], r["reference"]) <= bound, name
    assert _max_diff(r[name], r[torch_name]) <= bound, name


# ------------------------------------------------------------------------------------------------------------
# ring_hook with a scaler against torch's DDP + GradScaler, with injected infs
# ------------------------------------------------------------------------------------------------------------

# (step, rank) pairs whose batch holds an inf: the all-reduce spreads the nan/inf to every rank.
_POISON = {(2, 1), (3, 0), (7, 1)}
_SCALER_ARGS = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=2)


def _scaled_train(rank, scaler, state, hook):
    model = _mlp()
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    skipped, scales, grad_norms = [], [], []
    for step in range(STEPS):
        x, y = _batch(rank, step, poison=(step, rank) in _POISON)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # after the hook unscaled: must not unscale again
        grad_norms.append(torch.nn.utils.clip_grad_norm_(ddp.parameters(), max_norm=1.0).item())
        before = _flat_params(model)
        scaler.step(opt)
        scaler.update()
        skipped.append(torch.equal(before, _flat_params(model)))
        scales.append(scaler.get_scale())
    return _flat_params(model), skipped, scales, grad_norms


def _scaler_cases(rank, world_size):
    from paracomm.amp import GradScaler

    out = {"torch": _scaled_train(rank, torch.amp.GradScaler("cpu", **_SCALER_ARGS), None, None)}
    for name, wire in (("ring", None), ("ring.bf16", torch.bfloat16)):
        scaler = GradScaler("cpu", **_SCALER_ARGS)
        out[name] = _scaled_train(rank, scaler, hooks.FusedHookState(wire_dtype=wire, scaler=scaler), hooks.fused_hook)
    return _portable(out)


def test_ring_hook_with_scaler_skips_like_torch():
    results = _tensors(run_ranks(2, _scaler_cases, timeout=180))
    ref_params, ref_skipped, ref_scales, ref_norms = results[0]["torch"]
    assert ref_skipped == [any(s == step for s, _ in _POISON) for step in range(STEPS)]
    for name, tol in (("ring", 1e-6), ("ring.bf16", None)):
        params, skipped, scales, norms = results[0][name]
        assert skipped == ref_skipped, name
        assert scales == ref_scales, name
        finite = [i for i in range(STEPS) if not ref_skipped[i]]
        if tol is None:  # bf16 wire: gradient norms and parameters within bf16 rounding
            u = torch.finfo(torch.bfloat16).eps / 2
            for i in finite:
                assert math.isclose(norms[i], ref_norms[i], rel_tol=8 * u), (name, i)
            tol = 8 * u * (ref_params - _flat_params(_mlp())).abs().max().item()
        else:
            for i in finite:
                assert math.isclose(norms[i], ref_norms[i], rel_tol=1e-5), (name, i)
        assert _max_diff(params, ref_params) <= tol, name
        for rank in range(1, len(results)):
            assert torch.equal(results[rank][name][0], params), (name, rank)


# ------------------------------------------------------------------------------------------------------------
# Bad arguments (no process group needed: everything is checked before the first collective)
# ------------------------------------------------------------------------------------------------------------


def test_ring_hook_state_refuses_bad_arguments():
    with pytest.raises(TypeError, match="process_group"):
        hooks.FusedHookState("world")
    with pytest.raises(TypeError, match="wire_dtype"):
        hooks.FusedHookState(wire_dtype="bf16")
    with pytest.raises(ValueError, match="wire_dtype"):
        hooks.FusedHookState(wire_dtype=torch.float32)
    with pytest.raises(ValueError, match="wire_dtype"):
        hooks.FusedHookState(wire_dtype=torch.int8)
    with pytest.raises(TypeError, match="scaler.*paracomm.amp.GradScaler"):
        hooks.FusedHookState(scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="scaler"):
        hooks.FusedHookState(scaler=object())
    with pytest.raises(TypeError):
        hooks.FusedHookState(None, torch.float16)  # wire_dtype is keyword-only
    with pytest.raises(ValueError, match="algorithm"):
        hooks.FusedHookState(algorithm="two_shot")
    with pytest.raises(TypeError, match="algorithm"):
        hooks.FusedHookState(algorithm=1)
    with pytest.raises(TypeError, match="timeout"):
        hooks.FusedHookState(timeout=30)
    with pytest.raises(ValueError, match="timeout"):
        hooks.FusedHookState(timeout=timedelta(seconds=-1))
    state = hooks.FusedHookState(wire_dtype=torch.bfloat16)
    assert state.wire_dtype is torch.bfloat16 and state.process_group is None and state.scaler is None
    assert state.algorithm is None and hooks.FusedHookState(algorithm="direct").algorithm == "direct"


def test_hooks_refuse_bad_state_and_wrappers_refuse_non_callables():
    for hook in (hooks.allreduce_hook, hooks.fp16_compress_hook, hooks.bf16_compress_hook):
        with pytest.raises(TypeError, match="ProcessGroup"):
            hook("world", None)
    with pytest.raises(TypeError, match="FusedHookState"):
        hooks.fused_hook(None, None)
    for wrapper in (hooks.fp16_compress_wrapper, hooks.bf16_compress_wrapper):
        with pytest.raises(TypeError, match="hook must be a callable"):
            wrapper("allreduce")


# ------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): DDP over NCCL at world size 1, every hook trains and matches DDP's own
# all-reduce (at world size 1 the average is the gradient itself, up to the wire's rounding).
# ------------------------------------------------------------------------------------------------------------


def _cuda_cases(rank, world_size):
    from paracomm.amp import GradScaler

    torch.cuda.set_device(0)
    out = {}

    def train(state, hook, scaler=None):
        model = _mlp().cuda()
        ddp = DDP(model, device_ids=[0], bucket_cap_mb=BUCKET_CAP_MB)
        if hook is not None:
            ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
        for step in range(STEPS):
            x, y = (t.cuda() for t in _batch(rank, step))
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return _flat_params(model).cpu()

    out["reference"] = train(None, None)
    out["allreduce"] = train(None, hooks.allreduce_hook)
    out["fp16"] = train(None, hooks.fp16_compress_hook)
    out["bf16"] = train(None, hooks.bf16_compress_hook)
    out["fp16_wrapper"] = train(None, hooks.fp16_compress_wrapper(hooks.allreduce_hook))
    out["bf16_wrapper"] = train(None, hooks.bf16_compress_wrapper(hooks.allreduce_hook))
    out["ring.bf16"] = train(hooks.FusedHookState(wire_dtype=torch.bfloat16), hooks.fused_hook)
    scaler = GradScaler("cuda", init_scale=2.0**10)
    out["ring.scaler"] = train(hooks.FusedHookState(scaler=scaler), hooks.fused_hook, scaler)
    out["init"] = _flat_params(_mlp())
    return _portable(out)


@pytest.mark.cuda
def test_every_hook_trains_on_cuda_over_nccl():
    r = _tensors(run_ranks(1, _cuda_cases, backend="nccl", timeout=300)[0])
    movement = (r["reference"] - r["init"]).abs().max().item()
    assert movement > 0.05
    for name in ("allreduce", "ring.scaler"):
        assert _max_diff(r[name], r["reference"]) <= 1e-5, name
    for name, wire in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp16_wrapper", torch.float16),
                       ("bf16_wrapper", torch.bfloat16), ("ring.bf16", torch.bfloat16)):
        assert _max_diff(r[name], r["reference"]) <= 8 * torch.finfo(wire).eps * movement, name


# ------------------------------------------------------------------------------------------------------------
# Sparse gradients (nn.Embedding(sparse=True)) and failures, through real DDP on gloo
# ------------------------------------------------------------------------------------------------------------


class _SparseNet(torch.nn.Module):
    """An embedding with sparse gradients (DDP gives it a bucket of its own), with or without a dense head
    (whose bucket then goes through paracomm's all-reduce while the sparse one goes through torch's)."""

    def __init__(self, dense_head=True):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(40, 4, sparse=True)
        self.head = torch.nn.Linear(4, 4) if dense_head else torch.nn.Identity()

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


def _sparse_train(rank, state, hook, dense_head):
    model = _SparseNet(dense_head)
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)  # plain SGD: it accepts sparse gradients
    for step in range(6):
        g = torch.Generator().manual_seed(100 * rank + step)
        idx = torch.randint(0, 40, (10, 3), generator=g)  # each rank touches different rows
        y = torch.randn(10, 3, 4, generator=g)
        loss = torch.nn.functional.mse_loss(ddp(idx), y)
        opt.zero_grad()
        loss.backward()
        assert model.emb.weight.grad.is_sparse
        opt.step()
    return _flat_params(model)


class _FailedWork:
    """What an async all-reduce that failed hands back: its future completes with the error."""

    def __init__(self, tensor, how):
        error = RuntimeError("paracomm.all_reduce (rank 0 of 2): injected failure: a peer died")
        fut = torch.futures.Future()
        if how == "python":  # Future.set_exception: the error is the future's value on the C++ side
            fut.set_exception(error)
        else:  # failed inside a callback: the C++ future itself holds the error
            def fail(_):
                raise error
            done = torch.futures.Future()
            done.set_result(tensor)
            fut = done.then(fail)
        self._fut = fut

    def get_future(self):
        return self._fut

    def wait(self):
        return self._fut.wait()


def _failing_ddp_step(rank, hook, state, how):
    """One DDP step whose paracomm all-reduce fails on every rank (so no collective is left waiting)."""
    import paracomm.comm

    def failing_all_reduce(*args, **kwargs):
        return _FailedWork(args[0] if isinstance(args[0], torch.Tensor) else args[1], how)

    saved = (hooks.all_reduce, paracomm.comm.Communicator.all_reduce)
    hooks.all_reduce = failing_all_reduce
    paracomm.comm.Communicator.all_reduce = lambda self, tensor, *a, **k: _FailedWork(tensor, how)
    try:
        ddp = DDP(_mlp(), bucket_cap_mb=BUCKET_CAP_MB)
        ddp.register_comm_hook(state, hook)
        x, y = _batch(rank, 0)
        try:
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            return ("no error", "")
        except Exception as e:  # noqa: BLE001  (the test inspects what the user would see)
            return (type(e).__name__, str(e))
    finally:
        hooks.all_reduce, paracomm.comm.Communicator.all_reduce = saved


def _failing_bucketer(rank, how):
    import paracomm

    model = _mlp()
    bucketer = paracomm.GradBucketer(model, bucket_cap_mb=BUCKET_CAP_MB)
    bucketer._comm.all_reduce = lambda tensor, *a, **k: _FailedWork(tensor, how)
    x, y = _batch(rank, 0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    try:
        bucketer.wait()
        return ("no error", "")
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__, str(e))


def _sparse_cases(rank, world_size, kind):
    dense = kind == "mixed"
    out = {
        f"{kind}.reference": _sparse_train(rank, None, None, dense),
        f"{kind}.torch": _sparse_train(rank, None, torch_hooks.allreduce_hook, dense),
        f"{kind}.allreduce": _sparse_train(rank, None, hooks.allreduce_hook, dense),
        f"{kind}.bf16": _sparse_train(rank, None, hooks.bf16_compress_hook, dense),
        f"{kind}.ring": _sparse_train(rank, hooks.FusedHookState(), hooks.fused_hook, dense),
    }
    return _portable(out)


def _failure_cases(rank, world_size):
    failures = {}
    for how in ("python", "cpp"):
        failures[f"allreduce_hook.{how}"] = _failing_ddp_step(rank, hooks.allreduce_hook, None, how)
        failures[f"fp16_compress_hook.{how}"] = _failing_ddp_step(rank, hooks.fp16_compress_hook, None, how)
        failures[f"ring_hook.{how}"] = _failing_ddp_step(rank, hooks.fused_hook, hooks.FusedHookState(), how)
        failures[f"bucketer.{how}"] = _failing_bucketer(rank, how)
    return failures


@pytest.mark.parametrize("kind", ["only", "mixed"])
def test_sparse_buckets_average_like_torch(kind):
    """kind "only": every bucket is sparse; "mixed": a dense bucket on paracomm's all-reduce beside the sparse
    one on torch's, in the same backward (needs paracomm's transfers on a group of their own)."""
    results = _tensors(run_ranks(2, _sparse_cases, kind, timeout=180))
    ref = results[0][f"{kind}.torch"]
    moved = (results[0][f"{kind}.reference"] - _flat_params(_SparseNet(kind == "mixed"))).abs().max().item()
    assert moved > 1e-3
    assert _max_diff(results[0][f"{kind}.reference"], ref) <= 1e-6
    for impl in ("allreduce", "bf16", "ring"):
        name = f"{kind}.{impl}"
        # A dense bucket travels on paracomm's wire (bf16: within its rounding), the sparse one as torch's.
        tol = 1e-6 if impl != "bf16" or kind == "only" else 8 * torch.finfo(torch.bfloat16).eps * max(moved, 1.0)
        assert _max_diff(results[0][name], ref) <= tol, name
        assert torch.equal(results[0][name], results[1][name]), f"{name}: ranks diverged"


def test_failed_all_reduce_reaches_the_user_as_paracomms_runtime_error():
    """A hook's (or the bucketer's) all-reduce fails on every rank (injected: no collective is left waiting);
    backward() / wait() raise a RuntimeError with paracomm's message, not DDP's "Unable to cast ... to Tensor"."""
    for r in run_ranks(2, _failure_cases, timeout=180):
        for name, (kind, msg) in r.items():
            assert kind == "RuntimeError", (name, kind, msg)
            assert "injected failure: a peer died" in msg and "paracomm.all_reduce" in msg, (name, msg)
            assert "Unable to cast" not in msg, (name, msg)


# ------------------------------------------------------------------------------------------------------------
# Hook state checkpoints: pickled like torch's PowerSGDState (the group is dropped), also after first use
# ------------------------------------------------------------------------------------------------------------


def _pickle_state(rank, world_size):
    import pickle
    import warnings

    import paracomm
    from paracomm import hooks

    scaler = paracomm.amp.GradScaler("cpu", init_scale=128.0)
    state = hooks.FusedHookState(dist.group.WORLD, wire_dtype=torch.bfloat16, algorithm="direct", scaler=scaler,
                                 timeout=timedelta(seconds=42))
    comm = state.communicator()  # first use: the state now holds a Communicator
    assert comm.timeout == timedelta(seconds=42)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = pickle.loads(pickle.dumps(state))
    assert any("default group" in str(w.message) for w in caught)
    assert restored.process_group is None and restored._comm is None
    assert (restored.wire_dtype, restored.algorithm, restored.timeout) == (torch.bfloat16, "direct",
                                                                          timedelta(seconds=42))
    assert restored.scaler.get_scale() == 128.0
    # The restored state makes its own communicator over the default group and reduces with it.
    assert restored.communicator() is not comm and restored.communicator().world_size == world_size
    # Without a timeout the hook's communicator follows the process group (the run's pg timeout: 60 s).
    assert hooks.FusedHookState().communicator().timeout == timedelta(seconds=60)
    return True


def test_hook_state_pickles_after_first_use():
    assert run_ranks(1, _pickle_state) == [True]
