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


# -fopenmp: at::parallel_for is inline ATen code built on `#pragma omp parallel`; without the flag every CPU
# kernel would silently run on one thread. The extension then needs libgomp.so.1, which resolves to the copy
# torch already loaded (torch's OpenMP backend), so there is one OpenMP runtime and one thread pool.
CXX_FLAGS = ["-O3", "-std=c++17", "-Wall", "-Wno-unused-function", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
common_sources = _sources("*.cpp", "cpu/*.cpp", "allreduce/plan*.cpp")

def _cuda_arch_list():
    """The architectures the CUDA build compiles for, pinned in TORCH_CUDA_ARCH_LIST so that the build and
    build_info()["archs"] agree: the variable if set, else the visible GPUs' capabilities, else 8.0;9.0."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            archs = ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
        else:
            archs = "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


if _want_cuda():
    archs = _cuda_arch_list()
    nccl = _nccl_home()
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("PARACOMM_PTXAS_VERBOSE", "0") == "1":
        nvcc_flags += ["-Xptxas", "-v"]  # registers, spills and stack frame of every kernel, in the build log
    ext = cpp_extension.CUDAExtension(
        name="paracomm._C",
        sources=common_sources + _sources("cuda/*.cpp", "cuda/*.cu", "kernels/*.cu", "ring/nccl_*.cpp", "allreduce/nccl_*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(nccl, "include")],
        library_dirs=[os.path.join(nccl, "lib")],
        # The wheel ships libnccl.so.2 without the libnccl.so symlink, so name the file itself.
        extra_link_args=LINK_FLAGS + ["-l:libnccl.so.2", f"-Wl,-rpath,{os.path.join(nccl, 'lib')}"],
        define_macros=[
            ("PARACOMM_WITH_CUDA", "1"),
            ("PARACOMM_WITH_NCCL", "1"),
            ("PARACOMM_CUDA_ARCHS", f'"{archs}"'),  # a string literal for build_info()
        ],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags},
    )
else:
    ext = cpp_extension.CppExtension(
        name="paracomm._C",
        sources=common_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
