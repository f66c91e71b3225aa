"""The identity of a collective call, which every rank must agree on, and how disagreement is reported.

A call's *signature* is a tuple of small integers, one per field of :data:`FIELDS`, in that order: the
collective, every argument that shapes the data exchanged, and every setting that changes the plan (the
algorithm, the chunk size, the node map). Two ranks whose signatures are equal build plans that exchange the
same bytes in the same order; two ranks whose signatures differ in any field must not exchange data at all.

Adding a collective or a plan parameter: append a field to :data:`FIELDS` (name, describe) and produce its value
in ``comm._signature``. Every consumer (the data tags, the stall monitor's store records, the NCCL store
handshake, the shared-memory entry check, the error text) follows from this table, so no check can silently
miss the new field. Ranks must run the same paracomm version (the store records are not versioned).

What is guaranteed on the gloo transport (comm.Communicator; paracomm._monitor has the mechanism):

* **Never foreign data.** Every data transfer of a call carries a tag whose high bits identify the signature
  (:class:`TagRegistry`): a receive posted by a rank with signature A only ever matches a send posted with
  signature A, and gloo writes a message only once the matching receive is posted. The tag of a signature comes
  from a registry in the group's store, consulted once per new signature per rank (the only store round trip
  of a call's fast path, at first sight): the first rank to use a tag number claims it for its signature
  (``compare_set``), so two different signatures of one Communicator never share a tag, and a mismatched call
  exchanges nothing with the ranks that disagree with it: it stalls. This stays on with ``PARACOMM_CHECK_SHAPES=0``.
* **Every rank raises the mismatch within the timeout** (``PARACOMM_CHECK_SHAPES`` 1, the default, or 2).
  Nothing is sent per call for it. A monitor thread per Communicator notices a call in flight for longer than
  :func:`stall_threshold` (min(1 s, timeout / 8)), publishes ``seq|signature`` for this rank to the store
  (:func:`encode_record`: one key per rank, overwritten; ``seq`` counts the Communicator's CPU calls, so stale
  records of earlier calls are ignored) and reads the peers' records: a peer at the same ``seq`` with another
  signature is a mismatch (a peer without a record at this ``seq`` is merely slow: no verdict). The rank that
  finds it writes a verdict key, so the others (which read before its record existed) learn it at their next
  tick; each rank then interrupts its own blocked waits and raises :func:`mismatch_error` naming every field
  that differs with each rank's value. A transport error in a call (a peer that gave up first closed the
  connection, or the deadline passed) consults the records once before it is reported, so it becomes the
  mismatch too. The Communicator stays usable: the private gloo group, where unmatched transfers are left
  posted, is replaced on every rank (all of them raise at the same ``seq``).
* What is written: a mismatched all-reduce or reduce-scatter writes nothing into its output (every reduction
  waits for its step's transfers, which never complete); an all-gather has already copied this rank's own input
  into its own output segment, and receives from ranks that agree with it may have landed (their data, from a
  call with the same signature).
* ``PARACOMM_CHECK_SHAPES=0``: no monitor diagnosis; a mismatched call stalls until the timeout and raises
  "no answer" (still never foreign data).

On the shared-memory transport the signature is part of every call's entry handshake (paracomm._shm): a
mismatch raises on every rank before any data moves, whatever ``PARACOMM_CHECK_SHAPES`` says. Calls that it
hands to its gloo fallback get the guarantees above.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

# torch dtype -> the core's DType code (csrc/dtype.h).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
OPS = ("sum", "avg")
ALGORITHMS = ("auto", "ring", "direct", "one_shot", "hierarchical")
# Collectives that carry a signature; the index is the field's value. New collectives append.
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")


def _name_in(table: Sequence[str]) -> Callable[[int], str]:
    return lambda v: table[v] if 0 <= v < len(table) else str(v)


def _dtype_name(v: int) -> str:
    return "none" if v < 0 else str(CODE_DTYPES.get(v, v))


def _given(v: int) -> str:
    return "given" if v else "none"


def _chunk(v: int) -> str:
    return "plan default" if v == 0 else f"{v} bytes (PARACOMM_CHUNK_BYTES)"


def _node_map(v: int) -> str:
    return "one node" if v == 0 else f"node map code {v} (paracomm._topology.node_map_code)"


# (field, how a value is shown in an error). The order is the signature's order.
FIELDS: Tuple[Tuple[str, Callable[[int], str]], ...] = (
    ("collective", _name_in(COLLECTIVES)),
    ("numel", str),
    ("dtype", _dtype_name),
    ("op", _name_in(OPS)),
    ("wire_dtype", _dtype_name),
    ("scale", _given),
    ("found_inf", _given),
    ("algorithm", _name_in(ALGORITHMS)),
    ("chunk_bytes", _chunk),
    ("node_map", _node_map),  # the plan's rank -> node map (0: one node, or CUDA, whose plans are flat)
)
FIELD_NAMES = tuple(name for name, _ in FIELDS)

_STEP_BITS = 12
_TAG_BITS = 31  # gloo tags are non-negative C ints
_HASH_BITS = _TAG_BITS - _STEP_BITS
STEP_MASK = (1 << _STEP_BITS) - 1
_MAX_PROBES = 64  # tag numbers tried for one signature before the registry gives up


# The NCCL per-call check's header (csrc/allreduce/nccl_comm.h, "Per-call signature check"): every rank sends
# [HEADER_MAGIC, *signature] to every peer in the call's first NCCL group; the first word is the signature
# format's version (bumped with FIELDS), so ranks running different paracomm versions are told so.
HEADER_MAGIC = (0x7061 << 16) | len(FIELDS)


def header_words(signature: tuple) -> list:
    """The int64 words of a call's NCCL header: [HEADER_MAGIC, *signature] (len(FIELDS) + 1 words)."""
    return [HEADER_MAGIC] + [int(v) for v in signature]


