"""Inputs PyTorch takes that mmops once refused, against the PyTorch op: PackedSequence and bidirectional RNNs,
BatchNorm on (N, C, *) and in bfloat16/float16, BatchNorm1d(bias=False), cross-entropy with uint8 targets, float64
probability targets and probability targets that require grad; and double backward, which raises by name."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import mmops
import mmops.nn


def _pair(cls_mmops, cls_torch, *args, **kw):
    torch.manual_seed(0)
    ref = cls_torch(*args, **kw).double()
    mine = cls_mmops(*args, **kw).double()
    mine.load_state_dict(ref.state_dict())
    return mine, ref


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed_sequence_matches_nn_rnn(bidirectional, num_layers, enforce_sorted, nonlinearity, with_hx):
    mine, ref = _pair(mmops.nn.RNN, torch.nn.RNN, 3, 4, num_layers=num_layers, nonlinearity=nonlinearity,
                      bidirectional=bidirectional)
    lengths = torch.tensor([5, 5, 3, 2, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 5, 3])
    T, B, D = 5, 5, 2 if bidirectional else 1
    x = torch.randn(T, B, 3, dtype=torch.float64)
    h0 = torch.randn(num_layers * D, B, 4, dtype=torch.float64) if with_hx else None
    results = []
    for m in (mine, ref):
        xi = x.clone().requires_grad_()
        hi = None if h0 is None else h0.clone().requires_grad_()
        packed = pack_padded_sequence(xi, lengths, enforce_sorted=enforce_sorted)
        out, h_n = m(packed, hi)
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        padded, out_lengths = pad_packed_sequence(out)
        assert torch.equal(out_lengths, lengths)
        g = torch.Generator().manual_seed(1)
        loss = (padded * torch.randn(padded.shape, dtype=padded.dtype, generator=g)).sum() + (h_n ** 2).sum()
        params = [p for _, p in sorted(m.named_parameters())]
        grads = torch.autograd.grad(loss, [xi] + ([hi] if hi is not None else []) + params)
        results.append((out.data, h_n, grads))
    (o1, h1, g1), (o2, h2, g2) = results
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(h1, h2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("batch_first", [False, True])
def test_bidirectional_padded_matches_nn_rnn(batch_first):
    mine, ref = _pair(mmops.nn.RNN, torch.nn.RNN, 3, 4, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    outs = [m(x) for m in (mine, ref)]
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


@pytest.mark.parametrize("shape", [(4, 3, 2, 5), (3, 2, 2, 2, 3), (6, 4, 1)])
@pytest.mark.parametrize("activation", [None, "tanh"])
def test_batch_norm_any_rank(shape, activation):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    y = mmops.batch_norm(x, rm, rv, w, None, True, activation=activation)
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    y2 = F.batch_norm(x2, rm2, rv2, w2, None, True)
    y2 = torch.tanh(y2) if activation else y2
    torch.testing.assert_close(y, y2)
    go = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w), go), torch.autograd.grad(y2, (x2, w2), go))
    torch.testing.assert_close((rm, rv), (rm2, rv2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
def test_batch_norm_low_precision(dtype, param_dtype):
    pd = dtype if param_dtype == "same" else torch.float32
    x = torch.randn(16, 6).to(dtype)
    w, b = torch.rand(6).to(pd), torch.randn(6).to(pd)
    rm, rv = torch.zeros(6, dtype=pd), torch.ones(6, dtype=pd)
    rm2, rv2 = rm.clone(), rv.clone()
    y = mmops.batch_norm(x, rm, rv, w, b, True)
    y2 = F.batch_norm(x, rm2, rv2, w, b, True)
    assert y.dtype == y2.dtype == dtype
    torch.testing.assert_close(y, y2, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close((rm, rv), (rm2, rv2), rtol=2e-2, atol=2e-2)
    assert rm.dtype == pd


def test_batch_norm1d_without_bias():
    mine, ref = mmops.nn.BatchNorm1d(5, bias=False), torch.nn.BatchNorm1d(5, bias=False)
    assert mine.bias is None and set(mine.state_dict()) == set(ref.state_dict())
    x = torch.randn(8, 5)
    torch.testing.assert_close(mine(x), ref(x))
    sync = mmops.nn.SyncBatchNorm(5, bias=False)
    assert sync.bias is None


def test_cross_entropy_uint8_target_and_float64_probabilities():
    x = torch.randn(5, 4)
    t = torch.tensor([0, 3, 1, 2, 2], dtype=torch.uint8)
    torch.testing.assert_close(mmops.cross_entropy(x, t), F.cross_entropy(x, t))
    p = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1)
    got, want = mmops.cross_entropy(x, p), F.cross_entropy(x, p)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_gradient_wrt_probability_target(reduction, smoothing, weighted):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1).requires_grad_()
    w = torch.rand(5, dtype=torch.float64) if weighted else None
    go = torch.rand(6, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    got = torch.autograd.grad(mmops.cross_entropy(x, p, w, reduction=reduction, label_smoothing=smoothing), (x, p), go)
    want = torch.autograd.grad(F.cross_entropy(x, p, w, reduction=reduction, label_smoothing=smoothing), (x, p), go)
    torch.testing.assert_close(got, want)


def _ce():
    x = torch.randn(4, 3, requires_grad=True)
    return x, mmops.cross_entropy(x, torch.tensor([0, 1, 2, 0]))


def _bn():
    x = torch.randn(4, 3, requires_grad=True)
    return x, mmops.batch_norm(x, None, None, training=True, activation="tanh").pow(2).sum()


def _rnn():
    x = torch.randn(3, 2, 4, requires_grad=True)
    m = mmops.nn.RNN(4, 5)
    return x, m(x)[0].pow(2).sum()


@pytest.mark.parametrize("make,name", [(_ce, "mmops.cross_entropy"), (_bn, "mmops.batch_norm"), (_rnn, "mmops.rnn")])
def test_double_backward_raises_instead_of_a_silent_zero(make, name):
    # a gradient penalty: with once_differentiable the Hessian term was silently missing (the result was 2x)
    x, loss = make()
    with pytest.raises(RuntimeError, match=f"{name}: double backward is not supported"):
        torch.autograd.grad(loss, x, create_graph=True)
    x, loss = make()
    (g,) = torch.autograd.grad(loss, x)  # first order is unaffected
    assert g.shape == x.shape and not g.requires_grad
