"""paracomm.GradBucketer: bucket assignment against torch's, training against DDP on real gloo groups."""
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import paracomm
from paracomm.buckets import assign_buckets
from dist_utils import run_ranks

STEPS = 10
CAP_MB = 1024 / 2**20  # 1 KiB buckets: the model below spreads over several


# ------------------------------------------------------------------------------------------------------------
# Bucket assignment (no processes)
# ------------------------------------------------------------------------------------------------------------


def _torch_assignment(tensors, first, cap):
    """DDP's rule: torch's own assignment over the reversed tensors, reversed indices."""
    order = list(reversed(range(len(tensors))))
    buckets, _ = dist._compute_bucket_assignment_by_size(
        [tensors[i] for i in order], [first, cap], [False] * len(tensors), order)
    return buckets


@pytest.mark.parametrize("first,cap", [(1000, 2000), (64, 64), (10**9, 10**9), (1, 4000), (4000, 1)])
def test_assignment_matches_torch_single_dtype(first, cap):
    g = torch.Generator().manual_seed(first + cap)
    sizes = torch.randint(1, 400, (23,), generator=g).tolist()
    tensors = [torch.empty(n) for n in sizes]
    assert assign_buckets(tensors, first, cap) == _torch_assignment(tensors, first, cap)


def test_assignment_separates_dtypes_like_torch():
    g = torch.Generator().manual_seed(7)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    tensors = [torch.empty(int(n), dtype=dtypes[int(d)])
               for n, d in zip(torch.randint(1, 300, (40,), generator=g), torch.randint(0, 4, (40,), generator=g))]
    ours = assign_buckets(tensors, 500, 1500)
    # Same buckets (torch leaves the order of the leftover buckets to a hash map).
    assert sorted(map(tuple, ours)) == sorted(map(tuple, _torch_assignment(tensors, 500, 1500)))
    for bucket in ours:
        assert len({tensors[i].dtype for i in bucket}) == 1
    # Ours are in the order they complete during a backward that runs in reverse definition order.
    completes_at = [min(bucket) for bucket in ours]
    assert completes_at == sorted(completes_at, reverse=True)


# ------------------------------------------------------------------------------------------------------------
# Bad arguments (checked before anything needs a process group)
# ------------------------------------------------------------------------------------------------------------


def test_constructor_refuses_bad_arguments():
    w = torch.nn.Parameter(torch.randn(4, 4))
    bad = [
        (dict(params=3), TypeError, "params must be an iterable"),
        (dict(params=[w, "x"]), TypeError, r"params\[1\] must be a torch.Tensor"),
        (dict(params=[torch.zeros(3)]), ValueError, "no tensor with requires_grad"),
        (dict(params=[]), ValueError, "no tensor with requires_grad"),
        (dict(params=[w * 2]), ValueError, r"params\[0\] is not a leaf"),
        (dict(params=[torch.zeros(3, dtype=torch.complex64, requires_grad=True)]), TypeError, "dtype"),
        (dict(params=[torch.zeros(3, 3).to_sparse().requires_grad_()]), ValueError, "layout"),
        (dict(params=[w], bucket_cap_mb=0), ValueError, "bucket_cap_mb"),
        (dict(params=[w], bucket_cap_mb=-1.0), ValueError, "bucket_cap_mb"),
        (dict(params=[w], bucket_cap_mb=float("nan")), ValueError, "bucket_cap_mb"),
        (dict(params=[w], bucket_cap_mb="25"), TypeError, "bucket_cap_mb"),
        (dict(params=[w], bucket_cap_mb=True), TypeError, "bucket_cap_mb"),
        (dict(params=[w], first_bucket_mb=0), ValueError, "first_bucket_mb"),
        (dict(params=[w], first_bucket_mb=None), TypeError, "first_bucket_mb"),
        (dict(params=[w], group="world"), TypeError, "group"),
        (dict(params=[w], wire_dtype="bf16"), TypeError, "wire_dtype"),
        (dict(params=[w], wire_dtype=torch.float32), ValueError, "wire_dtype"),
        (dict(params=[w], op="max"), ValueError, "op"),
        (dict(params=[w], op="mean"), ValueError, "op"),
        (dict(params=[w], broadcast_params=1), TypeError, "broadcast_params"),
        (dict(params=[w], algorithm="two_shot"), ValueError, "algorithm"),
        (dict(params=[w], algorithm=0), TypeError, "algorithm"),
        (dict(params=[w], broadcast_params="no"), TypeError, "broadcast_params"),
    ]
    for kwargs, exc, match in bad:
        params = kwargs.pop("params")
        with pytest.raises(exc, match=match):
            paracomm.GradBucketer(params, **kwargs)
        assert not w._post_accumulate_grad_hooks, kwargs  # a refused constructor registers no hook
    with pytest.raises(TypeError):
        paracomm.GradBucketer([w], 25)  # keyword-only
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialized"):
        paracomm.GradBucketer([w])
    assert not w._post_accumulate_grad_hooks


