"""Every tensor argument of every mmops op in odd layouts (a strided view, a transposed view, an expanded stride-0
view), each against the same call with contiguous copies and against PyTorch: nothing is read as if it were
contiguous. (BatchNorm's per-channel arguments: tests/test_hostile_batch_norm.py.)"""
import pytest
import torch
import torch.nn.functional as F

import mmops


def _every_other(t: torch.Tensor) -> torch.Tensor:
    """t's values as a view that skips every other element of a buffer twice as large (last dim)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buf[..., ::2] = t
    out = buf[..., ::2]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """t's values as the transpose of a contiguous transpose (same values, column-major strides)."""
    out = t.t().contiguous().t()
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


LAYOUTS = {"every_other": _every_other, "transposed": _transposed}


CE_CASES = [(layout, arg) for arg in ["input", "weight", "prob_target", "index_target"] for layout in LAYOUTS
            if layout == "every_other" or arg in ("input", "prob_target")]  # a 1-D tensor has no transpose


@pytest.mark.parametrize("layout,arg", CE_CASES)
def test_cross_entropy_arguments_in_any_layout(layout, arg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g)
    w = torch.rand(5, dtype=torch.float64, generator=g) + 0.5
    p = torch.softmax(torch.randn(7, 5, dtype=torch.float64, generator=g), 1)
    y = torch.randint(0, 5, (7,), generator=g)
    make = LAYOUTS[layout]
    args = {"input": x, "weight": w, "prob_target": p, "index_target": y}
    args[arg] = make(args[arg])
    target = args["prob_target"] if arg == "prob_target" else args["index_target"]
    xi = args["input"].clone().requires_grad_() if arg != "input" else args["input"].requires_grad_()
    got = mmops.cross_entropy(xi, target, args["weight"], reduction="none", label_smoothing=0.1)
    go = torch.rand(7, dtype=torch.float64, generator=g)
    (gx,) = torch.autograd.grad(got, xi, go)
    xr = x.clone().requires_grad_()
    want = F.cross_entropy(xr, target.contiguous(), w, reduction="none", label_smoothing=0.1)
    (gr,) = torch.autograd.grad(want, xr, go)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, gr)


def test_cross_entropy_expanded_weight():
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    w = torch.tensor([0.7], dtype=torch.float64).expand(4)
    torch.testing.assert_close(mmops.cross_entropy(x, y, w), F.cross_entropy(x, y, w.contiguous()))


RNN_CASES = [(layout, arg) for arg in ["input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
             for layout in LAYOUTS if layout == "every_other" or arg in ("hx", "weight_ih", "weight_hh")]


@pytest.mark.parametrize("layout,arg", RNN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rnn_arguments_in_any_layout(layout, arg, dtype):
    g = torch.Generator().manual_seed(0)
    T, B, I, H = 4, 3, 5, 6
    vals = {"input": torch.randn(T, B, I, generator=g), "hx": torch.randn(B, H, generator=g),
            "weight_ih": torch.randn(H, I, generator=g) * 0.4, "weight_hh": torch.randn(H, H, generator=g) * 0.4,
            "bias_ih": torch.randn(H, generator=g), "bias_hh": torch.randn(H, generator=g)}
    vals = {k: v.to(dtype) for k, v in vals.items()}
    odd = dict(vals)
    odd[arg] = LAYOUTS[layout](vals[arg])
    go = torch.randn(T, B, H, generator=g).to(dtype)
    results = []
    for args in (odd, vals):
        leaves = {k: v.detach().clone() if k != arg or args is vals else v.detach() for k, v in args.items()}
        for v in leaves.values():
            v.requires_grad_()
        out, _ = mmops.rnn(leaves["input"], leaves["hx"], leaves["weight_ih"], leaves["weight_hh"],
                           leaves["bias_ih"], leaves["bias_hh"])
        grads = torch.autograd.grad(out, list(leaves.values()), go)
        results.append((out, grads))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, **tol)
    ref = torch.nn.RNN(I, H).to(dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, f"{name}_l0").copy_(vals[name])
    torch.testing.assert_close(results[1][0], ref(vals["input"], vals["hx"].unsqueeze(0))[0], **tol)


def test_rnn_token_ids_strided():
    tok = torch.randint(0, 5, (4, 6))[:, ::2]
    assert not tok.is_contiguous()
    w_ih, w_hh = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 7, dtype=torch.float64) * 0.3
    h0 = torch.zeros(3, 7, dtype=torch.float64)
    got, _ = mmops.rnn(tok, h0, w_ih, w_hh)
    want, _ = mmops.rnn(tok.contiguous(), h0, w_ih, w_hh)
    torch.testing.assert_close(got, want)
    onehot, _ = mmops.rnn(F.one_hot(tok, 5).double(), h0, w_ih, w_hh)
    torch.testing.assert_close(got, onehot)
