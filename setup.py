"""Builds maskformer_fast._C: the C++ sources always, the CUDA sources when torch has
CUDA and nvcc is found, or when MASKFORMER_FAST_CUDA=1 forces it (MASKFORMER_FAST_CUDA=0
turns it off). Build with `pip install -e . --no-build-isolation` once torch is installed.
"""

import glob
import os
import shutil

# torch guesses /usr/local when /usr/local/bin/nvcc is a wrapper, then cannot link cudart.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
# No GPU to detect on the build machines: name the architectures (sm_75 is nvcc 13's lowest).
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


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
    return CUDAExtension(
        "maskformer_fast._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
