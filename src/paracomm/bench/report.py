"""What every launched benchmark mode writes besides its table: the ``--json`` flag and the JSON file.

Every mode's JSON has the same top level: ``benchmark`` (the mode), ``header`` (:func:`launch.run_header` plus the
mode's own facts), ``rows`` and, where the mode has one, ``summary``.
"""
from __future__ import annotations

import json
from typing import Optional


def add_json_arg(group, what: str = "the header and every row") -> None:
    """The ``--json FILE`` flag on an argparse parser or argument group."""
    group.add_argument("--json", metavar="FILE", default=None, help=f"write {what} as JSON")


def add_iteration_args(group, *, iters: int, warmup: int, per: str) -> None:
    """``-n/--iters`` (timed) and ``-w/--warmup_iters`` (untimed, first), counted ``per`` something ("size",
    "variant", ...)."""
    group.add_argument("-n", "--iters", type=int, default=iters, help=f"timed runs per {per} (default {iters})")
    group.add_argument("-w", "--warmup_iters", type=int, default=warmup,
                       help=f"untimed runs per {per} first (default {warmup})")


def write_json(path: Optional[str], benchmark: str, header: dict, rows: list, summary: Optional[dict] = None) -> None:
    """Write the mode's results to ``path`` (nothing when None) and say so on stdout."""
    if not path:
        return
    out = {"benchmark": benchmark, "header": header, "rows": rows}
    if summary is not None:
        out["summary"] = summary
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"# wrote {path}", flush=True)
