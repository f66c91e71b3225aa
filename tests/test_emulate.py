"""The emulated multi-node cluster (src/paracomm/bench/emulate.py): real network namespaces, a tc-shaped link.

2 nodes x 2 ranks at 1 Gbit/s: the benchmark's exact check passes for paracomm (which finds the two nodes by
itself, through the network namespace in the host identity, and runs the hierarchical all-reduce on the mixed
transport: shared memory inside each node, gloo across the link) and for gloo's own
all-reduce; no namespace survives the run, a failed rank, or Ctrl-C. Needs root and iproute2 (skipped otherwise,
with the reason).
"""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from paracomm.bench import emulate

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _netns_works():
    why = emulate.problem()
    if why is not None:
        return why
    name = f"pce-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


_WHY = _netns_works() if shutil.which("ip") else "iproute2's `ip` is not installed"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_WHY is not None, reason=str(_WHY))]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.pop("PARACOMM_NODE_SIZE", None)
    return env


def test_two_nodes_two_ranks_exact_and_torn_down():
    cmd = [sys.executable, "-m", "paracomm.bench", "allreduce", "--emulate-nodes", "2", "--inter-node-gbit", "1",
           "--nproc", "4", "-b", "256K", "-e", "1M", "-f", "4", "-n", "2", "-w", "1", "--timeout", "120"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "# Out of bounds values : 0 OK" in out, out
    assert "nodes: [0, 0, 1, 1]" in out, out  # found by host identity (network namespaces), no PARACOMM_NODE_SIZE
    # auto: shared memory inside each namespace-node, gloo over the shaped link between them (paracomm._mixed)
    assert "paracomm CPU transport: mixed" in out, out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert rows and rows[-1][4] == "hierarchical", out  # 1 MiB: auto picks hierarchical across two nodes
    assert all(r[8] == "0" and r[12] == "0" for r in rows), out  # #wrong of paracomm and of gloo's all-reduce
    assert emulate.existing(f"pce{proc.pid}-") == []


@pytest.mark.parametrize("kind", ["reduce_scatter", "all_gather"])
def test_collectives_on_two_nodes_exact_in_stages(kind):
    # 4 MiB per rank (reduce-scatter input, all-gather output): hierarchical, in stages on the mixed transport.
    cmd = [sys.executable, "-m", "paracomm.bench", kind, "--emulate-nodes", "2", "--inter-node-gbit", "1",
           "--nproc", "4", "-b", "4M", "-e", "4M", "-n", "2", "-w", "1", "--timeout", "120"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "# Out of bounds values : 0 OK" in out and "paracomm CPU transport: mixed" in out, out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert rows and all(r[2] == "hierarchical" and r[6] == "0" and r[-2] == "0" for r in rows), out
    assert emulate.existing(f"pce{proc.pid}-") == []


def test_failed_rank_stops_the_others_and_tears_down(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    t0 = time.monotonic()
    code = emulate.run([], nodes=2, gbit=1.0, nproc=4, timeout_s=120, module="emulate_probe")
    assert code == 3  # rank 1's exit code; the other ranks (sleeping 600 s) were killed
    assert time.monotonic() - t0 < 60
    assert emulate.existing(f"pce{os.getpid()}-") == []


def test_ctrl_c_tears_down():
    code = ("import sys; from paracomm.bench import emulate; "
            "sys.exit(emulate.run([], nodes=2, gbit=1.0, nproc=2, timeout_s=600, module='emulate_probe'))")
    env = _env()
    env["EMULATE_PROBE_ALL_SLEEP"] = "1"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    prefix = f"pce{proc.pid}-"
    deadline = time.monotonic() + 60
    while len(emulate.existing(prefix)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(emulate.existing(prefix)) == 3  # the bridge and two nodes
    time.sleep(1.0)  # the ranks have started
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert emulate.existing(prefix) == []
