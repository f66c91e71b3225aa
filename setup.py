"""Build paracomm._C.

One install path (``pip install --no-build-isolation .``, or ``-e .``), two flavours:

* CUDA build (CUDAExtension) when torch was built with CUDA and nvcc is found: the common sources plus the
  CUDA ones (below), linked against NCCL from the nvidia-nccl wheel or from $NCCL_HOME.
* CPU build (CppExtension) otherwise, or with PARACOMM_FORCE_CPU=1. Every op has a real CPU implementation;
  nothing is stubbed.

Sources are picked by directory, so a file added under one of these folders is built without editing this file:
  both builds:  csrc/*.cpp, csrc/cpu/*.cpp, csrc/allreduce/*.cpp (except nccl_*.cpp), csrc/shm/*.cpp
  CUDA only:    csrc/cuda/*.cpp, csrc/cuda/*.cu, csrc/kernels/*.cu, csrc/allreduce/nccl_*.cpp

The C++ standard is left to torch's BuildExtension, which adds the one its headers need (C++20 for torch 2.13
and 2.14); setting one here would break either older or newer torch.

Environment: TORCH_CUDA_ARCH_LIST (e.g. "9.0"), NCCL_HOME, CUDA_HOME, MAX_JOBS, PARACOMM_FORCE_CPU=1,
PARACOMM_PTXAS_VERBOSE=1 (ptxas register / spill / stack report of every kernel in the build log),
PARACOMM_DEBUG_INFO=1 (compile with -g; off by default: debug info for torch's headers costs ~40% of the
build time).
"""
import fnmatch
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns, exclude=()):
    """Files under csrc/ matching any pattern (sorted, relative to the repository), minus those whose base name
    matches a pattern in `exclude`."""
    files = set()
    for pattern in patterns:
        for path in glob.glob(os.path.join("csrc", pattern)):
            if not any(fnmatch.fnmatch(os.path.basename(path), ex) for ex in exclude):
                files.add(path)
    return sorted(files)


def _nccl_home():
    """Directory holding include/nccl.h and lib/libnccl.so.2: $NCCL_HOME, else the nvidia-nccl wheel."""
    home = os.environ.get("NCCL_HOME")
    if home:
        if not os.path.exists(os.path.join(home, "include", "nccl.h")):
            raise RuntimeError(f"paracomm: NCCL_HOME={home} has no include/nccl.h (it should name the directory "
                               "that holds include/nccl.h and lib/libnccl.so*)")
        return home
    try:
        import nvidia.nccl as nccl_pkg  # nvidia-nccl-cu12 / -cu13 wheels

        return list(nccl_pkg.__path__)[0]
    except ImportError:
        raise RuntimeError(
            f"paracomm: the CUDA build (torch {torch.__version__}, CUDA {torch.version.cuda}) needs NCCL: "
            f"pip install nvidia-nccl-cu{torch.version.cuda.split('.')[0]} (the version torch pins, see "
            "`pip show torch`), or set NCCL_HOME to a directory with include/nccl.h and lib/libnccl.so*, "
            "or PARACOMM_FORCE_CPU=1 for a CPU build"
        ) from None


def _has_cuda_headers(home):
    return bool(home) and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))


def _toolkit_of_nvcc(nvcc):
    """The CUDA toolkit root the given nvcc belongs to, or None. Follows symlinks, then asks nvcc itself: a
    wrapper script (e.g. /usr/local/bin/nvcc that execs /usr/local/cuda-13.0/bin/nvcc) makes torch guess the
    wrong root, but `nvcc --dryrun` prints the real one (_HERE_=<toolkit>/bin)."""
    real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _has_cuda_headers(real):
        return real
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ _HERE_=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    if m:
        home = os.path.normpath(os.path.join(m.group(1).strip(), ".."))
        if _has_cuda_headers(home):
            return home
    return None