def decode_header(values: Sequence[int]) -> list:
    """The signature inside a received header, or the raw words when the magic is not ours."""
    values = list(values)
    if values and values[0] == HEADER_MAGIC:
        return values[1:]
    return values


def candidate_tag_base(signature: tuple, probe: int) -> int:
    """The ``probe``-th tag base a signature may claim (step i of the call uses ``base | (i & STEP_MASK)``).

    Python's hash of a tuple of ints is the same in every process (only str/bytes hashing is randomised), so
    every rank tries the same candidates in the same order. Probe 0 is the hash of the signature itself.
    """
    key = tuple(signature) if probe == 0 else (probe,) + tuple(signature)
    return (hash(key) & ((1 << _HASH_BITS) - 1)) << _STEP_BITS


def signature_text(signature: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in signature)


class TagRegistry:
    """Signature -> data tag base, the same on every rank and different for different signatures.

    Args:
        store: the group's store (shared by every rank of the Communicator).
        prefix: the Communicator's store prefix (the same on every rank).

    ``tag_base(signature)`` tries :func:`candidate_tag_base` probes 0, 1, ...: each claims the store key
    ``<prefix>/tag/<base>`` for the signature with ``compare_set`` (set it if absent, else return what is
    there). A key holding this signature (set by this rank or any other) is the answer; one holding another
    signature means a hash collision, and the next probe is tried. Every rank walks the same probes, so every
    rank ends at the same base. Answers are cached (one store round trip per new signature per rank). Raises
    RuntimeError when ``_MAX_PROBES`` probes are taken (about 2^19 distinct signatures in one Communicator) and
    whatever the store raises.
    """

    def __init__(self, store, prefix: str):
        self._store = store
        self._prefix = prefix
        self._bases: dict = {}

    def tag_base(self, signature: tuple) -> int:
        base = self._bases.get(signature)
        if base is not None:
            return base
        text = signature_text(signature)
        for probe in range(_MAX_PROBES):
            candidate = candidate_tag_base(signature, probe)
            holder = bytes(self._store.compare_set(f"{self._prefix}/tag/{candidate}", "", text)).decode()
            if holder == text:
                if len(self._bases) >= 4096:  # bounded: a re-claim after eviction returns the same base
                    self._bases.pop(next(iter(self._bases)))
                self._bases[signature] = candidate
                return candidate
        raise RuntimeError(f"paracomm: no free data tag for signature {text} after {_MAX_PROBES} probes "
                           "(too many distinct calls in one Communicator); create a new Communicator")


def stall_threshold(timeout_s: float) -> float:
    """Seconds a call may be in flight before the monitor compares signatures through the store."""
    return min(1.0, timeout_s / 8)


def encode_record(seq: int, signature: Sequence[int]) -> str:
    """The store record of a rank's in-flight call: ``"seq|v0,v1,..."``."""
    return f"{seq}|{signature_text(signature)}"


def decode_record(value) -> Tuple[int, tuple]:
    """(seq, signature) of a record; (-1, ()) for anything else (never a false mismatch)."""
    try:
        seq, _, sig = bytes(value).decode().partition("|")
        return int(seq), tuple(int(v) for v in sig.split(",")) if sig else ()
    except (ValueError, UnicodeDecodeError):
        return -1, ()


def mismatch_error(signatures: Sequence[Optional[Sequence[int]]], where: str) -> Optional[RuntimeError]:
    """None when every known signature (index = rank; None: not known, shown as "?") agrees; else a
    RuntimeError naming every field that differs with each rank's value. ``where`` prefixes the message (e.g.
    "paracomm.all_reduce (rank 0 of 2)")."""
    known = [tuple(s) for s in signatures if s is not None]
    if not known or all(s == known[0] for s in known):
        return None
    parts = []
    for f, (field, describe) in enumerate(FIELDS):
        values = [None if s is None or f >= len(s) else s[f] for s in signatures]
        present = [v for s, v in zip(signatures, values) if s is not None]
        if any(v != present[0] for v in present):
            per_rank = ", ".join(f"rank {r}: {'?' if v is None else describe(v)}" for r, v in enumerate(values))
            parts.append(f"{field} differs ({per_rank})")
    if not parts:  # different lengths only: another paracomm version
        parts.append("the signature formats differ (ranks run different paracomm versions)")
    return RuntimeError(f"{where}: ranks called the collective with different arguments ("
                        + ", ".join(FIELD_NAMES) + " must match on every rank): " + "; ".join(parts))
