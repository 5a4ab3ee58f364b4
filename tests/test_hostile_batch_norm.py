"""Hostile inputs to mmops.batch_norm, each against what F.batch_norm (followed by torch.tanh / torch.relu) does:
NaN / inf / huge values per channel, per-channel arguments with any stride (views, stride 0), eval-mode gradients
at NaN elements, and the arguments PyTorch refuses."""
import pytest
import torch
import torch.nn.functional as F

import mmops

ACT = {None: lambda t: t, "tanh": torch.tanh, "relu": torch.relu}


def _both(x, rm, rv, w, b, training, activation, go, reference_dtype=None):
    """(output, running_mean, running_var, grads) of mmops and of PyTorch, from fresh copies of every argument.
    reference_dtype: run PyTorch in that dtype and cast back (where mmops is more accurate than PyTorch's float32).
    PyTorch gets contiguous copies: its own CPU batch_norm backward reads a strided weight as if it were contiguous
    (torch 2.13: with weight = buf[::3], grad_input is computed with buf[0:C]), so it is no reference for strides."""
    results = []
    for fn in ("mmops", "torch"):
        dt = reference_dtype if fn == "torch" and reference_dtype is not None else x.dtype
        def arg(t, grad=False):
            if t is None:
                return None
            t = t.detach().to(dt) if fn == "mmops" else t.detach().to(dt).contiguous()
            return t.clone() if not grad else t.requires_grad_()

        xi, wi, bi = arg(x, True), arg(w, True), arg(b, True)
        rmi, rvi = arg(rm), arg(rv)
        go = go.to(dt)
        if fn == "mmops":
            y = mmops.batch_norm(xi, rmi, rvi, wi, bi, training, 0.1, 1e-5, activation=activation)
        else:
            y = ACT[activation](F.batch_norm(xi, rmi, rvi, wi, bi, training, 0.1, 1e-5))
        y.backward(go)
        grads = [t.grad.to(x.dtype) for t in (xi, wi, bi) if t is not None]
        cast = (lambda t: None if t is None else t.to(x.dtype))
        results.append((cast(y), cast(rmi), cast(rvi), grads))
    return results


def _assert_same(a, b):
    for u, v in zip(a, b):
        if isinstance(u, list):
            _assert_same(u, v)
        elif u is not None:
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
@pytest.mark.parametrize("activation", [None, "tanh", "relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(8, 5), (40, 64), (6, 5, 7)])
def test_nan_inf_huge_in_one_channel_propagate_as_in_pytorch(bad, activation, training, shape):
    x = torch.randn(shape)
    x[3, 2] = bad  # one element of channel 2, not its first value (that case is the next test)
    C = shape[1]
    w, b = torch.randn(C), torch.randn(C)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    go = torch.randn(shape)
    # at 1e30 PyTorch's float32 batch statistics lose the channel (its output is 0 everywhere) while mmops
    # accumulates in double: that case is compared with PyTorch in float64
    got, want = _both(x, rm, rv, w, b, training, activation, go, torch.float64 if bad == 1e30 else None)
    _assert_same(got, want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_first_value_of_a_channel(bad):
    # the first value is the shift of the channel's sums: an inf there must still give PyTorch's inf mean
    x = torch.randn(16, 4)
    x[0, 1] = bad
    rm, rv = torch.zeros(4), torch.ones(4)
    got, want = _both(x, rm, rv, None, None, True, None, torch.randn(16, 4))
    _assert_same(got, want)


def _strided(values: torch.Tensor, kind: str) -> torch.Tensor:
    """values (C,) as a view with another layout: every 3rd element of a longer buffer, or an expanded scalar."""
    if kind == "step3":
        buf = torch.zeros(3 * values.numel())
        buf[::3] = values
        return buf[::3]
    return values[:1].expand(values.numel())


@pytest.mark.parametrize("kind", ["step3", "stride0"])
@pytest.mark.parametrize("arg", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 5), (64, 40), (4, 5, 3)])
def test_every_per_channel_argument_with_any_stride(kind, arg, training, shape):
    C = shape[1]
    vals = {"weight": torch.arange(1.0, C + 1), "bias": torch.randn(C), "running_mean": torch.randn(C),
            "running_var": torch.rand(C) + 0.5}
    vals[arg] = _strided(vals[arg], kind)
    if kind == "stride0" and arg.startswith("running") and training:
        # PyTorch writes every channel's update into the one shared element (the last channel wins, silently);
        # mmops refuses, naming the argument
        with pytest.raises(RuntimeError, match=f"{arg} has elements that share memory"):
            mmops.batch_norm(torch.randn(shape), vals["running_mean"], vals["running_var"], training=True)
        return
    assert not vals[arg].is_contiguous()
    x, go = torch.randn(shape), torch.randn(shape)
    rm, rv = vals["running_mean"], vals["running_var"]
    got, want = _both(x, rm, rv, vals["weight"], vals["bias"], training, "tanh", go)
    _assert_same(got, want)


def test_non_contiguous_running_stats_are_updated_in_place():
    buf_m, buf_v = torch.zeros(10), torch.ones(10)
    rm, rv = buf_m[::2], buf_v[::2]
    x = torch.randn(7, 5)
    mmops.batch_norm(x, rm, rv, training=True)
    want_m, want_v = torch.zeros(5), torch.ones(5)
    F.batch_norm(x, want_m, want_v, training=True)
    torch.testing.assert_close(buf_m[::2], want_m)
    torch.testing.assert_close(buf_v[::2], want_v)
    assert (buf_m[1::2] == 0).all() and (buf_v[1::2] == 1).all()  # the elements between are untouched


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_eps_must_be_positive_in_training(eps):
    with pytest.raises(ValueError, match="eps must be positive"):
        F.batch_norm(torch.randn(6, 5), None, None, training=True, eps=eps)  # PyTorch's rule ...
    with pytest.raises(ValueError, match="eps must be positive"):
        mmops.batch_norm(torch.randn(6, 5), None, None, training=True, eps=eps)  # ... and mmops'
