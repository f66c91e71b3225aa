"""Flag parsing shared by the benchmark modes, so ``64M`` means the same in every mode."""
from __future__ import annotations

import argparse

SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"64"``, ``"1K"``, ``"32M"``, ``"1G"``: binary multiples (as nccl-tests), a trailing B allowed, at least 1.

    Raises:
        argparse.ArgumentTypeError: anything else (argparse turns it into a usage error, exit status 2).
    """
    s = str(text).strip().upper()
    if s.endswith("B") and len(s) > 1 and s[-2] in "KMG":
        s = s[:-1]
    suffix = s[-1] if s and s[-1] in "KMG" else ""
    digits = s[:-1] if suffix else s
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected a number with an optional K, M or G")
    value = int(digits) * SIZE_SUFFIXES[suffix]
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1")
    return value


def parse_count(text: str) -> int:
    """An element count with the same suffixes as :func:`parse_size` (``"64M"`` = 64 * 2**20 elements)."""
    s = str(text).strip().upper()
    if s.endswith("B"):
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: a count of elements takes K, M or G, not B")
    try:
        return parse_size(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"invalid count {text!r}: expected a whole number of elements >= 1, with an optional K, M or G "
            "(binary: 64M = 64 * 2**20)") from None
