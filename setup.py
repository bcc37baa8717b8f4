"""Builds maskformer_fast._C: the C++ sources always, the CUDA sources when torch has
CUDA and nvcc is found, or when MASKFORMER_FAST_CUDA=1 forces it (MASKFORMER_FAST_CUDA=0
turns it off). Build with `pip install -e . --no-build-isolation` once torch is installed.

The environment is read, never written: the defaults below (CUDA_HOME, the CUDA
architectures) go to torch's build helpers directly.
"""

import glob
import logging
import os
import shutil

import torch
from setuptools import setup

# No GPU to detect on the build machines: without TORCH_CUDA_ARCH_LIST, these architectures
# (sm_75 is nvcc 13's lowest).
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# torch guesses /usr/local when /usr/local/bin/nvcc is a wrapper, then cannot link cudart:
# without CUDA_HOME (or CUDA_PATH), this toolkit where it exists. torch's helpers read its
# path from their module (found when it is imported, its guess logged then): set there.
DEFAULT_CUDA_HOME = "/usr/local/cuda"
default_cuda_home = not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.isdir(
    DEFAULT_CUDA_HOME
)
if default_cuda_home:  # (not the guess that is replaced)
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: "using CUDA_HOME" not in record.getMessage()
    )

from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if default_cuda_home:
    cpp_extension.CUDA_HOME = DEFAULT_CUDA_HOME


def cuda_arch_flags() -> list[str]:
    """nvcc's -gencode flags for DEFAULT_CUDA_ARCHS when TORCH_CUDA_ARCH_LIST is unset or
    empty, else none: torch turns the variable into flags, and adds none of its own when
    the nvcc flags already name architectures (torch.utils.cpp_extension._get_cuda_arch_flags).
    "X.Y" is sm_XY code, "X.Y+PTX" that and compute_XY PTX, as torch builds them."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    flags = []
    for arch in DEFAULT_CUDA_ARCHS.split(";"):
        num = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def want_cuda() -> bool:
    forced = os.environ.get("MASKFORMER_FAST_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def extension():
    here = os.path.dirname(os.path.abspath(__file__))
    # C++ sources named *cuda* are the CUDA kernels' host side: built with them only.
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    sources = [s for s in cpp if "cuda" not in os.path.basename(s)]
    # Exact IEEE arithmetic (no fast-math, no contraction); -fno-trapping-math only lets
    # the compiler vectorise the solver's branch-free relax loop. -fno-wrapv undoes the
    # -fwrapv of Python's own flags: with 32-bit indices allowed to wrap, GCC cannot turn
    # them into pointer increments and the solver runs up to 2x slower. The CPU kernels
    # are tuned for the build machine (-march=native); MASKFORMER_FAST_CPU_ARCH=x86-64-v2
    # (or any -march value) builds for other machines.
    arch = os.environ.get("MASKFORMER_FAST_CPU_ARCH", "native")
    cxx = ["-std=c++20", "-O3", "-fopenmp", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math"]
    cxx += ["-fno-wrapv"]
    cxx += [f"-march={arch}"] if arch else []
    link = ["-fopenmp"]
    if os.environ.get("MASKFORMER_FAST_SANITIZE") == "1":  # scripts/sanitize.sh
        cxx += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        link += ["-fsanitize=address,undefined"]
    if not want_cuda():
        return CppExtension(
            "maskformer_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    sources += [s for s in cpp if s not in sources] + sorted(glob.glob("csrc/**/*.cu", recursive=True))
    # ATen/cuda headers want cusparse.h, which ships with torch's nvidia wheels.
    include_dirs = [os.path.join(here, "csrc")]
    import nvidia  # noqa: PLC0415  (installed with the CUDA build of torch)

    for root in nvidia.__path__:
        include_dirs += glob.glob(os.path.join(root, "cu*", "include"))
    nvcc = ["-std=c++20", "-O3", "-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr"]
    nvcc += cuda_arch_flags()
    return CUDAExtension(
        "maskformer_fast._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
