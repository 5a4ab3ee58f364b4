"""The d2l character RNN on running text: the minibatch schemes, the mmops model against the book's
from-scratch computation (mmops.reference), the text mode of `train`, and `generate`."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mmops import data as D
from mmops import models as M
from mmops import reference as R
from mmops import train as T
from mmops.__main__ import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite matter "
        "to us. His grey eyes shone and twinkled, and his usually pale face was flushed and animated. ") * 3


# --- data ----------------------------------------------------------------------------------------------------
def test_d2l_preprocessing_and_vocabulary():
    c = D.make_text_corpus("Hello,  World!\n42 times", "d2l")
    assert D.preprocess_text("Hello,  World!\n42 times", "d2l") == "hello world times"
    assert c.vocab.itos[:2] == ["<unk>", " "] and len(c.vocab) == 28
    assert c.vocab.decode(c.stream) == "hello world times"
    plain = D.make_text_corpus("ba\nab", "none")
    assert plain.vocab.itos == ["\n", "a", "b"] and plain.stream.tolist() == [2, 1, 0, 1, 2]


def test_default_text_is_the_standard_librarys_pydoc_topics():
    text = D.default_text()
    assert len(text) > 100_000 and "assert" in text and "\x00" not in text
    assert D.load_text(None) == text


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_minibatches_are_shifted_windows_of_the_stream(sampling):
    stream = torch.arange(1000)
    B, Tn = 4, 7
    X, Y = D.epoch_minibatches(stream, B, Tn, sampling, torch.Generator().manual_seed(0))
    K = D.batches_per_epoch(1000, B, Tn)
    assert X.shape == Y.shape == (K, Tn, B) and K == (1000 - Tn - 1) // B // Tn
    assert torch.equal(Y, X + 1)  # the target is the next token
    assert torch.equal(X[:, 1:] - X[:, :-1], torch.ones(K, Tn - 1, B, dtype=torch.long))  # windows of the stream
    starts = X[:, 0, :].flatten()
    assert len(set(starts.tolist())) == K * B  # no window twice in an epoch
    if sampling == "sequential":  # row b of minibatch k+1 continues row b of minibatch k
        assert torch.equal(X[1:, 0, :], X[:-1, -1, :] + 1)
    else:  # windows on the grid offset + j * num_steps, in shuffled order
        assert len(set((starts % Tn).tolist())) == 1
        assert not torch.equal(starts.sort().values, starts)
    X2, _ = D.epoch_minibatches(stream, B, Tn, sampling, torch.Generator().manual_seed(0))
    assert torch.equal(X, X2)
    assert X[0].is_contiguous()  # minibatch k is a view, no copy per step


def test_stream_too_short_for_one_minibatch():
    assert D.batches_per_epoch(D.min_stream_length(4, 5), 4, 5) == 1
    assert D.batches_per_epoch(D.min_stream_length(4, 5) - 1, 4, 5) == 0
    with pytest.raises(D.CorpusError, match="needs at least 26"):
        D.epoch_minibatches(torch.arange(25), 4, 5, "sequential", torch.Generator())


# --- the model against the book's from-scratch computation ---------------------------------------------------
def _book_params_into(model, p):
    with torch.no_grad():
        model.rnn.weight_ih_l0.copy_(p["W_xh"].T)
        model.rnn.weight_hh_l0.copy_(p["W_hh"].T)
        model.rnn.bias_ih_l0.copy_(p["b_h"])
        model.head.weight.copy_(p["W_hq"].T)
        model.head.bias.copy_(p["b_q"])


def _grads_as_book(model):
    return {"W_xh": model.rnn.weight_ih_l0.grad.T, "W_hh": model.rnn.weight_hh_l0.grad.T,
            "b_h": model.rnn.bias_ih_l0.grad, "W_hq": model.head.weight.grad.T, "b_q": model.head.bias.grad}


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_model_equals_the_books_from_scratch_rnn(nonlinearity, sampling):
    """float64, same parameters and minibatches: loss, every gradient and the carried state equal the book's
    one-hot step loop over four consecutive minibatches with SGD updates in between (sequential: the state
    carried and detached, as the book's stateful training; random: a zero state each minibatch)."""
    corpus = D.make_text_corpus(TEXT, "d2l")
    V, H, B, Tn = len(corpus.vocab), 24, 3, 6
    g = torch.Generator().manual_seed(5)
    book = R.d2l_rnn_params(V, H, generator=g, dtype=torch.float64)
    with torch.no_grad():  # away from the init so that relu's dead units and biases matter
        for t in book.values():
            t.add_(torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.3)
    model = M.TextRNN(V, H, nonlinearity).double()
    _book_params_into(model, book)
    X, Y = D.epoch_minibatches(corpus.stream, B, Tn, sampling, torch.Generator().manual_seed(1))
    state_book = state_model = None
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 5 and not model.rnn.bias_hh_l0.requires_grad
    for k in range(4):
        if sampling == "random":
            state_book = state_model = None
        elif k > 0:
            state_book, state_model = state_book.detach(), state_model.detach()
            assert state_model.abs().sum() > 0
        loss_book, state_book = R.d2l_rnn_loss(book, X[k], Y[k], state_book, nonlinearity)
        loss_model, state_model = model.loss(X[k], Y[k], state_model)
        loss_book.backward()
        loss_model.backward()
        torch.testing.assert_close(loss_model, loss_book, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(state_model[0], state_book, rtol=1e-12, atol=1e-13)
        for name, grad in _grads_as_book(model).items():
            torch.testing.assert_close(grad, book[name].grad, rtol=1e-10, atol=1e-13, msg=name)
        with torch.no_grad():
            for t in book.values():
                t -= 0.5 * t.grad
                t.grad = None
            for p in params:
                p -= 0.5 * p.grad
                p.grad = None


def test_init_is_the_books():
    m = M.TextRNN(28, 256, seed=0)
    for w in (m.rnn.weight_ih_l0, m.rnn.weight_hh_l0, m.head.weight):
        assert abs(w.std().item() - 0.01) < 0.0005
    for b in (m.rnn.bias_ih_l0, m.rnn.bias_hh_l0, m.head.bias):
        assert not b.any()
    assert m.rnn.nonlinearity == "relu"


def test_predict_is_greedy_and_warms_the_state_with_the_prefix():
    torch.manual_seed(0)
    m = M.TextRNN(6, 8, "tanh", seed=3)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(100)
    prefix = [1, 2, 3]
    ids = m.predict(prefix, 5)
    seq = list(prefix)
    for _ in range(5):  # the same thing the long way: the whole sequence again for every new token
        logits, _ = m(torch.tensor(seq).view(-1, 1))
        seq.append(int(logits[-1].argmax()))
    assert ids == seq[3:]
    a = m.predict(prefix, 20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = m.predict(prefix, 20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a == b and a != ids + m.predict(prefix + ids, 15)


# --- the command line ----------------------------------------------------------------------------------------
def _train(*argv):
    return T.train(T.parse_args(["--quiet", "--threads", "1", *argv]))


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text(TEXT * 4, encoding="utf-8")
    return str(p)


def test_text_run_learns_and_writes_perplexity(text_file, tmp_path):
    out = tmp_path / "r.json"
    res = _train("--text", text_file, "--preprocess", "d2l", "--batch-size", "8", "--num-steps", "10",
                 "--hidden-size", "64", "--epochs", "12", "--json", str(out), "--samples", "1",
                 "--plots", str(tmp_path / "plots"))
    assert sorted(os.listdir(tmp_path / "plots")) == ["loss.png", "perplexity.png"]
    rec = json.loads(out.read_text())
    assert rec["mode"] == "text" and rec["train_perplexity"] == pytest.approx(res["train_perplexity"])
    assert len(rec["epoch_perplexities"]) == 12 and rec["tokens_per_s"] > 0
    assert rec["epoch_perplexities"][-1] < 0.6 * rec["epoch_perplexities"][0]
    assert math.exp(rec["train_loss"]) == pytest.approx(rec["train_perplexity"])
    assert res["continuation"].startswith("the ")


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_text_resume_mid_epoch_equals_one_run(text_file, tmp_path, sampling):
    common = ["--text", text_file, "--batch-size", "4", "--num-steps", "8", "--hidden-size", "32", "--samples", "0",
              "--sampling", sampling]
    a, b, c = (str(tmp_path / f"{k}.pt") for k in "abc")
    one = _train(*common, "--steps", "30", "--save", a)
    _train(*common, "--steps", "13", "--save", b)
    two = _train("--text", text_file, "--steps", "30", "--load", b, "--save", c, "--samples", "0")
    sa, sc = torch.load(a, weights_only=False), torch.load(c, weights_only=False)
    assert sa["lossi"] == sc["lossi"] and sa["run"] == sc["run"]
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sc["state_dict"][k]), k
    assert one["train_perplexity"] == two["train_perplexity"]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mmops", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_train_text_then_generate_from_the_command_line(text_file, tmp_path):
    ck = str(tmp_path / "ck.pt")
    r = _cli("train", "--text", text_file, "--preprocess", "d2l", "--batch-size", "8", "--num-steps", "10",
             "--hidden-size", "32", "--steps", "40", "--quiet", "--save", ck)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("perplexity ") and "tokens/s" in r.stdout and "generate: 'the " in r.stdout
    r = _cli("generate", "--load", ck, "--prefix", "time traveller ", "-n", "30")
    assert r.returncode == 0, r.stderr
    last = r.stdout.splitlines()[-1]
    assert last.startswith("time traveller ") and len(last) == len("time traveller ") + 30
    again = _cli("generate", "--load", ck, "--prefix", "time traveller ", "-n", "30")
    assert again.stdout == r.stdout  # greedy: deterministic
    r = _cli("generate", "--load", ck, "--prefix", "Time", "-n", "5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "['T'] are not in the checkpoint's vocabulary" in r.stderr.splitlines()[-1]


def test_bad_text_invocations_are_one_line_and_exit_code_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_text("hello world, this is short")
    binary = tmp_path / "bin.dat"
    binary.write_bytes(bytes(range(256)))
    ok = tmp_path / "ok.txt"
    ok.write_text(TEXT * 4)
    cases = {
        "empty": (["--text", str(empty)], "is empty"),
        "short": (["--text", str(short), "--num-steps", "35"], "has 26 characters"),
        "binary": (["--text", str(binary)], "is not text"),
        "num steps zero": (["--text", str(ok), "--num-steps", "0"], "--num-steps must be >= 1"),
        "epochs and steps": (["--text", str(ok), "--epochs", "2", "--steps", "10"], "pass one"),
        "text flag without text": (["--num-steps", "10"], "applies to text mode only"),
        "text with the mlp": (["--text", str(ok), "--model", "mlp"], "--text trains the rnn model"),
        "text and data": (["--text", str(ok), "--data", str(ok)], "--data is the word list"),
    }
    for name, (argv, match) in cases.items():
        with pytest.raises(SystemExit) as e:
            cli_main(["train", "--quiet", *argv])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and out == "", name
        last = err.strip().splitlines()[-1]
        assert last.startswith("python -m mmops train: error: ") and match in last, (name, last)


def test_generate_refuses_a_word_model_and_bad_numbers(tmp_path, capsys):
    ck = str(tmp_path / "mlp.pt")
    cli_main(["train", "--steps", "3", "--quiet", "--samples", "0", "--save", ck])
    capsys.readouterr()
    for argv, match in ((["--load", ck, "--prefix", "a"], "trained on a word list"),
                        (["--load", ck, "--prefix", "a", "-n", "-1"], "must be >= 0"),
                        (["--load", ck, "--prefix", "a", "--temperature", "-1"], "--temperature"),
                        (["--load", str(tmp_path / "none.pt"), "--prefix", "a"], "does not exist")):
        with pytest.raises(SystemExit) as e:
            cli_main(["generate", *argv])
        assert e.value.code == 2
        assert match in capsys.readouterr().err.strip().splitlines()[-1]
