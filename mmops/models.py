"""The makemore models on mmops ops, and their plain-PyTorch twins (same parameter names and weights).

- MLP:      the BatchNorm notebook's MLP: embedding, Linear (no bias), BatchNorm1d with fused tanh, Linear,
            mmops cross-entropy. `train_step` is its training step with the backward written out by hand on the
            fused kernels (the backprop exercise as the training loop: no autograd graph, one SGD foreach).
- DeepMLP:  the activations-and-gradients notebook's stack: n_layers x (Linear, BatchNorm1d, Tanh), then
            Linear + BatchNorm1d, with the gain options.
- CharRNN:  a character RNN on mmops.nn.RNN fed token ids, a learned start state, mmops cross-entropy.
- TextRNN:  the Dive into Deep Learning character RNN on running text (relu or tanh, randn * 0.01 init, zero
            start state, stateful minibatches), on mmops.nn.RNN fed token ids and mmops cross-entropy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._cross_entropy import cross_entropy
from . import nn as mnn
from . import _C
from ._ops import eager_or_op, ops
from .data import Vocab

# the op through its eager entry point (mmops/_ops.py: eager_or_op)
_mlp_train_step = eager_or_op(_C.mlp_train_step, ops.mlp_train_step.default)


@torch.library.register_fake("mmops::mlp_train_step")
def _mlp_train_step_fake(X, Y, emb, fc1_weight, bn_weight, bn_bias, fc2_weight, fc2_bias, running_mean, running_var,
                         momentum, eps, bessel, lr):
    params = (emb, fc1_weight, bn_weight, bn_bias, fc2_weight, fc2_bias)
    return fc2_weight.new_empty(()), *(torch.empty_like(p, memory_format=torch.contiguous_format) for p in params)

__all__ = ["MLP", "DeepMLP", "CharRNN", "TextRNN", "TorchMLP", "build_model", "sample"]


def _init_linear(lin: nn.Linear, gain: float, g: torch.Generator | None) -> None:
    """The notebooks' init: randn / sqrt(fan_in), times the gain (5/3 ahead of a tanh)."""
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * gain / math.sqrt(lin.in_features))
        if lin.bias is not None:
            lin.bias.zero_()


