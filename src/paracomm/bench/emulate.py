"""An emulated multi-node cluster on one Linux machine: network namespaces joined by veth links, shaped with tc.

``python -m paracomm.bench allreduce --emulate-nodes M --inter-node-gbit R [--nproc N] ...`` (root) builds

    namespace <p>-br:  a bridge br0; one veth end per node attached to it (the "switch")
    namespace <p>-n<m>: eth0 = the other veth end, address 198.18.<x>.<m+1>/24 (RFC 2544's benchmarking range,
                        never routed), lo up; egress shaped with ``tc qdisc ... root tbf rate R`` (the node's NIC)

and runs the benchmark's ranks inside them as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR = node 0's address, MASTER_PORT): ranks [0, K) in node 0, [K, 2K) in node 1, ... (K = N / M). Every
rank binds gloo to its node's eth0 (GLOO_SOCKET_IFNAME), so traffic between two ranks of a node stays inside the
namespace (local delivery, the kernel's loopback) and traffic between nodes crosses the shaped link. paracomm finds
the nodes by itself: host identity includes the network namespace (src/paracomm/_topology.py). The store is rank 0's
TCPStore on node 0's address, which every namespace reaches through the bridge.

Only addresses inside namespaces made here are ever a target. Everything is torn down at exit: after the ranks
finish, when a rank fails (the others are killed at once), on Ctrl-C and on SIGTERM; namespaces carry this
process's id in their name, so concurrent runs do not collide.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import List, Optional

ADDRESS_BASE = "198.18"  # 198.18.0.0/15: reserved for network benchmarks (RFC 2544)
PORT = 29500
ENV_MARK = "PARACOMM_EMULATED_NODE"  # set in the ranks: "<node>/<nodes>/<gbit>"


def problem() -> Optional[str]:
    """Why the emulation cannot run here (None when it can): Linux, root, iproute2's ``ip`` and ``tc``."""
    if not sys.platform.startswith("linux"):
        return "the emulated cluster needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the emulated cluster needs root (ip netns add, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the emulated cluster needs iproute2's `{tool}` on PATH"
    return None