def _cuda_home():
    """The CUDA toolkit root for a CUDA build, or None when there is no nvcc (then: CPU build).

    torch guesses CUDA_HOME from $CUDA_HOME / $CUDA_PATH, else from where `nvcc` is on PATH, else
    /usr/local/cuda. When that guess has no include/cuda_runtime_api.h (typically nvcc is a wrapper script, so
    the guess is its parent directory), the real toolkit is looked up from nvcc; if none is found the build
    stops here with what to set, rather than later on a missing header."""
    home = cpp_extension.CUDA_HOME
    if _has_cuda_headers(home):
        return home
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):  # set by the user: say it is wrong rather than silently use another toolkit
            raise RuntimeError(
                f"paracomm: {var}={os.environ[var]} has no include/cuda_runtime_api.h. Set it to the CUDA "
                "toolkit's root (the directory holding bin/nvcc and include/cuda_runtime_api.h, often "
                "/usr/local/cuda), or unset it, or PARACOMM_FORCE_CPU=1 for a CPU build."
            )
    nvcc = shutil.which("nvcc")
    if nvcc is None and home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        nvcc = os.path.join(home, "bin", "nvcc")
    if nvcc is None:
        return None
    found = _toolkit_of_nvcc(nvcc)
    if found is None and _has_cuda_headers("/usr/local/cuda"):
        found = "/usr/local/cuda"
    if found is None:
        raise RuntimeError(
            f"paracomm: torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is at {nvcc}, but the CUDA "
            f"toolkit root torch uses (CUDA_HOME={home}) has no include/cuda_runtime_api.h and none was found from "
            "nvcc. Set CUDA_HOME to the toolkit's root (the directory holding bin/nvcc and "
            "include/cuda_runtime_api.h, often /usr/local/cuda), or PARACOMM_FORCE_CPU=1 for a CPU build."
        )
    if found != home:
        print(f"paracomm: CUDA_HOME={home} has no CUDA headers; using the toolkit of {nvcc}: {found}")
    # cpp_extension reads its module-level CUDA_HOME for nvcc's path, include and library directories.
    cpp_extension.CUDA_HOME = found
    os.environ["CUDA_HOME"] = found
    return found


def _want_cuda():
    if os.environ.get("PARACOMM_FORCE_CPU", "0") == "1":
        return False
    if torch.version.cuda is None:
        return False
    if _cuda_home() is None:
        print(f"paracomm: torch {torch.__version__} has CUDA {torch.version.cuda} but no nvcc was found "
              "(PATH, CUDA_HOME): building the CPU extension")
        return False
    return True


# -fopenmp: at::parallel_for is inline ATen code built on `#pragma omp parallel`; without the flag every CPU
# kernel would silently run on one thread. The extension then needs libgomp.so.1, which resolves to the copy
# torch already loaded (torch's OpenMP backend), so there is one OpenMP runtime and one thread pool.
# -g0 overrides the -g that Python's own CFLAGS put first: no debug info unless PARACOMM_DEBUG_INFO=1.
DEBUG_INFO = os.environ.get("PARACOMM_DEBUG_INFO", "0") == "1"
CXX_FLAGS = ["-O3", "-Wall", "-Wno-unused-function", "-fopenmp"] + ([] if DEBUG_INFO else ["-g0"])
LINK_FLAGS = ["-fopenmp"]
# Torch-free CPU + plan + shared-memory sources, and the torch glue of both backends' shared pieces (ops.cpp, validate*.cpp).
common_sources = _sources("*.cpp", "cpu/*.cpp", "allreduce/*.cpp", "shm/*.cpp", exclude=("nccl_*.cpp",))
cuda_sources = _sources("cuda/*.cpp", "cuda/*.cu", "kernels/*.cu", "allreduce/nccl_*.cpp")


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
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if ";" in archs or " " in archs.strip():
        nvcc_flags += ["--threads", "0"]  # one nvcc thread per architecture (each is a full device compile)
    if os.environ.get("PARACOMM_PTXAS_VERBOSE", "0") == "1":
        nvcc_flags += ["-Xptxas", "-v"]  # registers, spills and stack frame of every kernel, in the build log
    ext = cpp_extension.CUDAExtension(
        name="paracomm._C",
        sources=common_sources + cuda_sources,
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