class MLP(nn.Module):
    def __init__(self, vocab_size: int = 27, block_size: int = 3, n_embd: int = 10, n_hidden: int = 200, *,
                 bessel: bool = False, seed: int | None = 2147483647):
        super().__init__()
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        self.config = dict(vocab_size=vocab_size, block_size=block_size, n_embd=n_embd, n_hidden=n_hidden, bessel=bessel)
        self.block_size = block_size
        self.emb = nn.Embedding(vocab_size, n_embd)
        self.fc1 = nn.Linear(n_embd * block_size, n_hidden, bias=False)  # BatchNorm's beta is the bias
        self.bn = mnn.BatchNorm1d(n_hidden, bessel=bessel, activation="tanh")
        self.fc2 = nn.Linear(n_hidden, vocab_size)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(self.emb.weight.shape, generator=g))
        _init_linear(self.fc1, 5 / 3, g)
        _init_linear(self.fc2, 0.1, g)  # a less confident start: the first loss is ~log(vocab_size)

    def logits(self, X: Tensor) -> Tensor:
        x = self.emb(X).view(X.shape[0], -1)
        return self.fc2(self.bn(self.fc1(x)))

    def forward(self, X: Tensor, Y: Tensor | None = None):
        logits = self.logits(X)
        return logits if Y is None else cross_entropy(logits, Y)

    def tanh_layers(self) -> list[nn.Module]:
        return [self.bn]

    def activation_layers(self) -> list[tuple[str, nn.Module]]:
        """(label, module) of each module whose output is a tanh, labelled as the notebooks' layer list
        (Linear, BatchNorm1d, Tanh) would number it: the fused BatchNorm + tanh is layers 1 and 2."""
        return [("layer 2 (Tanh)", self.bn)]

    # train_step's one-thread bound: n * H * (block_size * n_embd + vocab); 0.36M at the default batch 32, 1.5M at 128
    ONE_THREAD_MACS = 1 << 20

    @torch.no_grad()
    def train_step(self, X: Tensor, Y: Tensor, lr: float) -> tuple[Tensor, list[Tensor]]:
        """One SGD step with the backward written out on the fused kernels; returns (loss, grads in
        parameters() order). Equal to loss.backward() + SGD (tests/test_models.py checks it), without an
        autograd graph: this is the fast path of `python -m mmops train`.

        A small step runs on one thread (torch.set_num_threads(1), restored on return): its six GEMMs are tiny at
        the notebooks' batch (32 x 30 x 200, 32 x 200 x 27: about 0.2 MFLOP each), and MKL's parallel region around
        each costs more than it saves. Measured on an AMD EPYC Zen 4 with 2 threads, interleaved: batch 32, 149-164
        us a step on one thread against 168-296 us on two; batch 128 level (314 / 312 us); batch 512, 956 against
        710 us, so above MLP.ONE_THREAD_MACS multiply-adds per GEMM set the step keeps torch's threads. On that machine
        MKL gives the same bits on one thread as on two for these shapes (compared for batch 32, 128 and 512; the
        default run's losses did not move), so there the choice moves no number."""
        if not self.training:
            raise RuntimeError("MLP.train_step: the model is in eval mode; call model.train() first")
        threads = torch.get_num_threads()
        W1, W2 = self.fc1.weight, self.fc2.weight
        one_thread = threads > 1 and X.shape[0] * W1.shape[0] * (W1.shape[1] + W2.shape[0]) <= self.ONE_THREAD_MACS
        if not one_thread:
            return self._train_step(X, Y, lr)
        torch.set_num_threads(1)
        try:
            return self._train_step(X, Y, lr)
        finally:
            torch.set_num_threads(threads)

    def _train_step(self, X: Tensor, Y: Tensor, lr: float) -> tuple[Tensor, list[Tensor]]:
        # the forward, the backward written out and the SGD update: one op (csrc/mlp_train_step.cpp has the steps)
        bn = self.bn
        momentum = bn._running_factor()  # BatchNorm1d's own rule (and it counts the batch)
        loss, *grads = _mlp_train_step(X, Y, self.emb.weight, self.fc1.weight, bn.weight, bn.bias, self.fc2.weight,
                                       self.fc2.bias, bn.running_mean, bn.running_var, momentum, bn.eps, bn.bessel, lr)
        return loss, grads