def _run(cmd: List[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"emulate: `{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")


class Cluster:
    """M node namespaces behind a bridge namespace, each node's egress shaped to ``gbit`` Gbit/s.

    Use as a context manager; ``close()`` deletes every namespace it made (idempotent, also after a partial
    setup). ``prefix`` names them (default: ``pce<pid>``).
    """

    def __init__(self, nodes: int, gbit: float, prefix: Optional[str] = None):
        if nodes < 1 or nodes > 250:
            raise ValueError(f"emulate: nodes must be in [1, 250], got {nodes}")
        if not gbit > 0:
            raise ValueError(f"emulate: inter-node rate must be > 0 Gbit/s, got {gbit}")
        self.nodes, self.gbit = nodes, gbit
        self.prefix = prefix or f"pce{os.getpid()}"
        self.subnet = f"{ADDRESS_BASE}.{os.getpid() % 250}"
        self.made: List[str] = []

    def ns(self, m: int) -> str:
        return f"{self.prefix}-n{m}"

    def address(self, m: int) -> str:
        return f"{self.subnet}.{m + 1}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def _netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.made.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def up(self) -> "Cluster":
        br = self.bridge_ns
        self._netns(br)
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", "br0", "up"])
        rate = f"{self.gbit * 1000:g}mbit"
        for m in range(self.nodes):
            node = self.ns(m)
            self._netns(node)
            # The veth pair is made inside the node namespace, then one end moves to the bridge namespace.
            _run(["ip", "-n", node, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{m}"])
            _run(["ip", "-n", node, "link", "set", f"v{m}", "netns", br])
            _run(["ip", "-n", br, "link", "set", f"v{m}", "master", "br0"])
            _run(["ip", "-n", br, "link", "set", f"v{m}", "up"])
            _run(["ip", "-n", node, "addr", "add", f"{self.address(m)}/24", "dev", "eth0"])
            _run(["ip", "-n", node, "link", "set", "eth0", "up"])
            _run(["ip", "netns", "exec", node, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                  "burst", "256kb", "latency", "50ms"])
        return self

    def close(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made = []

    def __enter__(self) -> "Cluster":
        try:
            return self.up()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def existing(prefix: str) -> List[str]:
    """Namespaces whose name starts with ``prefix`` (the test checks that none survive)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(prefix)]


def add_args(parser) -> None:
    """The benchmarks' emulated-cluster flags (--emulate-nodes, --inter-node-gbit)."""
    g = parser.add_argument_group("emulated cluster (Linux, root: src/paracomm/bench/emulate.py)")
    g.add_argument("--emulate-nodes", type=int, default=None, metavar="M",
                   help="run the ranks in M network namespaces joined through a bridge, each node's link shaped "
                        "with tc; --nproc ranks in all (default 2 per node), spread node by node")
    g.add_argument("--inter-node-gbit", type=float, default=1.0, metavar="R",
                   help="with --emulate-nodes: each node's egress rate in Gbit/s (tc tbf; default 1)")


def check_args(parser, args) -> None:
    """Refuse bad emulated-cluster flags (parser.error: usage and SystemExit(2))."""
    if args.emulate_nodes is not None and (args.emulate_nodes < 1 or args.inter_node_gbit <= 0):
        parser.error("--emulate-nodes must be >= 1 and --inter-node-gbit > 0")


def dispatch(kind: str, args, argv: List[str]) -> Optional[int]:
    """With --emulate-nodes, outside the ranks: build the cluster, run ``python -m paracomm.bench <kind>`` in
    it on CPU ranks and return the exit code; None when this process should run the benchmark itself (no
    emulation asked for, or it is a rank inside the cluster)."""
    if args.emulate_nodes is None or os.environ.get(ENV_MARK):
        return None
    try:
        return run([kind, "--device", "cpu"] + strip_flags(argv), nodes=args.emulate_nodes,
                   gbit=args.inter_node_gbit, nproc=args.nproc, timeout_s=max(600.0, 4 * args.timeout))
    except (RuntimeError, ValueError) as e:
        print(f"paracomm-bench {kind}: {e}", file=sys.stderr)
        return 2


def strip_flags(argv: List[str]) -> List[str]:
    """``argv`` without --emulate-nodes / --inter-node-gbit / --nproc (and their values): what each rank runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--emulate-nodes", "--inter-node-gbit", "--nproc"):
            skip = "=" not in a
            continue
        out.append(a)
    return out


def run(module_argv: List[str], *, nodes: int, gbit: float, nproc: Optional[int], timeout_s: float,
        module: str = "paracomm.bench", stdout=None) -> int:
    """Run ``python -m <module> <module_argv>`` as a torchrun-style job over an emulated cluster; returns the
    worst exit code (0 when every rank succeeded). Raises RuntimeError when the emulation cannot be built."""
    why = problem()
    if why is not None:
        raise RuntimeError(f"emulate: {why}")
    world = nproc if nproc is not None else 2 * nodes
    if world < nodes:
        raise ValueError(f"emulate: --nproc ({world}) must be at least --emulate-nodes ({nodes})")
    per_node = -(-world // nodes)
    procs: List[subprocess.Popen] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for s in previous:
        signal.signal(s, on_signal)
    cluster = Cluster(nodes, gbit)
    try:
        with cluster:
            for rank in range(world):
                m = min(rank // per_node, nodes - 1)
                local = rank - m * per_node
                env = dict(os.environ)
                for k in ("PARACOMM_NODE_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
                    env.pop(k, None)
                env.update({
                    "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                    "LOCAL_WORLD_SIZE": str(min(per_node, world - m * per_node)),
                    "MASTER_ADDR": cluster.address(0), "MASTER_PORT": str(PORT), "GLOO_SOCKET_IFNAME": "eth0",
                    ENV_MARK: f"{m}/{nodes}/{gbit:g}",
                })
                cmd = ["ip", "netns", "exec", cluster.ns(m), sys.executable, "-m", module] + list(module_argv)
                procs.append(subprocess.Popen(cmd, env=env, stdout=stdout if rank == 0 else subprocess.DEVNULL,
                                              start_new_session=True))
            return _wait(procs, timeout_s)
    finally:
        _kill(procs)
        for s, h in previous.items():
            signal.signal(s, h)


def _wait(procs: List[subprocess.Popen], timeout_s: float) -> int:
    """Wait for every rank; the first failure (or the deadline) kills the others. Returns the worst code."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return max(abs(c) for c in codes)
        failed = [c for c in codes if c not in (None, 0)]
        if failed or time.monotonic() > deadline:
            print(f"# emulate: {'a rank failed (exit ' + str(failed[0]) + ')' if failed else 'deadline passed'}: "
                  "stopping the other ranks", file=sys.stderr, flush=True)
            _kill(procs)
            return failed[0] if failed else 124
        time.sleep(0.2)


def _kill(procs: List[subprocess.Popen]) -> None:
    """Kill every rank we started that is still running (each leads its own session: its group id is its pid)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def describe() -> Optional[str]:
    """In a rank of an emulated run: 'emulated node m of M, R Gbit/s tbf between nodes'; else None."""
    mark = os.environ.get(ENV_MARK)
    if not mark:
        return None
    m, nodes, gbit = mark.split("/")
    return (f"emulated cluster: {nodes} network namespaces (this rank on node {m}), each node's egress shaped to "
            f"{gbit} Gbit/s (tc tbf), ranks of a node over its loopback (gloo) or shared memory (paracomm's "
            "mixed transport)")