# ------------------------------------------------------------------------------------------------------------
# Training against DDP (one multi-process run for all cases)
# ------------------------------------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    """Several buckets, a frozen layer, a float64 layer (its own bucket), a transposed (non-contiguous)
    parameter, a branch some ranks skip in some steps, and a parameter no rank ever uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = torch.nn.Linear(12, 12).requires_grad_(False)
        self.l1 = torch.nn.Linear(12, 32)
        self.wt = torch.nn.Parameter(torch.randn(16, 32).t() * 0.2)  # 32x16, strides (1, 32)
        self.l64 = torch.nn.Linear(16, 16).double()
        self.branch = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)
        self.never_used = torch.nn.Parameter(torch.randn(5))

    def forward(self, x, use_branch=True):
        h = torch.tanh(self.l1(self.frozen(x)))
        h = torch.tanh(h @ self.wt)
        h = torch.tanh(self.l64(h.double())).float()
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def _data(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(10, 12, generator=g), torch.randn(10, 4, generator=g)


def _uses_branch(rank, step):
    return not (rank == 1 and step % 2 == 1)  # rank 0 always uses it: never unused on every rank


def _params(model):
    return [p.detach().clone().numpy() for p in model.parameters()]


def _run_steps(rank, model, net, sync):
    """STEPS of SGD with momentum on _Net's task; ``sync()`` runs between backward() and the optimizer step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for step in range(STEPS):
        x, y = _data(rank, step)
        loss = torch.nn.functional.mse_loss(net(x, use_branch=_uses_branch(rank, step)), y)
        opt.zero_grad()
        loss.backward()
        sync()
        opt.step()


def _train(rank, world_size, bucketer_kwargs):
    """10 steps; bucketer_kwargs None: DDP(find_unused_parameters=True) as the reference."""
    model = _Net()
    if bucketer_kwargs is None:
        net = DDP(model, bucket_cap_mb=CAP_MB, find_unused_parameters=True)
        sync = lambda: None  # noqa: E731
    else:
        net = model
        bucketer = paracomm.GradBucketer(model.parameters(), **bucketer_kwargs)
        sync = bucketer.wait
    _run_steps(rank, model, net, sync)
    out = {"params": _params(model)}
    if bucketer_kwargs is not None:
        grad = model.never_used.grad
        out["never_used_grad"] = None if grad is None else grad.clone().numpy()
        out["buckets"] = [[n for n, q in model.named_parameters() if any(q is p for p in b)]
                          for b in bucketer.buckets]
        bucketer.remove()
    return out


def _perturbed(rank):
    """_Net with rank-dependent weights (another seed per rank) and a rank-dependent buffer."""
    model = _Net()
    model.register_buffer("stat", torch.full((3,), float(rank)))
    g = torch.Generator().manual_seed(7 + rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _diverse_start(rank, world_size):
    """Ranks start from different weights: DDP and the bucketer broadcast rank 0's; broadcast_params=False does
    not (and the ranks then train apart)."""
    out = {}
    for name in ("ddp", "bucketer", "bucketer.module", "no_broadcast"):
        model = _perturbed(rank)
        if name == "ddp":
            net, sync = DDP(model, bucket_cap_mb=CAP_MB, find_unused_parameters=True), (lambda: None)
        else:
            net = model
            bucketer = paracomm.GradBucketer(model if name == "bucketer.module" else model.parameters(),
                                             bucket_cap_mb=CAP_MB, broadcast_params=name != "no_broadcast")
            sync = bucketer.wait
        out[name + ".start"] = _params(model)
        out[name + ".stat"] = model.stat.clone().numpy()
        _run_steps(rank, model, net, sync)
        out[name] = _params(model)
        if name != "ddp":
            bucketer.remove()
    return out


def _local_grads(model, rank, step, use_branch=True):
    x, y = _data(rank, step)
    torch.nn.functional.mse_loss(model(x, use_branch=use_branch), y).backward()


def _behaviour(rank, world_size):
    """Sum op, no_sync accumulation, a refused second backward, remove()."""
    out = {}
    # The parameters some backward reaches (never_used gets a gradient only from the bucketer).
    trainable = lambda m: [p for n, p in m.named_parameters() if p.requires_grad and n != "never_used"]  # noqa

    # Overlap: when l1.weight's gradient (one of the last) arrives, the buckets of the later layers are
    # already on the wire; after backward every bucket is.
    model = _Net()
    bucketer = paracomm.GradBucketer(model.parameters(), bucket_cap_mb=CAP_MB, first_bucket_mb=CAP_MB / 4)
    seen = []
    model.l1.weight.register_post_accumulate_grad_hook(lambda p: seen.append(bucketer.launched_buckets))
    _local_grads(model, rank, 0)
    out["launched"] = (seen[0], bucketer.launched_buckets, len(bucketer.buckets))
    bucketer.wait()
    out["launched_after_wait"] = bucketer.launched_buckets
    bucketer.remove()

    # op="sum" equals world_size * the average, and the average equals a plain dist.all_reduce / world.
    model = _Net()
    _local_grads(model, rank, 0)
    expected = []
    for p in trainable(model):
        g = p.grad.double().clone()
        dist.all_reduce(g)
        expected.append(g)
    model.zero_grad(set_to_none=True)
    bucketer = paracomm.GradBucketer(model.parameters(), bucket_cap_mb=CAP_MB, op="sum")
    _local_grads(model, rank, 0)
    bucketer.wait()
    out["sum_err"] = max((p.grad.double() - e).abs().max().item() / e.abs().max().item()
                         for p, e in zip(trainable(model), expected))
    bucketer.remove()

    # no_sync: accumulate two micro-batches locally, the third backward all-reduces the sum.
    model = _Net()
    for step in range(3):
        _local_grads(model, rank, step)
    expected = []
    for p in trainable(model):
        g = p.grad.double().clone()
        dist.all_reduce(g)
        expected.append(g / world_size)
    model.zero_grad(set_to_none=True)
    bucketer = paracomm.GradBucketer(model.parameters(), bucket_cap_mb=CAP_MB, first_bucket_mb=CAP_MB / 2)
    with bucketer.no_sync():
        _local_grads(model, rank, 0)
        _local_grads(model, rank, 1)
        try:
            bucketer.wait()
            out["wait_in_no_sync"] = "accepted"
        except RuntimeError as e:
            out["wait_in_no_sync"] = str(e)
    _local_grads(model, rank, 2)
    bucketer.wait()
    out["no_sync_err"] = max((p.grad.double() - e).abs().max().item() / e.abs().max().item()
                             for p, e in zip(trainable(model), expected))

    # A second backward before wait() is refused; wait() then finishes the iteration and the next works.
    model.zero_grad(set_to_none=True)
    _local_grads(model, rank, 3)
    try:
        _local_grads(model, rank, 4)
        out["second_backward"] = "accepted"
    except RuntimeError as e:
        out["second_backward"] = str(e)
    try:
        bucketer.remove()
        out["remove_mid_iteration"] = "accepted"
    except RuntimeError as e:
        out["remove_mid_iteration"] = str(e)
    bucketer.wait()
    model.zero_grad(set_to_none=True)
    _local_grads(model, rank, 5)
    bucketer.wait()
    grads = torch.cat([p.grad.reshape(-1) for p in trainable(model)])
    gathered = [torch.empty_like(grads) for _ in range(world_size)]
    dist.all_gather(gathered, grads)
    out["recovered_in_sync"] = all(torch.equal(g, grads) for g in gathered)

    # remove(): hooks detached (grads stay local and differ across ranks), wait() refused, remove idempotent.
    bucketer.remove()
    bucketer.remove()
    model.zero_grad(set_to_none=True)
    _local_grads(model, rank, 6)
    grads = torch.cat([p.grad.reshape(-1) for p in trainable(model)])
    dist.all_gather(gathered, grads)
    out["removed_grads_local"] = not torch.equal(gathered[0], gathered[1])
    try:
        bucketer.wait()
        out["wait_after_remove"] = "accepted"
    except RuntimeError as e:
        out["wait_after_remove"] = str(e)
    out["hooks_left"] = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())

    # Sparse gradients (nn.Embedding(sparse=True)) are refused when they arrive, before any collective.
    emb = torch.nn.Embedding(10, 3, sparse=True)
    bucketer = paracomm.GradBucketer(emb.parameters())
    try:
        emb(torch.tensor([1, 2])).sum().backward()
        out["sparse"] = "accepted"
    except RuntimeError as e:
        out["sparse"] = str(e)
    bucketer.remove()  # nothing in flight: removal is allowed
    return out


def _cases(rank, world_size):
    return {
        "ddp": _train(rank, world_size, None),
        "bucketer": _train(rank, world_size, dict(bucket_cap_mb=CAP_MB, first_bucket_mb=CAP_MB / 4)),
        "bucketer.one_bucket": _train(rank, world_size, dict()),
        "bucketer.direct": _train(rank, world_size, dict(bucket_cap_mb=CAP_MB, algorithm="direct")),
        "bucketer.one_shot": _train(rank, world_size, dict(bucket_cap_mb=CAP_MB, algorithm="one_shot")),
        "bucketer.bf16": _train(rank, world_size, dict(bucket_cap_mb=CAP_MB, wire_dtype=torch.bfloat16)),
        "behaviour": _behaviour(rank, world_size),
        "diverse": _diverse_start(rank, world_size),
    }


@pytest.fixture(scope="module")
def results():
    return run_ranks(3, _cases, timeout=180)


def _max_diff(a, b):
    return max(float(abs(x - y).max()) for x, y in zip(a, b))


def test_buckets_split_by_dtype_and_exclude_frozen(results):
    buckets = results[0]["bucketer"]["buckets"]
    assert len(buckets) >= 4
    names = [n for b in buckets for n in b]
    assert not any(n.startswith("frozen") for n in names)
    assert sorted(names) == sorted(["l1.weight", "l1.bias", "wt", "l64.weight", "l64.bias", "branch.weight",
                                    "branch.bias", "head.weight", "head.bias", "never_used"])
    for b in buckets:
        assert all(n.startswith("l64") for n in b) or not any(n.startswith("l64") for n in b)
    assert results[0]["bucketer.one_bucket"]["buckets"] != buckets


@pytest.mark.parametrize("name", ["bucketer", "bucketer.one_bucket", "bucketer.direct", "bucketer.one_shot"])
def test_bucketer_matches_ddp(results, name):
    ddp, ours = results[0]["ddp"]["params"], results[0][name]["params"]
    init = _params(_Net())
    assert _max_diff(ddp, init) > 0.05
    assert _max_diff(ours, ddp) <= 1e-6


def test_bucketer_bf16_wire_within_rounding(results):
    ddp, ours = results[0]["ddp"]["params"], results[0]["bucketer.bf16"]["params"]
    u = torch.finfo(torch.bfloat16).eps / 2
    movement = _max_diff(ddp, _params(_Net()))
    assert 0 < _max_diff(ours, ddp) <= 8 * u * movement


def test_ranks_never_diverge(results):
    for name in ("ddp", "bucketer", "bucketer.one_bucket", "bucketer.bf16", "bucketer.direct", "bucketer.one_shot"):
        for rank in range(1, len(results)):
            for a, b in zip(results[rank][name]["params"], results[0][name]["params"]):
                assert (a == b).all(), (name, rank)


def test_parameter_unused_on_every_rank_keeps_grad_none(results):
    # As DDP's reducer: the used flags reduced with each bucket say no rank had a gradient for it.
    for r in results:
        assert r["bucketer"]["never_used_grad"] is None


def test_buckets_start_during_backward(results):
    for r in results:
        during, after_backward, total = r["behaviour"]["launched"]
        assert 0 < during < total and after_backward == total, r["behaviour"]["launched"]
        assert r["behaviour"]["launched_after_wait"] == 0


def test_sum_op_and_no_sync(results):
    for r in results:
        b = r["behaviour"]
        assert b["sum_err"] <= 1e-6
        assert b["no_sync_err"] <= 1e-6
        assert "inside no_sync" in b["wait_in_no_sync"]


def test_second_backward_refused_then_recovers(results):
    for r in results:
        b = r["behaviour"]
        assert "second backward" in b["second_backward"]
        assert "call wait() first" in b["remove_mid_iteration"]
        assert b["recovered_in_sync"]


def test_sparse_gradients_refused(results):
    for r in results:
        assert "sparse gradients are not supported" in r["behaviour"]["sparse"]


def test_remove_detaches_hooks(results):
    for r in results:
        b = r["behaviour"]
        assert b["removed_grads_local"]
        assert "after remove" in b["wait_after_remove"]
        assert b["hooks_left"] == 0


def test_ranks_starting_from_different_weights_end_equal_like_ddp(results):
    """GradBucketer broadcasts rank 0's parameters (frozen ones too) and, given a module, its buffers, at
    construction, as DDP does; the training that follows matches DDP's from the same start."""
    ref = results[0]["diverse"]
    for r in results:
        d = r["diverse"]
        for name in ("bucketer", "bucketer.module"):
            # The ranks started apart (no_broadcast below); the constructor made every rank's start rank 0's,
            # frozen layer included,
            assert _max_diff(d[name + ".start"], ref["ddp.start"]) == 0.0, name
            # and they trained as DDP does, identically on every rank.
            assert _max_diff(d[name], ref["ddp"]) <= 1e-6, name
            assert _max_diff(d[name], ref[name]) == 0.0, name
        assert (d["bucketer.module.stat"] == 0).all()  # rank 0's buffer
        assert (d["ddp.stat"] == 0).all()
    # Without the broadcast nothing is copied: the ranks keep their own weights and buffers.
    assert _max_diff(results[1]["diverse"]["no_broadcast.start"], ref["no_broadcast.start"]) > 0.01
    assert (results[1]["diverse"]["no_broadcast.stat"] == 1).all()
    assert (results[1]["diverse"]["bucketer.stat"] == 1).all()  # a parameter list carries no buffers


# ------------------------------------------------------------------------------------------------------------
# A torch collective between backward() and wait() (the deadlock reproduction)
# ------------------------------------------------------------------------------------------------------------


def _loss_all_reduce_between(rank, world_size, iters):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    bucketer = paracomm.GradBucketer(model, bucket_cap_mb=CAP_MB, first_bucket_mb=CAP_MB)
    for step in range(iters):
        g = torch.Generator().manual_seed(100 * rank + step)
        loss = model(torch.randn(8, 16, generator=g)).square().mean()
        model.zero_grad(set_to_none=True)
        loss.backward()  # buckets start on paracomm's worker thread here...
        reported = loss.detach().clone()
        dist.all_reduce(reported)  # ...while the main thread runs a torch collective on the same group
        bucketer.wait()
    return [p.grad.tolist() for p in model.parameters()]  # plain lists: tensors would travel as shared memory


@pytest.mark.parametrize("world_size", [2, 4])
def test_torch_collective_between_backward_and_wait_does_not_deadlock(world_size):
    grads = run_ranks(world_size, _loss_all_reduce_between, 100, timeout=300)
    for r in range(1, world_size):
        assert grads[r] == grads[0], f"rank {r} ended with other gradients than rank 0"


# ------------------------------------------------------------------------------------------------------------
# The bucketer follows the model (DDP's reducer rule): dtype change, a layer frozen later, sparse embeddings
# ------------------------------------------------------------------------------------------------------------


def _follows_model(rank, world_size):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    bucketer = paracomm.GradBucketer(model, bucket_cap_mb=CAP_MB)
    out = {}
    # model.double() after construction: the gradients are reduced in float64 (float32 would miss by ~1e-7).
    model.double()
    x = torch.randn(10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(rank + 1))
    model(x).pow(2).sum().backward()
    bucketer.wait()
    reduced = [p.grad.clone() for p in model.parameters()]
    out["bucket_dtypes"] = sorted({str(b[0].dtype) for b in bucketer.buckets})
    # The float64 reference: torch's all-reduce of each local gradient, divided by the world size.
    model.zero_grad(set_to_none=True)
    with bucketer.no_sync():
        model(x).pow(2).sum().backward()
    expected = []
    for p in model.parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        expected.append(g / world_size)
    out["float64_err"] = max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(reduced, expected))
    out["grad_dtypes"] = sorted({str(g.dtype) for g in reduced})
    # A layer frozen after construction keeps its weights through SGD with weight decay (its grad stays None).
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    head = model[2].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        bucketer.wait()
        opt.step()
    out["frozen_grad_none"] = model[0].weight.grad is None and model[0].bias.grad is None
    out["frozen_kept"] = torch.equal(frozen, model[0].weight)
    out["head_moved"] = not torch.equal(head, model[2].weight)
    out["trainable_in_buckets"] = sum(len(b) for b in bucketer.buckets)
    bucketer.remove()
    # A sparse embedding is refused at construction, naming the parameter.
    net = torch.nn.ModuleDict({"dense": torch.nn.Linear(3, 3), "tokens": torch.nn.Embedding(10, 3, sparse=True)})
    try:
        paracomm.GradBucketer(net)
        out["sparse"] = "accepted"
    except ValueError as e:
        out["sparse"] = str(e)
    return out


def test_bucketer_follows_the_model():
    for r in run_ranks(2, _follows_model, timeout=180):
        assert r["bucket_dtypes"] == ["torch.float64"] and r["grad_dtypes"] == ["torch.float64"], r
        assert r["float64_err"] <= 1e-12, r["float64_err"]
        assert r["frozen_grad_none"] and r["frozen_kept"] and r["head_moved"], r
        assert r["trainable_in_buckets"] == 2  # the head's weight and bias
        assert "'tokens.weight'" in r["sparse"] and "sparse" in r["sparse"], r["sparse"]
