"""nvcc compile check of the CUDA device code for sm_80 (A100) and sm_90 (H100): every kernel of csrc/cuda/*.cuh,
instantiated for the launchers' dtypes (tests/cuda_shim/compile_check.cu), compiled with -Xptxas -v; prints the
registers per thread and fails on spills to local memory in the hot kernels (the ones a training step runs: the
cross-entropy row kernels without the general options, the BatchNorm reductions and elementwise passes, the RNN
pointwise kernels, in float32/bfloat16/float16). Spills elsewhere (float64, the general cross-entropy options) are
printed, not failed. Needs nvcc: CI installs one from PyPI (.ci/run); skipped where none can be found.
"""
import re
import shutil
import subprocess
import sysconfig

import pytest

from .cuda_shim import CUDA_DIR, ROOT, SHIM_DIR, find_nvcc

ARCHS = ("80", "90")
NVCC_FLAGS = ["-std=c++20", "-O3", "--use_fast_math", "-Xptxas", "-v"]  # the build's nvcc flags + -Xptxas -v

# Mangled-name patterns of the hot kernels (no c++filt needed): T is f (float), 13__nv_bfloat16 or 6__half.
_LOW = r"(?:f|13__nv_bfloat16|6__half)"
HOT = [
    re.compile(rf"ce_rows_kernelI{_LOW}Li\d+ELb[01]ELb0E"),  # kGeneral = false
    re.compile(rf"bn_reduce_kernelINS0_\d+(?:StatsOp|BackwardSumsOp)I{_LOW}E"),
    re.compile(rf"bn_normalize_kernelI{_LOW}E"),
    re.compile(rf"bn_backward_dx_kernelI{_LOW}E"),
    re.compile(rf"rnn_(?:activate|step_backward)_kernelI{_LOW}E"),
]

nvcc = find_nvcc()
pytestmark = pytest.mark.skipif(nvcc is None, reason="no nvcc found ($NVCC, $CUDA_HOME/bin, PATH, or a pip-installed "
                                                      "nvidia-cuda-nvcc); CI installs one in .ci/run")


def _demangle(names):
    cxxfilt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not cxxfilt:
        return dict(zip(names, names))
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else dict(zip(names, names))


def parse_ptxas(log: str):
    """[(arch, mangled name, registers, spill store bytes, spill load bytes)] from `ptxas -v` output."""
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "spill_st": 0, "spill_ld": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill_st"], current["spill_ld"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows.append((current["arch"], current["name"], int(m.group(1)), current["spill_st"], current["spill_ld"]))
            current = None
    return rows


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("nvcc") / "check.o"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [nvcc, "-c", *NVCC_FLAGS, *gencode, f"-I{ROOT / 'csrc'}", str(SHIM_DIR / "compile_check.cu"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}"
    return parse_ptxas(res.stdout + res.stderr)


def test_every_header_compiles_on_its_own(tmp_path):
    """Each *.cuh is self-contained (includes what it uses), as .ci/run also checks."""
    for header in sorted(CUDA_DIR.glob("*.cuh")):
        src = tmp_path / "one.cu"
        src.write_text(f'#include "{header}"\n')
        res = subprocess.run([nvcc, "-c", "-std=c++17", "-arch=sm_90", f"-I{ROOT / 'csrc'}", str(src), "-o",
                              str(tmp_path / "one.o")], capture_output=True, text=True)
        assert res.returncode == 0, f"{header.name}:\n{res.stderr[-4000:]}"


def test_kernels_compile_for_sm80_sm90_without_spills_in_hot_kernels(ptxas_report):
    names = _demangle(sorted({r[1] for r in ptxas_report}))
    archs = {r[0] for r in ptxas_report}
    assert archs == set(ARCHS), f"ptxas reported {archs}, expected {ARCHS}"
    hot_spills, print_rows = [], []
    for arch, name, regs, st, ld in sorted(ptxas_report, key=lambda r: (r[1], r[0])):
        hot = any(p.search(name) for p in HOT)
        print_rows.append(f"sm_{arch}  {regs:4d} regs  spill {st:4d}/{ld:4d} B  {'HOT ' if hot else '    '}"
                          f"{names[name]}")
        if hot and (st or ld):
            hot_spills.append(f"sm_{arch} {names[name]}: {st} B spill stores, {ld} B spill loads")
    print("\nregisters per thread (ptxas -v):\n" + "\n".join(print_rows))
    assert sum(any(p.search(r[1]) for p in HOT) for r in ptxas_report) >= 2 * 20, "hot-kernel patterns matched too few"
    assert not hot_spills, "hot kernels spill to local memory:\n" + "\n".join(hot_spills)


def test_launchers_compile_against_torch_headers(tmp_path):
    """The .cu launchers (ATen, c10/cuda, TORCH_LIBRARY_IMPL(mmops, CUDA)) compile for sm_90 against the installed
    torch's headers -- a CPU build of torch here: compiled, not linked (a CPU torch has no libc10_cuda to link).
    C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips c10/cuda/impl/cuda_cmake_macros.h, a generated header that CPU wheels
    do not ship (it only sets C10_CUDA_BUILD_SHARED_LIBS)."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    import torch

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    procs = {}
    for src in sorted(CUDA_DIR.glob("*.cu")):
        cmd = [nvcc, "-c", "-std=c++20", "-O3", "--use_fast_math", "-arch=sm_90", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-DMMOPS_WITH_CUDA", abi, f"-I{ROOT / 'csrc'}", *includes, str(src),
               "-o", str(tmp_path / (src.stem + ".o"))]
        procs[src.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert set(procs) == {"cross_entropy.cu", "batch_norm.cu", "rnn.cu"}
    failures = []
    for name, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{name}:\n{out[-4000:]}")
    assert not failures, "\n".join(failures)
