"""Builds mmops._C.

CPU sources always; CUDA sources (csrc/cuda/*.cu) only where torch was built with CUDA and CUDA_HOME is set
(MMOPS_NO_CUDA=1 skips them): a CPU-only install compiles exactly the CPU sources, as before.
Flags, and why:
  -O3 -fopenmp           at::parallel_for is a header template: without -fopenmp it runs on one thread.
                         The extension links libgomp.so.1 by soname, so the loader reuses torch's copy
                         and torch.set_num_threads governs our kernels too.
  -fno-math-errno        lets GCC vectorise the hand-written exp and the row reductions;
  -fno-trapping-math     lets it if-convert the NaN-preserving selects inside them (no FP traps are used).
  MMOPS_SANITIZE=1       builds with AddressSanitizer + UBSan instead of -O3 (.ci/sanitize runs the hostile-input
                         tests on that build).
  no -march=native       the hot loops carry target_clones (x86-64-v4 / v3 / default) and are
                         dispatched at load time by the CPU they run on (csrc/cpu/simd.h).
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

here = os.path.dirname(os.path.abspath(__file__))
cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
link_flags = ["-fopenmp"]
if os.environ.get("MMOPS_SANITIZE") == "1":  # .ci/sanitize: AddressSanitizer + UBSan build of the hostile-input suite
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    # MMOPS_SANITIZE also turns the output cache off (csrc/cpu/output_cache.cpp), so ASan sees every free
    cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1", "-g", "-DMMOPS_SANITIZE"] + sanitize
    link_flags += sanitize

import torch  # noqa: E402  (torch is a build requirement: install it first, then --no-build-isolation)

use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and os.environ.get(
    "MMOPS_NO_CUDA", "0"
) != "1"

if use_cuda and cuda_sources:
    # Architectures: torch's default (the visible GPUs', or TORCH_CUDA_ARCH_LIST). The kernels are compile-checked
    # for sm_80 and sm_90 (tests/test_cuda_compile.py).
    ext = cpp_extension.CUDAExtension(
        "mmops._C",
        cpu_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
        extra_link_args=link_flags,
        include_dirs=[os.path.join(here, "csrc")],
    )
else:
    ext = cpp_extension.CppExtension(
        "mmops._C",
        cpu_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        include_dirs=[os.path.join(here, "csrc")],
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)},
)
