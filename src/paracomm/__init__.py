"""paracomm: gradient communication for PyTorch data-parallel training.

* ``paracomm.unscale_and_check_``, ``paracomm.flatten``, ``paracomm.unflatten_``: fused gradient kernels.
* ``paracomm.Communicator``, ``paracomm.all_reduce``, ``paracomm.explain_all_reduce``: all-reduce (ring,
  direct and one-shot plans; NCCL for CUDA tensors, gloo for CPU).
* ``paracomm.reduce_scatter``, ``paracomm.all_gather`` (and ``explain_*``): the same engine's reduce-scatter and
  all-gather (CPU/gloo); ``paracomm.fsdp``: both inside FSDP2.
* ``paracomm.amp.GradScaler``: torch's GradScaler on the fused unscale-and-check kernel.
* ``paracomm.hooks``: DDP communication hooks on that all-reduce; ``paracomm.GradBucketer``: bucketed gradient
  all-reduce without DDP.
"""
from __future__ import annotations

__version__ = "0.1.0"

import torch

from . import _C
from . import amp
from ._ops import flatten, unflatten_, unscale_and_check_
from .comm import Communicator, all_reduce, explain_all_reduce
from .collectives import all_gather, explain_all_gather, explain_reduce_scatter, reduce_scatter
from . import hooks
from .buckets import GradBucketer


def build_info() -> dict:
    """What this installation of paracomm was built with and runs on.

    Returns:
        dict with keys ``version`` (paracomm), ``torch`` (torch.__version__), ``cuda`` (bool: the extension
        was built with CUDA), ``cuda_version`` (compiled CUDA runtime, or None), ``nccl_version`` (NCCL
        headers compiled against, or None), ``nccl_version_loaded`` (the libnccl loaded at run time, or None),
        ``archs`` (CUDA architectures compiled for, or None).
    """
    info = {"version": __version__, "torch": torch.__version__}
    info.update(_C.build_info())
    return info


__all__ = [
    "Communicator", "GradBucketer", "__version__", "all_gather", "all_reduce", "amp", "build_info",
    "explain_all_gather", "explain_all_reduce", "explain_reduce_scatter", "flatten", "hooks", "reduce_scatter",
    "unflatten_", "unscale_and_check_",
]
