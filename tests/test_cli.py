"""The command line as a user meets it: help, one-line errors with exit code 2 before any work, plots,
distributed runs that end, torchrun. Subprocess runs are kept tiny (a few steps)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from mmops.__main__ import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "GROUP_RANK")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmops", *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


def test_check_passes_and_covers_every_op_family():
    r = _run("check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NOT approx" not in r.stdout and "approx" in r.stdout
    for row in ("loss vs chain", "dhprebn vs manual chain", "rnn dweight_hh vs BPTT", "cell dhx vs manual"):
        assert row in r.stdout, row
    assert "(relu)" in r.stdout and "(tanh)" in r.stdout


def test_bench_quick_prints_a_table():
    r = _run("bench", "--quick", "--rounds", "1", "--op", "ce")
    assert r.returncode == 0, r.stderr
    for name in ("F.cross_entropy", "mmops.cross_entropy"):
        assert name in r.stdout


def test_bench_text_times_the_three_training_loops():
    r = _run("bench", "--quick", "--rounds", "1", "--op", "text", "--threads", "1")
    assert r.returncode == 0, r.stderr
    for name in ("d2l from scratch", "nn.RNN + nn.Linear + F.cross_entropy", "mmops TextRNN"):
        assert name in r.stdout and "tokens/s" in r.stdout


def test_unknown_command_is_one_line_and_exit_code_2():
    r = _run("frobnicate")
    assert r.returncode == 2 and r.stdout == ""
    assert "error: unknown command 'frobnicate'" in r.stderr.splitlines()[-1]
    assert "Traceback" not in r.stderr


def test_top_level_help_describes_every_command():
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("check", "bench", "train", "generate"):
        assert f"\n  {cmd} " in r.stdout
    assert "`mmops COMMAND`" in r.stdout


def test_train_help_gives_every_flag_a_default_or_meaning():
    from mmops.train import build_parser

    p = build_parser()
    for action in p._actions:
        if action.dest in ("help",):
            continue
        assert action.help, action.dest
        if action.default is not None and not isinstance(action.default, bool):
            assert "default" in action.help, action.dest
    text = p.format_help()
    for flag in ("--threads", "--decay-at", "--block-size", "--clip", "--log-every", "--samples", "--quiet"):
        assert flag in text


def test_readme_documents_every_flag_and_the_console_script():
    from mmops.generate import build_parser as generate_parser
    from mmops.train import build_parser

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for parser in (build_parser(), generate_parser()):
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in readme or f", {flag}" in readme, flag
    assert "`mmops {check,bench,train,generate}`" in readme


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    path = str(d / "ck.pt")
    assert cli_main(["train", "--steps", "20", "--quiet", "--samples", "0", "--save", path]) == 0
    return path


def _bad_invocations(tmp, checkpoint):
    not_ck = tmp / "notes.pt"
    not_ck.write_text("these are not the weights you are looking for\n")
    tiny = tmp / "tiny.txt"
    tiny.write_text("ab\ncd\nef\ngh\n")
    binary = tmp / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02\xff")
    a_file = tmp / "plain"
    a_file.write_text("x")
    return {
        "load missing": (["--load", str(tmp / "missing.pt")], "does not exist"),
        "load not a checkpoint": (["--load", str(not_ck)], "is not a checkpoint"),
        "save under a file": (["--save", str(a_file / "x.pt")], "--save"),
        "json is a directory": (["--json", str(tmp)], "is a directory"),
        "plots under a file": (["--plots", str(a_file / "plots")], "--plots"),
        "threads negative": (["--threads", "-3"], "--threads must be >= 1"),
        "block size zero": (["--block-size", "0"], "--block-size must be >= 1"),
        "batch size zero": (["--batch-size", "0"], "--batch-size must be >= 1"),
        "steps negative": (["--steps", "-1"], "--steps must be >= 0"),
        "nproc zero": (["--nproc", "0"], "--nproc must be >= 1"),
        "nproc not dividing the batch": (["--nproc", "3"], "divisible"),
        "lr zero": (["--lr", "0"], "--lr must be a positive number"),
        "tiny corpus": (["--data", str(tiny)], "needs at least 6 words"),
        "binary corpus": (["--data", str(binary)], "is not text"),
        "missing corpus": (["--data", str(tmp / "nope.txt")], "does not exist"),
        "resume to an earlier step": (["--load", checkpoint, "--steps", "20"], "already at step 20"),
        "resume with another model": (["--load", checkpoint, "--model", "deep", "--steps", "40"],
                                      "disagrees with the checkpoint"),
        "resume with another batch": (["--load", checkpoint, "--batch-size", "16", "--steps", "40"],
                                      "disagrees with the checkpoint"),
        "resume on other data": (["--load", checkpoint, "--steps", "40", "--data", str(binary.with_name("w.txt"))],
                                 "disagrees with the checkpoint"),
        "unknown model": (["--model", "gpt"], "invalid choice"),
    }


def test_bad_train_invocations_are_one_line_and_exit_code_2(tmp_path, checkpoint, capsys):
    """Every mistake: usage, then one `error:` line on stderr, exit code 2, before any training (the runs
    below would print a summary line on stdout if they trained)."""
    (tmp_path / "w.txt").write_text("\n".join(["anna", "bob", "carl", "dora", "emil", "fred", "gus"]))
    for name, (argv, match) in _bad_invocations(tmp_path, checkpoint).items():
        with pytest.raises(SystemExit) as e:
            cli_main(["train", "--quiet", *argv])
        out, err = capsys.readouterr()
        assert e.value.code == 2, name
        assert out == "", (name, out)
        lines = err.strip().splitlines()
        assert lines[0].startswith("usage:") and lines[-1].startswith("python -m mmops train: error: "), (name, err)
        assert match in lines[-1], (name, lines[-1])
        assert "Traceback" not in err


def test_bad_invocation_in_a_subprocess_has_no_traceback(tmp_path):
    t0 = time.perf_counter()
    r = _run("train", "--json", str(tmp_path), "--steps", "100000")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("python -m mmops train: error: --json")
    assert time.perf_counter() - t0 < 60  # refused before the 100000 steps


def test_matplotlib_is_a_regular_dependency():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        deps = next(line for line in f if line.startswith("dependencies"))
    assert '"matplotlib' in deps, deps  # not an extra: `train --plots` works on the README's install


PNGS = ["activations.png", "gradients.png", "loss.png", "update_ratio.png", "weight_grads.png"]


def test_ddp_with_plots_finishes_and_writes_every_png(tmp_path):
    """--nproc 2 --plots: rank 0 draws the plots on a local copy of the model after every rank has left the
    group (this once hung until gloo's timeout); no leaked-semaphore warning at the end."""
    out = tmp_path / "plots"
    t0 = time.perf_counter()
    r = _run("train", "--nproc", "2", "--steps", "60", "--samples", "0", "--quiet", "--plots", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - t0 < 120
    assert sorted(os.listdir(out)) == PNGS
    assert r.stdout.count("train loss") == 1
    assert "leaked semaphore" not in r.stderr and "Traceback" not in r.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


RUN = ["--steps", "60", "--decay-at", "40", "--samples", "0", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def nproc2_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("nproc2")
    r = _run("train", *RUN, "--nproc", "2", "--save", str(d / "ck.pt"), "--json", str(d / "r.json"), timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads((d / "r.json").read_text()), torch.load(d / "ck.pt", weights_only=False)


def _assert_same_run(d, reference):
    ref_json, ref_ck = reference
    rec = json.loads((d / "r.json").read_text())
    ck = torch.load(d / "ck.pt", weights_only=False)
    assert rec["train_loss"] == pytest.approx(ref_json["train_loss"], rel=1e-5)
    assert rec["val_loss"] == pytest.approx(ref_json["val_loss"], rel=1e-5)
    torch.testing.assert_close(torch.tensor(ck["lossi"]), torch.tensor(ref_ck["lossi"]), rtol=1e-5, atol=1e-6)
    for k, v in ref_ck["state_dict"].items():
        torch.testing.assert_close(ck["state_dict"][k].float(), v.float(), rtol=1e-5, atol=1e-6, msg=k)


def test_torchrun_standalone_two_processes_equal_nproc_2(tmp_path, nproc2_reference):
    p = _torchrun("--standalone", "--nproc_per_node", "2", "-m", "mmops", "train", *RUN,
                  "--save", str(tmp_path / "ck.pt"), "--json", str(tmp_path / "r.json"))
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    assert out.count("train loss") == 1  # one summary, from rank 0
    _assert_same_run(tmp_path, nproc2_reference)


def test_torchrun_two_nodes_on_localhost_equal_nproc_2(tmp_path, nproc2_reference):
    port = _free_port()
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{port}", "--rdzv-id", "mmops-test", "--max-restarts", "0"]
    tail = ["-m", "mmops", "train", *RUN, "--save", str(tmp_path / "ck.pt"), "--json", str(tmp_path / "r.json")]
    nodes = [_torchrun(*common, "--node_rank", str(k), *tail) for k in (0, 1)]
    results = []
    try:
        for p in nodes:
            results.append(p.communicate(timeout=180))
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(nodes, results):
        assert p.returncode == 0, err[-3000:]
    assert sum(out.count("train loss") for out, _ in results) == 1
    _assert_same_run(tmp_path, nproc2_reference)


def test_nproc_is_refused_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--nproc", "2"])
    assert e.value.code == 2
    assert "cannot be combined with torchrun" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
@pytest.mark.parametrize("cmd", ["check", "bench"])
def test_device_cuda_without_a_gpu_is_one_line_and_exit_code_2(cmd):
    r = _run(cmd, "--device", "cuda")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
