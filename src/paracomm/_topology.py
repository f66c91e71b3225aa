"""Which node each rank of a group is on: the node map (rank -> node) that hierarchical plans are generated from.

A node is a set of ranks that share a host *and* a network namespace (what they can reach over loopback and
shared memory). Each rank's host identity is ``hostname/boot id/network-namespace inode``; the identities are
exchanged once per Communicator through the group's store (so a subgroup gets its own, correct map, where
``LOCAL_WORLD_SIZE`` would describe the whole job). Overrides, for tests and for machines where host identity
misleads: ``Communicator(node_size=K)`` or ``PARACOMM_NODE_SIZE=K`` (ranks [0, K) are node 0, [K, 2K) node 1, ...;
the last node may be smaller).

Nodes are numbered by first appearance in rank order (rank 0 is on node 0), the spelling the plan generator checks
(csrc/allreduce/hierarchical.h), so equal maps are equal lists on every rank.
"""
from __future__ import annotations

import os
import socket
import zlib
from datetime import timedelta
from typing import List, Optional

__all__ = ["host_identity", "node_map_from_size", "canonical_node_map", "discover_node_map", "check_node_size",
           "env_node_size", "explain_node_map", "node_map_code", "describe_node_map"]


def host_identity() -> str:
    """``hostname/boot id/netns inode`` of this process: equal exactly for processes on one node."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "-"
    try:
        netns = str(os.stat("/proc/self/ns/net").st_ino)  # ranks in different network namespaces: different nodes
    except OSError:
        netns = "-"
    return f"{socket.gethostname()}/{boot}/{netns}"


def check_node_size(node_size, world_size: int, name: str) -> int:
    """``node_size`` as an int in [1, world_size]; TypeError / ValueError naming the argument otherwise."""
    if isinstance(node_size, bool) or not isinstance(node_size, int):
        raise TypeError(f"{name}: node_size must be None or an int (ranks per node), got {node_size!r}")
    if node_size < 1 or node_size > world_size:
        raise ValueError(f"{name}: node_size must be in [1, world_size={world_size}], got {node_size}")
    return node_size


def env_node_size(world_size: int) -> Optional[int]:
    """PARACOMM_NODE_SIZE as an int (clamped to world_size, so one setting serves every subgroup), or None."""
    value = os.environ.get("PARACOMM_NODE_SIZE", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"paracomm: PARACOMM_NODE_SIZE must be a positive integer (ranks per node), got {value!r}")
    return min(int(value), world_size)


def explain_node_map(node_size, world_size: int, name: str) -> List[int]:
    """The node map the ``explain_*`` functions plan for: ``node_size`` when given (checked, naming the argument),
    else ``PARACOMM_NODE_SIZE`` as a Communicator without ``node_size`` would read it, else [] (one node, no
    topology keys). Pure: nothing is exchanged (host identities need a process group)."""
    if node_size is None:
        node_size = env_node_size(world_size)
        if node_size is None:
            return []
    else:
        node_size = check_node_size(node_size, world_size, name)
    return node_map_from_size(world_size, node_size)


def node_map_from_size(world_size: int, node_size: int) -> List[int]:
    """Ranks [0, K) on node 0, [K, 2K) on node 1, ...: ``[r // node_size for r in range(world_size)]``."""
    return [r // node_size for r in range(world_size)]


def canonical_node_map(identities: list) -> List[int]:
    """Node numbers by first appearance in rank order for any per-rank labels."""
    numbers: dict = {}
    return [numbers.setdefault(x, len(numbers)) for x in identities]


def discover_node_map(store, prefix: str, rank: int, world_size: int, timeout: timedelta,
                      node_size: Optional[int] = None) -> List[int]:
    """The group's node map: from ``node_size`` (or PARACOMM_NODE_SIZE) when given, else by host identity through
    ``store`` (one key per rank under ``prefix``; every rank of the group must call this, like a collective).

    Raises RuntimeError when the exchange does not complete within ``timeout`` (a rank did not get here).
    """
    if node_size is None:
        node_size = env_node_size(world_size)
    if node_size is not None:
        return node_map_from_size(world_size, node_size)
    if world_size == 1:
        return [0]
    store.set(f"{prefix}/topo/{rank}", host_identity())
    keys = [f"{prefix}/topo/{r}" for r in range(world_size)]
    try:
        store.wait(keys, timeout)
        identities = [bytes(store.get(k)).decode() for k in keys]
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"paracomm: finding the node map through the store did not complete within "
                           f"{timeout.total_seconds():g} s (a rank may have died or not called): {e}") from e
    return canonical_node_map(identities)


def node_map_code(node_map: List[int]) -> int:
    """A 31-bit code of the node map for the call signature (ranks whose maps differ must not run a plan)."""
    return zlib.crc32(",".join(map(str, node_map)).encode()) & 0x7FFFFFFF


def describe_node_map(node_map: List[int]) -> str:
    """'2 nodes x 4 ranks', or '2 nodes (3+2 ranks)' when uneven."""
    sizes = [node_map.count(m) for m in range(max(node_map) + 1)] if node_map else [1]
    if len(set(sizes)) == 1:
        return f"{len(sizes)} node{'s' if len(sizes) > 1 else ''} x {sizes[0]} rank{'s' if sizes[0] > 1 else ''}"
    return f"{len(sizes)} nodes ({'+'.join(map(str, sizes))} ranks)"
