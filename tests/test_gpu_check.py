"""bench/gpu_check.sh on the CPU: its plan fits the device budget, and a dry run skips every GPU step, saying why.

The GPU session is short (one call of at most 8 minutes at a time), so the script's time boxes are part of the
plan: --plan prints each call's steps with their boxes; every call, a cold build included, must fit 480 s.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
BUDGET_S = 480


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _calls(plan: str):
    """[(title, [(step, seconds)], total)] from --plan's output."""
    calls = []
    for line in plan.splitlines():
        if line.startswith("plan:"):
            calls.append([line, [], None])
            continue
        m = re.match(r"\s+(\S+)\s+(\d+) s\s", line + " ")
        if m and calls:
            if m.group(1) == "total":
                calls[-1][2] = int(m.group(2))
            else:
                calls[-1][1].append((m.group(1), int(m.group(2))))
    return calls


def test_plan_lists_steps_whose_boxes_fit_the_budget():
    r = _run("--plan")
    assert r.returncode == 0, r.stderr
    calls = _calls(r.stdout)
    assert len(calls) >= 2, r.stdout
    first = calls[0]
    steps = [s for s, _ in first[1]]
    # The first call, in priority order, has every must-have of the first GPU session.
    for want in ("build", "test-kernels", "test-nccl", "overlap", "ddp", "hosttime", "bench-ar2"):
        assert want in steps, (want, steps)
    assert steps.index("build") < steps.index("test-kernels") < steps.index("test-nccl") < steps.index("overlap")
    assert "test-slow" not in steps  # the slow fault tests go in a later --only call
    for title, boxes, total in calls:
        assert total is not None, title
        assert sum(b for _, b in boxes) == total, (title, boxes, total)
        assert total <= BUDGET_S, f"{title}: {total} s > {BUDGET_S} s"
        assert all(b > 0 for _, b in boxes), (title, boxes)
    later = {s for _, boxes, _ in calls[1:] for s, _ in boxes}
    assert "test-slow" in later
    # Every step the script knows appears in some call.
    known = set(_run("--list").stdout.split())
    assert known == {s for _, boxes, _ in calls for s, _ in boxes} - {"(reserve)"}, known


def test_plan_of_an_only_call():
    r = _run("--plan", "--only", "test-slow")
    assert r.returncode == 0, r.stderr
    [(title, boxes, total)] = _calls(r.stdout)
    assert [s for s, _ in boxes] == ["build", "test-slow", "(reserve)"] and total <= BUDGET_S, r.stdout
    assert _run("--plan", "--only", "no-such-step").returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run is for machines without a GPU")
def test_dry_run_skips_every_gpu_step_with_its_reason():
    # Where torch has CUDA (the CI's CUDA venv) the build would really run: skip it, the GPU steps still skip.
    args = ("--no-build",) if torch.version.cuda else ()
    r = _run(*args, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    table = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(\S+)\s+(ok|skipped|FAILED|not-run)\s+\d+\s*(.*)$", line)
        if m:
            table[m.group(1)] = (m.group(2), m.group(3))
    plan = [s for s, _ in _calls(_run("--plan").stdout)[0][1] if s != "(reserve)"]
    assert set(table) == set(plan), (table, plan)
    for step, (status, note) in table.items():
        if step == "env":
            continue
        assert status == "skipped" and note, (step, status, note)
    assert "no CUDA GPU" in table["test-nccl"][1]
