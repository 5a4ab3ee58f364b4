"""`python -m mmops train`: a short run learns, checkpoints resume exactly, --plots and --json write files."""
import json
import os

import pytest
import torch

from mmops import train as T


def _run(*argv):
    return T.train(T.parse_args(["--quiet", "--samples", "2", *argv]))


@pytest.mark.parametrize("model, steps, extra", [("mlp", 600, []), ("deep", 300, []),
                                                 ("rnn", 150, ["--batch-size", "16"])])
def test_short_run_loss_falls(model, steps, extra, tmp_path):
    out = tmp_path / "r.json"
    res = _run("--model", model, "--steps", str(steps), "--json", str(out), *extra)
    first = {"mlp": 3.2958, "deep": 3.2958, "rnn": 3.2958}[model]  # log(27): the untrained loss
    assert res["val_loss"] < first - 0.5, res
    assert len(res["samples"]) == 2
    rec = json.loads(out.read_text())
    assert set(rec) == {"model", "steps", "seconds", "steps_per_s", "train_loss", "val_loss"}
    assert rec["model"] == model and rec["steps"] == steps and rec["steps_per_s"] > 0


@pytest.mark.parametrize("model", ["mlp", "rnn"])
def test_resume_keeps_the_checkpoint_schedule_and_equals_one_run(model, tmp_path):
    """The straight run of 40 steps decays the lr at its default, step 20; the first part states that schedule
    once, and the resumed run takes model, data, batch, seed and schedule from the checkpoint alone."""
    a, b, c = (str(tmp_path / f"{k}.pt") for k in "abc")
    _run("--model", model, "--batch-size", "8", "--samples", "0", "--steps", "40", "--save", a)
    _run("--model", model, "--batch-size", "8", "--samples", "0", "--steps", "20", "--decay-at", "20", "--save", b)
    res = _run("--steps", "40", "--load", b, "--save", c, "--samples", "0")
    sa, sc = torch.load(a, weights_only=False), torch.load(c, weights_only=False)
    assert sc["run"] == sa["run"] and sa["run"]["decay_at"] == 20 and sa["run"]["model"] == model
    assert sa["lossi"] == sc["lossi"]
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sc["state_dict"][k]), k
    assert res["model"] == model and res["steps"] == 40


@pytest.mark.parametrize("model", ["mlp", "rnn"])
def test_checkpoint_resume_equals_one_run(model, tmp_path):
    common = ["--model", model, "--decay-at", "30", "--samples", "0", "--batch-size", "8"]
    a, b, c = (str(tmp_path / f"{k}.pt") for k in "abc")
    _run(*common, "--steps", "40", "--save", a)
    _run(*common, "--steps", "20", "--save", b)
    _run(*common, "--steps", "40", "--load", b, "--save", c)
    sa, sc = torch.load(a, weights_only=False), torch.load(c, weights_only=False)
    assert sc["step"] == 40 and len(sc["lossi"]) == 40
    assert sa["lossi"] == sc["lossi"]
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sc["state_dict"][k]), k


def test_load_checks_model_and_vocabulary(tmp_path, capsys):
    corpus = tmp_path / "w.txt"
    corpus.write_text("xyz\nzyx\nyy\nxx\nxyzzy\nzz\n")
    ck = str(tmp_path / "m.pt")
    _run("--steps", "5", "--save", ck, "--data", str(corpus))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _run("--model", "deep", "--steps", "10", "--load", ck)
    assert "--model 'deep' disagrees with the checkpoint" in capsys.readouterr().err
    corpus.write_text("abc\ncab\nbb\naa\nabcba\ncc\n")  # the file changed since the checkpoint
    with pytest.raises(SystemExit):
        _run("--steps", "10", "--load", ck)
    assert "another vocabulary" in capsys.readouterr().err


def test_schedule_override_on_resume_is_printed(tmp_path, capsys):
    ck = str(tmp_path / "m.pt")
    _run("--steps", "10", "--save", ck, "--samples", "0")
    _run("--steps", "12", "--load", ck, "--lr", "0.05", "--samples", "0")
    assert "--lr 0.05 overrides the checkpoint's 0.1" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["mlp", "deep", "rnn"])
def test_plots_are_written(model, tmp_path):
    d = tmp_path / "plots"
    _run("--model", model, "--steps", "50", "--plots", str(d), "--batch-size", "16")
    files = sorted(os.listdir(d))
    assert files == ["activations.png", "gradients.png", "loss.png", "update_ratio.png", "weight_grads.png"]
    labels = [label for label, _ in T.M.build_model(model, 27).activation_layers()]
    assert labels == {"mlp": ["layer 2 (Tanh)"], "deep": [f"layer {3 * k + 2} (Tanh)" for k in range(5)],
                      "rnn": ["RNN hidden state (tanh)"]}[model]
    for f in files:
        data = (d / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("content, match", [(b"", "has no words"), (b"\x00\x01\x02", "is not text"),
                                            (b"ab\ncd\nef\ngh\n", "needs at least 6 words")])
def test_bad_corpus_is_a_clear_error(tmp_path, content, match, capsys):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        _run("--steps", "5", "--data", str(p))
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_cli_entry_point_and_bad_arguments(capsys):
    from mmops.__main__ import main

    with pytest.raises(SystemExit):
        main(["train", "--model", "nope"])
    with pytest.raises(SystemExit):
        main(["train", "--batch-size", "0"])
    assert "invalid choice" in capsys.readouterr().err


def test_ddp_two_processes_follow_the_single_process_run(tmp_path):
    """--nproc 2: DDP + SyncBatchNorm over gloo, each rank half of the same global batches: the weights after
    the run equal the single-process run's (float32, so to rounding)."""
    common = ["--steps", "200", "--decay-at", "150", "--samples", "0", "--threads", "1", "--batch-size", "32"]
    a, b = str(tmp_path / "ddp.pt"), str(tmp_path / "one.pt")
    res = _run(*common, "--nproc", "2", "--save", a)
    _run(*common, "--save", b)
    sa, sb = torch.load(a, weights_only=False)["state_dict"], torch.load(b, weights_only=False)["state_dict"]
    assert list(sa) == list(sb)
    for k in sb:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=1e-4, atol=1e-5, msg=k)
    assert res["val_loss"] < 3.0


def test_output_directories_are_created_before_training(tmp_path):
    save, out = tmp_path / "new" / "deeper" / "ck.pt", tmp_path / "other" / "r.json"
    _run("--steps", "3", "--samples", "0", "--save", str(save), "--json", str(out))
    assert save.is_file() and json.loads(out.read_text())["steps"] == 3


def test_torchrun_environment_is_read_and_checked():
    from mmops._distributed import torchrun_env

    assert torchrun_env({}) is None
    env = torchrun_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (1, 4, 1)
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        torchrun_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="expected integers"):
        torchrun_env({"RANK": "x", "WORLD_SIZE": "4"})
