"""Test-only helpers for the CUDA device code: the CPU shim's build (shim.h + entry.cpp, compiled with the system
C++ compiler into a temporary shared library and called through ctypes) and the search for nvcc. Not part of mmops.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SHIM_DIR = Path(__file__).resolve().parent
CUDA_DIR = ROOT / "csrc" / "cuda"

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _sources() -> list[Path]:
    return sorted([SHIM_DIR / "shim.h", SHIM_DIR / "entry.cpp", *CUDA_DIR.glob("*.cuh")])


def build_shim_library() -> ctypes.CDLL:
    """Compiles entry.cpp with the kernel headers (cached by a hash of the sources) and loads it."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH: the CUDA shim tests need one")
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode() + path.read_bytes())
    out_dir = Path(tempfile.gettempdir()) / f"mmops-cuda-shim-{os.getuid()}"
    out_dir.mkdir(exist_ok=True)
    lib = out_dir / f"libshim-{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", f"-I{ROOT / 'csrc'}", f"-I{SHIM_DIR}",
               str(SHIM_DIR / "entry.cpp"), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building the CUDA shim failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    i64, i32, vp, f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_double
    dll.shim_ce_forward.restype = i64
    dll.shim_ce_forward.argtypes = [i32, vp, i64, i64, vp, vp, vp, i64, f64, i32, vp, vp, i32, i32, i64]
    dll.shim_ce_plan_kind.restype = i32
    dll.shim_ce_plan_kind.argtypes = [i32, i64, i64, i32]
    dll.shim_ce_scale_grad.restype = None
    dll.shim_ce_scale_grad.argtypes = [i32, vp, vp, i64, i64, vp, i64]
    for name, argtypes in _EXTRA_SIGNATURES.items():
        fn = getattr(dll, name, None)
        if fn is not None:
            fn.restype = argtypes[0]
            fn.argtypes = argtypes[1]
    return dll


_i64, _i32, _vp, _f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_double
_EXTRA_SIGNATURES = {
    # (dtype, x, h, N, C, L, weight, bias, running_mean, running_var, mean, invstd, training, momentum, eps, bessel,
    #  act, max_threads, splits)
    "shim_bn_forward": (None, [_i32, _vp, _vp, _i64, _i64, _i64, _vp, _vp, _vp, _vp, _vp, _vp, _i32, _f64, _f64,
                               _i32, _i32, _i32, _i32]),
    # (dtype, dh, h, x, dx, dgamma, dbeta, N, C, L, weight, mean, invstd, training, bessel, act, max_threads, splits)
    "shim_bn_backward": (None, [_i32, _vp, _vp, _vp, _vp, _vp, _vp, _i64, _i64, _i64, _vp, _vp, _vp, _i32, _i32,
                                _i32, _i32, _i32]),
    # (dtype, x, N, C, L, mean_out(double), m2_out(double), max_threads, splits)
    "shim_bn_stats": (None, [_i32, _vp, _i64, _i64, _i64, _vp, _vp, _i32, _i32]),
    # (dtype, dh, h, x, mean, N, C, L, act, sum_dy(double), sum_dy_xmu(double), max_threads, splits)
    "shim_bn_backward_reduce": (None, [_i32, _vp, _vp, _vp, _vp, _i64, _i64, _i64, _i32, _vp, _vp, _i32, _i32]),
    # (dtype, dh, h, x, dx, N, C, L, weight, mean, invstd, sum_dy, sum_dy_xmu, count, bessel, act, max_threads)
    "shim_bn_backward_elemt": (None, [_i32, _vp, _vp, _vp, _vp, _i64, _i64, _i64, _vp, _vp, _vp, _vp, _vp, _i64,
                                      _i32, _i32, _i32]),
    # (dtype, x, tok, table, hx, w_ih, w_hh, bias, out, T, B, I, H, act, max_threads)
    "shim_rnn_forward": (None, [_i32, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _i64, _i64, _i64, _i64, _i32, _i32]),
    # (dtype, dout, h, x, tok, hx, w_ih, w_hh, dpre, d_input, d_hx, d_w_ih, d_w_hh, d_b, T, B, I, H, act,
    #  max_threads)
    "shim_rnn_backward": (None, [_i32, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _i64, _i64,
                                 _i64, _i64, _i32, _i32]),
}


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def find_nvcc() -> str | None:
    """nvcc from $NVCC, $CUDA_HOME/bin, PATH, or a pip-installed nvidia-cuda-nvcc (site-packages/nvidia/...)."""
    candidates = [os.environ.get("NVCC")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "**", "bin", "nvcc"), recursive=True))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None
