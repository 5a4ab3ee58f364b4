"""The command line runs end to end (tiny sizes)."""
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mmops", *args], capture_output=True, text=True, timeout=600)


def test_check_passes():
    r = _run("check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NOT approx" not in r.stdout and "approx" in r.stdout


def test_bench_quick_prints_a_table():
    r = _run("bench", "--quick", "--rounds", "1")
    assert r.returncode == 0, r.stderr
    for name in ("F.cross_entropy", "mmops.cross_entropy", "F.batch_norm", "mmops.batch_norm"):
        assert name in r.stdout


def test_unknown_command_is_an_error():
    r = _run("frobnicate")
    assert r.returncode == 2 and "usage" in r.stdout