class TorchMLP(nn.Module):
    """MLP on plain PyTorch (nn.Embedding, nn.Linear, nn.BatchNorm1d, nn.Tanh, F.cross_entropy): the baseline
    of `bench --op train` and the twin the tests compare with. Same state_dict keys as MLP."""

    def __init__(self, vocab_size=27, block_size=3, n_embd=10, n_hidden=200):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, n_embd)
        self.fc1 = nn.Linear(n_embd * block_size, n_hidden, bias=False)
        self.bn = nn.BatchNorm1d(n_hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(n_hidden, vocab_size)

    def forward(self, X, Y=None):
        logits = self.fc2(self.act(self.bn(self.fc1(self.emb(X).view(X.shape[0], -1)))))
        return logits if Y is None else F.cross_entropy(logits, Y)


class DeepMLP(nn.Module):
    """n_layers x (Linear(n_hidden), BatchNorm1d with fused tanh) then Linear(vocab) + BatchNorm1d(vocab).

    batchnorm=False gives Linear(+bias) + Tanh layers (the notebook's experiment without BatchNorm);
    gain multiplies the init of every hidden Linear (5/3 is tanh's); the last layer starts scaled by 0.1
    (its BatchNorm's gamma, or without BatchNorm its weight)."""

    def __init__(self, vocab_size: int = 27, block_size: int = 3, n_embd: int = 10, n_hidden: int = 100,
                 n_layers: int = 5, *, batchnorm: bool = True, gain: float = 5 / 3, seed: int | None = 2147483647):
        super().__init__()
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        self.config = dict(vocab_size=vocab_size, block_size=block_size, n_embd=n_embd, n_hidden=n_hidden,
                           n_layers=n_layers, batchnorm=batchnorm, gain=gain)
        self.block_size = block_size
        self.emb = nn.Embedding(vocab_size, n_embd)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(self.emb.weight.shape, generator=g))
        layers: list[nn.Module] = []
        fan_in = n_embd * block_size
        for _ in range(n_layers):
            lin = nn.Linear(fan_in, n_hidden, bias=not batchnorm)
            _init_linear(lin, gain, g)
            layers += [lin, mnn.BatchNorm1d(n_hidden, activation="tanh") if batchnorm else nn.Tanh()]
            fan_in = n_hidden
        last = nn.Linear(fan_in, vocab_size, bias=not batchnorm)
        _init_linear(last, 1.0, g)
        layers.append(last)
        if batchnorm:
            layers.append(mnn.BatchNorm1d(vocab_size))
            with torch.no_grad():
                layers[-1].weight.mul_(0.1)
        else:
            with torch.no_grad():
                last.weight.mul_(0.1)
        self.layers = nn.ModuleList(layers)

    def logits(self, X: Tensor) -> Tensor:
        x = self.emb(X).view(X.shape[0], -1)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, X: Tensor, Y: Tensor | None = None):
        logits = self.logits(X)
        return logits if Y is None else cross_entropy(logits, Y)

    def tanh_layers(self) -> list[nn.Module]:
        """The modules whose output is a tanh: the fused BatchNorm+tanh ones, or the Tanh layers."""
        return [m for m in self.layers if isinstance(m, nn.Tanh) or getattr(m, "activation", None) == "tanh"]

    def activation_layers(self) -> list[tuple[str, nn.Module]]:
        """(label, module) of each tanh output, numbered as in the notebook's list of layers, where BatchNorm1d
        and Tanh are separate entries: a fused BatchNorm + tanh module counts as two layers, its output is
        the second one's (e.g. 'layer 2 (Tanh)', 'layer 5 (Tanh)', ...)."""
        out, index = [], 0
        for m in self.layers:
            if getattr(m, "activation", None) == "tanh":
                out.append((f"layer {index + 1} (Tanh)", m))
                index += 2
            else:
                if isinstance(m, nn.Tanh):
                    out.append((f"layer {index} (Tanh)", m))
                index += 1
        return out


class CharRNN(nn.Module):
    """Token ids (B, L) -> mmops.nn.RNN (token input: a row gather, no one-hot) -> Linear -> logits (B, L, V);
    a learned start state h0, and the loss over non-padding targets (ignore_index -100)."""

    def __init__(self, vocab_size: int = 27, hidden_size: int = 256, num_layers: int = 1,
                 nonlinearity: str = "tanh", *, seed: int | None = 2147483647):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)  # nn.RNN's own init draws from the global generator
        self.config = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                           nonlinearity=nonlinearity)
        self.rnn = mnn.RNN(vocab_size, hidden_size, num_layers, nonlinearity=nonlinearity, batch_first=True)
        self.h0 = nn.Parameter(torch.zeros(num_layers, 1, hidden_size))
        self.head = nn.Linear(hidden_size, vocab_size)

    def run(self, X: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if h is None:
            h = self.h0.expand(-1, X.shape[0], -1)
        out, h_n = self.rnn(X, h)
        return self.head(out), h_n

    def forward(self, X: Tensor, Y: Tensor | None = None):
        logits, _ = self.run(X)
        return logits if Y is None else cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))

    def tanh_layers(self) -> list[nn.Module]:
        return []

    def activation_layers(self) -> list[tuple[str, nn.Module]]:
        return [("RNN hidden state (tanh)", self.rnn)] if self.rnn.nonlinearity == "tanh" else []


