"""The multi-process harness itself: results come back by rank, failures and hangs are reported."""
import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return rank, t.item()


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def _die_on_one(rank, world_size):
    dist.barrier()  # both ranks are fully connected before one dies
    if rank == 1:
        os._exit(3)
    return rank


def test_results_come_back_by_rank():
    assert run_ranks(3, _sum_ranks) == [(0, 6.0), (1, 6.0), (2, 6.0)]


def test_exception_on_a_rank_fails_with_its_traceback():
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_ranks(2, _fail_on_one)


def test_dead_rank_is_reported_or_allowed():
    with pytest.raises(AssertionError, match="rank 1 died"):
        run_ranks(2, _die_on_one)
    assert run_ranks(2, _die_on_one, allow_missing=(1,)) == [0, None]
