"""The CPU kernels' plain-C++ checks in bench/loops, built with setup.py's flags and run here: each program compares
a kernel with the code it replaced and prints the difference, which these tests bound.

* exp_avx512.cpp: simd::exp's AVX-512 overload is bitwise the portable template on every float in [-128, 128]
  (the cross-entropy rows' bits depend on it). Skipped on a CPU without AVX-512.
* ce_short_rows.cpp: the cross-entropy forward's AVX-512 short-row kernel (4 rows interleaved) writes bitwise what
  the row-at-a-time kernel it replaced wrote, for every C <= 32, with ignored rows and in place.
* ce_short_rows_avx2.cpp: the AVX2 short-row kernel (C <= 32 on a CPU without AVX-512) agrees with float64 math to
  3e-6 for every C <= 32, with ignored rows and NaN / +-inf logits; writes the same bits in place, without a gradient,
  and split into two ranges at every row; writes nothing past its buffers or outside its range. Runs on any CPU with
  AVX2 (AVX-512 CPUs included, though they take the AVX-512 kernel).
* bn_block_sums.cpp: BatchNorm's block sums (the kernels' own source) agree with double sums to ~1e-8 of the sum of
  the terms' magnitudes, in cache and from memory.
"""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-I", os.path.join(ROOT, "csrc")]  # setup.py's

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) on PATH")


def _build_and_run(tmp_path, source, *args, timeout=300):
    exe = str(tmp_path / os.path.splitext(source)[0])
    subprocess.run([CXX, *FLAGS, os.path.join(ROOT, "bench", "loops", source), "-o", exe], check=True,
                   capture_output=True, timeout=timeout)
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


def _bitwise_check(tmp_path, source, what):
    """Builds and runs an AVX-512 program that prints "<checked> <what> checked, <differ> differ"; returns both."""
    run = _build_and_run(tmp_path, source)
    if "no AVX-512" in run.stdout:
        pytest.skip("this CPU has no AVX-512: the code it checks is never called here")
    assert run.returncode == 0, run.stdout + run.stderr
    checked, differ = map(int, re.search(rf"(\d+) {what} checked, (\d+) differ", run.stdout).groups())
    return checked, differ, run.stdout


def test_exp_avx512_is_bitwise_the_template(tmp_path):
    checked, differ, out = _bitwise_check(tmp_path, "exp_avx512.cpp", "values")
    assert checked > 2_000_000_000 and differ == 0, out


def test_ce_short_rows_are_bitwise_the_row_at_a_time_kernel(tmp_path):
    checked, differ, out = _bitwise_check(tmp_path, "ce_short_rows.cpp", "cases")
    assert checked == 32 * 7 * 8 and differ == 0, out


def test_ce_short_rows_avx2_match_float64_math(tmp_path):
    run = _build_and_run(tmp_path, "ce_short_rows_avx2.cpp")
    if "no AVX2" in run.stdout:
        pytest.skip("this CPU has no AVX2: the code it checks is never called here")
    assert run.returncode == 0, run.stdout + run.stderr
    checked, differ = map(int, re.search(r"(\d+) cases checked, (\d+) differ", run.stdout).groups())
    assert checked == 3 * 32 * 7 * 8 and differ == 0, run.stdout  # steps of 1, 2 and 4 rows


@pytest.mark.parametrize("rows, where", [(512, "cached"), (1000, "memory")])
def test_block_sums_agree_with_double_sums(tmp_path, rows, where):
    run = _build_and_run(tmp_path, "bn_block_sums.cpp", str(rows), where)
    assert run.returncode == 0, run.stdout + run.stderr
    diffs = [float(d) for d in re.findall(r"difference to double rows ([0-9.e+-]+)", run.stdout)]
    assert len(diffs) == 6, run.stdout
    assert max(diffs) < 1e-6, run.stdout  # float32 block sums: ~1e-8 of the terms' magnitudes
