"""Build paracomm._C.

One install path (``pip install --no-build-isolation -e .``), two flavours:

* CUDA build (CUDAExtension) when torch was built with CUDA and nvcc is found: every source under csrc/,
  linked against NCCL from the nvidia-nccl wheel or from $NCCL_HOME.
* CPU build (CppExtension) otherwise, or with PARACOMM_FORCE_CPU=1: csrc/ops.cpp, csrc/cpu/ and the
  torch-free ring schedule. Every op has a real CPU implementation; nothing is stubbed.
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns):
    files = []
    for pattern in patterns:
        files += sorted(glob.glob(os.path.join("csrc", pattern)))
    return files


def _nccl_home():
    """Directory holding include/nccl.h and lib/libnccl.so.2: $NCCL_HOME, else the nvidia-nccl wheel."""
    home = os.environ.get("NCCL_HOME")
    if home:
        return home
    try:
        import nvidia.nccl as nccl_pkg  # nvidia-nccl-cu12 / -cu13 wheels

        return list(nccl_pkg.__path__)[0]
    except ImportError:
        raise RuntimeError(
            "paracomm: the CUDA build needs NCCL: pip install nvidia-nccl-cu13 (or set NCCL_HOME, "
            "or PARACOMM_FORCE_CPU=1 for a CPU build)"
        )


def _want_cuda():
    if os.environ.get("PARACOMM_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


CXX_FLAGS = ["-O3", "-std=c++17", "-Wall", "-Wno-unused-function"]
common_sources = _sources("*.cpp", "cpu/*.cpp", "ring/schedule.cpp")

if _want_cuda():
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    nccl = _nccl_home()
    ext = cpp_extension.CUDAExtension(
        name="paracomm._C",
        sources=common_sources + _sources("cuda/*.cpp", "cuda/*.cu", "kernels/*.cu", "ring/nccl_*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(nccl, "include")],
        library_dirs=[os.path.join(nccl, "lib")],
        # The wheel ships libnccl.so.2 without the libnccl.so symlink, so name the file itself.
        extra_link_args=["-l:libnccl.so.2", f"-Wl,-rpath,{os.path.join(nccl, 'lib')}"],
        define_macros=[("PARACOMM_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": CXX_FLAGS,
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
else:
    ext = cpp_extension.CppExtension(
        name="paracomm._C",
        sources=common_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