class TextRNN(nn.Module):
    """The Dive into Deep Learning character RNN "from scratch", on mmops.nn.RNN and mmops.cross_entropy:
    H_t = act(X_t W_xh + H_{t-1} W_hh + b_h), Y_t = H_t W_hq + b_q, on token ids (the one-hot X_t is a row
    gather of weight_ih: no one-hot tensor exists), weights drawn as randn * 0.01, zero biases and a zero
    initial state, as the book.

    nn.RNN's layer has two biases (bias_ih + bias_hh) where the book has one b_h: bias_hh_l0 stays a frozen
    zero (requires_grad False), so the parameters that train are exactly the book's W_xh^T (weight_ih_l0),
    W_hh^T (weight_hh_l0), b_h (bias_ih_l0), W_hq^T (head.weight) and b_q (head.bias)."""

    def __init__(self, vocab_size: int, hidden_size: int = 256, nonlinearity: str = "relu", *,
                 seed: int | None = 2147483647):
        super().__init__()
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        self.config = dict(vocab_size=vocab_size, hidden_size=hidden_size, nonlinearity=nonlinearity)
        self.rnn = mnn.RNN(vocab_size, hidden_size, nonlinearity=nonlinearity)
        self.head = nn.Linear(hidden_size, vocab_size)
        with torch.no_grad():
            for w in (self.rnn.weight_ih_l0, self.rnn.weight_hh_l0, self.head.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.01)
            for b in (self.rnn.bias_ih_l0, self.rnn.bias_hh_l0, self.head.bias):
                b.zero_()
        self.rnn.bias_hh_l0.requires_grad_(False)

    def begin_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        w = self.rnn.weight_hh_l0
        return torch.zeros(1, batch_size, self.rnn.hidden_size, device=device or w.device, dtype=dtype or w.dtype)

    def forward(self, X: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """X: token ids (T, B), time-major as the book's X.T. Returns the logits (T * B, V), rows in time-major
        order (the book's torch.cat of the per-step outputs), and the last state (1, B, H)."""
        out, state = self.rnn(X, state)
        return self.head(out.reshape(-1, out.shape[-1])), state

    def loss(self, X: Tensor, Y: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The mean cross-entropy over every predicted character of the (T, B) minibatch, and the last state."""
        logits, state = self(X, state)
        return cross_entropy(logits, Y.reshape(-1)), state

    @torch.no_grad()
    def predict(self, prefix_ids: list[int], num_preds: int, *, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> list[int]:
        """The book's predict(): the prefix warms the state, then num_preds tokens, each the argmax of the last
        output (temperature 0) or drawn from softmax(logits / temperature). Returns the new token ids."""
        if not prefix_ids:
            raise ValueError("predict: the prefix must hold at least one token")
        was = self.training
        self.eval()
        try:
            dev = self.head.weight.device
            logits, state = self(torch.tensor(prefix_ids, device=dev).view(-1, 1))
            out = []
            for _ in range(num_preds):
                last = logits[-1]
                if temperature > 0:
                    ix = int(torch.multinomial(F.softmax(last.float() / temperature, -1).cpu(), 1, generator=generator))
                else:
                    ix = int(last.argmax())
                out.append(ix)
                logits, state = self(torch.tensor([[ix]], device=dev), state)
        finally:
            self.train(was)
        return out


MODELS = {"mlp": MLP, "deep": DeepMLP, "rnn": CharRNN}


def build_model(name: str, vocab_size: int, block_size: int = 3, seed: int | None = 2147483647, **kw) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name == "rnn":
        return CharRNN(vocab_size, seed=seed, **kw)
    return MODELS[name](vocab_size, block_size, seed=seed, **kw)


@torch.no_grad()
def sample(model: nn.Module, vocab: Vocab, n: int = 10, *, seed: int = 2147483657, prefix: str = "",
           max_len: int = 64) -> list[str]:
    """n words drawn from the model with a seeded generator (eval mode: BatchNorm uses its running stats).
    Every word starts with `prefix` (its characters must be in the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    prefix_ids = vocab.encode(prefix)
    was_training = model.training
    model.eval()
    out = []
    try:
        for _ in range(n):
            ids = list(prefix_ids)
            if isinstance(model, CharRNN):
                logits, h = model.run(torch.tensor([[0] + ids]))
                while len(ids) < max_len:
                    ix = int(torch.multinomial(F.softmax(logits[0, -1], -1), 1, generator=g))
                    if ix == 0:
                        break
                    ids.append(ix)
                    logits, h = model.run(torch.tensor([[ix]]), h)
            else:
                bs = model.block_size
                context = ([0] * bs + ids)[-bs:]
                while len(ids) < max_len:
                    logits = model.logits(torch.tensor([context]))
                    ix = int(torch.multinomial(F.softmax(logits[0], -1), 1, generator=g))
                    if ix == 0:
                        break
                    ids.append(ix)
                    context = context[1:] + [ix]
            out.append(vocab.decode(ids))
    finally:
        model.train(was_training)
    return out
