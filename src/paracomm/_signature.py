"""The identity of a collective call, which every rank must agree on, and how disagreement is reported.

A call's *signature* is a tuple of small integers, one per field of :data:`FIELDS`, in that order: the
collective, every argument that shapes the data exchanged, and every setting that changes the plan (the
algorithm, the chunk size). Two ranks whose signatures are equal build plans that exchange the same bytes in
the same order; two ranks whose signatures differ in any field must not exchange data at all.

Adding a collective or a plan parameter: append a field to :data:`FIELDS` (name, describe) and produce its value
in ``comm._signature``. Every consumer (the gloo per-call header, the NCCL store handshake, the data tags, the
error text) follows from this table, so no check can silently miss the new field. Ranks must run the same
paracomm version: the header's length is ``len(FIELDS) + 1`` and is not itself negotiated (its first word,
:data:`HEADER_MAGIC`, changes whenever the table does).

How the gloo path uses it (comm.Communicator, every call unless ``PARACOMM_CHECK_SHAPES=0``):

* Every data transfer of the call carries a tag derived from the signature (:func:`tag_base`): a receive
  posted by a rank with signature A only ever matches a send posted with signature A. gloo writes a message only
  once the matching receive is posted, so bytes from a call with another signature never land in this call's
  buffers (and never trip gloo's fatal "received more bytes than posted" check). That alone turns a mismatch
  into a stall, never wrong data; it costs nothing, and stays on when checking is off.
* The call also sends its signature (the *header*, a fixed-size int64 vector on :data:`HEADER_TAG`) to every
  other rank and receives theirs, posted together with the first data transfers; the rank checks the headers
  before it waits for any data. Equal: the data is flowing already (the header costs two small messages per
  peer, not a round trip). Different: every rank sees every header, so every rank raises the same error naming
  each field that differs, at once.

A tag collision (two different signatures with the same 18-bit hash) would let data of the same step index flow
between them before the header check: the probability is 2^-18 per mismatched call, and the header still
reports the mismatch on the ranks that survive gloo's size check. Equal signatures always get equal tags.
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
ALGORITHMS = ("auto", "ring", "direct", "one_shot")
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
)
FIELD_NAMES = tuple(name for name, _ in FIELDS)

# First word of every header: the signature format's version (bumped with FIELDS) in the high bits.
HEADER_MAGIC = (0x7061 << 16) | len(FIELDS)
HEADER_TAG = 1 << 30  # gloo tag of the header messages; data tags stay below it
_STEP_BITS = 12
_HASH_BITS = 30 - _STEP_BITS
STEP_MASK = (1 << _STEP_BITS) - 1


def header(signature: tuple) -> torch.Tensor:
    """The int64 vector a rank sends to every peer: [HEADER_MAGIC, *signature]."""
    return torch.tensor((HEADER_MAGIC,) + tuple(signature), dtype=torch.int64)


def tag_base(signature: tuple) -> int:
    """Data tag of step 0 of a call with this signature; step i uses ``tag_base | (i & STEP_MASK)``.

    Python's hash of a tuple of ints is the same in every process (only str/bytes hashing is randomised), so
    equal signatures give equal tags on every rank. The result is in [0, HEADER_TAG).
    """
    return (hash(tuple(signature)) & ((1 << _HASH_BITS) - 1)) << _STEP_BITS


def mismatch_error(signatures: Sequence[Sequence[int]], where: str) -> Optional[RuntimeError]:
    """None when every rank's signature (index = rank) agrees; else a RuntimeError naming every field that
    differs with each rank's value. ``where`` prefixes the message (e.g. "paracomm.all_reduce (rank 0 of 2)")."""
    first = tuple(signatures[0])
    if all(tuple(s) == first for s in signatures):
        return None
    parts = []
    for f, (field, describe) in enumerate(FIELDS):
        values = [s[f] if f < len(s) else None for s in signatures]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {'?' if v is None else describe(v)}" for r, v in enumerate(values))
            parts.append(f"{field} differs ({per_rank})")
    if not parts:  # different lengths only: another paracomm version
        parts.append("the signature formats differ (ranks run different paracomm versions)")
    return RuntimeError(f"{where}: ranks called the collective with different arguments ("
                        + ", ".join(FIELD_NAMES) + " must match on every rank): " + "; ".join(parts))


def decode_header(values: Sequence[int]) -> list:
    """The signature inside a received header, or the raw words when the magic is not ours."""
    values = list(values)
    if values and values[0] == HEADER_MAGIC:
        return values[1:]
    return values
